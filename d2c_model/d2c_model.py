import math
import os
import torch
from collections import OrderedDict
from copy import deepcopy
from os import path as osp
from torch.nn.parallel import DataParallel, DistributedDataParallel
from tqdm import tqdm

from basicsr.losses import build_loss
from basicsr.metrics import calculate_metric
from basicsr.metrics.psnr_ssim import calculate_psnr
from basicsr.models import lr_scheduler
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, imwrite, tensor2img
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY
from d2c_arch import bare_key, default_options, is_convergence_key, state_dict_differences
from .alpha_schedule import AlphaSchedule
from .eval_util import oracle_fusion
from .precision_util import autocast, resolve_precision
from .tile_util import GuardedForward

PHASE_NAMES = ('divergence', 'convergence', 'joint')
# which parts of D2CNet a phase trains (the rest is frozen)
_TRAINED_PARTS = {
    'divergence': ('divergence', ),
    'convergence': ('convergence', ),
    'joint': ('divergence', 'convergence'),
}
# BasicSR's option names for its schedulers -> classes in basicsr.models.lr_scheduler
_SCHEDULER_ALIASES = {'MultiStepLR': 'MultiStepRestartLR'}
NONFINITE_POLICIES = ('error', 'skip')


class Phase:
    """One training phase: a name from PHASE_NAMES and its slice of iterations.

    Iterations ``start + 1 .. start + iters`` (1-based, global) belong to the phase. It owns
    one optimizer and one scheduler per trained part, which only it steps.
    """

    def __init__(self, index, name, start, iters, optim_opt, scheduler_opt):
        self.index = index
        self.name = name
        self.start = start
        self.iters = iters
        self.optim_opt = optim_opt
        self.scheduler_opt = scheduler_opt
        self.optimizers = []
        self.schedulers = []

    @property
    def end(self):
        return self.start + self.iters

    def __repr__(self):
        return f'{self.name} (iters {self.start + 1}-{self.end})'


class _PhaseTag(float):
    """A log value that prints as the phase name.

    BasicSR's MessageLogger formats every value of the log dict with ``{:.4e}`` and sends it to
    tensorboard as a scalar; this float prints ``phase: convergence`` in the text log and gives
    tensorboard the phase index.
    """

    def __new__(cls, index, name):
        tag = super().__new__(cls, index)
        tag.name = name
        return tag

    def __format__(self, spec):
        return self.name


def parse_phases(opt):
    """Read ``train.phases`` into a list of :class:`Phase`, checking it against ``total_iter``.

    Each entry: ``{name: divergence|convergence|joint, iters: int, optim_g: {...}, scheduler: {...}}``;
    ``optim_g`` and ``scheduler`` default to ``train.optim_g`` / ``train.scheduler``.
    """
    train_opt = opt['train']
    phases_opt = train_opt.get('phases')
    if not phases_opt:
        raise ValueError('D2CModel: train.phases is missing. List the phases in order, e.g.\n'
                         '  phases:\n    - {name: divergence, iters: 1000}\n    - {name: convergence, iters: 200}')
    phases, start = [], 0
    for index, phase_opt in enumerate(phases_opt):
        name = phase_opt.get('name')
        if name not in PHASE_NAMES:
            raise ValueError(f'D2CModel: train.phases[{index}].name={name!r} is unknown; use one of {PHASE_NAMES}.')
        iters = phase_opt.get('iters')
        if not isinstance(iters, int) or iters <= 0:
            raise ValueError(f'D2CModel: train.phases[{index}].iters={iters!r} must be a positive integer.')
        unknown = sorted(set(phase_opt) - {'name', 'iters', 'optim_g', 'scheduler'})
        if unknown:
            raise ValueError(f'D2CModel: train.phases[{index}] has unknown keys {unknown}; '
                             'allowed: name, iters, optim_g, scheduler.')
        optim_opt = deepcopy(phase_opt.get('optim_g', train_opt.get('optim_g')))
        scheduler_opt = deepcopy(phase_opt.get('scheduler', train_opt.get('scheduler')))
        if optim_opt is None:
            raise ValueError(f'D2CModel: train.phases[{index}] ({name}) has no optim_g and train.optim_g is not set.')
        phases.append(Phase(index, name, start, iters, optim_opt, scheduler_opt))
        start += iters
    total_iter = int(train_opt['total_iter'])
    if start != total_iter:
        lengths = ' + '.join(str(p.iters) for p in phases)
        raise ValueError(f'D2CModel: the phase lengths add up to {lengths} = {start}, but train.total_iter is '
                         f'{total_iter}; make them equal.')
    return phases


def check_options(opt):
    """Catch option mistakes that would otherwise fail late or silently, naming key and fix."""
    net_opt = opt.get('network_g') or {}
    scale = opt.get('scale')
    upscale = net_opt.get('upscale', 4)
    if scale is not None and upscale != scale:
        raise ValueError(f'D2CModel: network_g.upscale={upscale} but scale={scale} (the data sets use scale); '
                         'make them equal.')
    for name, dataset in (opt.get('datasets') or {}).items():
        gt_size = dataset.get('gt_size')
        if gt_size is not None and scale and gt_size % scale:
            raise ValueError(f'D2CModel: datasets.{name}.gt_size={gt_size} is not divisible by scale={scale}; '
                             f'use a multiple such as {gt_size - gt_size % scale or scale}.')
    policy = (opt.get('train') or {}).get('nonfinite', 'error')
    if opt.get('is_train') and policy not in NONFINITE_POLICIES:
        raise ValueError(f'D2CModel: train.nonfinite={policy!r}; use one of {NONFINITE_POLICIES}.')


def atomic_torch_save(obj, save_path):
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp_path = f'{save_path}.tmp{os.getpid()}'
    try:
        torch.save(obj, tmp_path)
        os.replace(tmp_path, save_path)
    finally:
        if osp.exists(tmp_path):
            os.remove(tmp_path)


@MODEL_REGISTRY.register()
class D2CModel(SRModel):
    """Two-phase D2C-SR model (paper Sec. 3.4) on top of BasicSR's SRModel.

    ``net_g`` is the whole D2CNet, so checkpoints load into the stock SRModel for testing.
    Training follows ``train.phases``:

    * ``divergence``: trains the divergence network with ``train.divergence_opt``
      (DivergenceLoss); the convergence network is not run and stays untouched.
    * ``convergence``: freezes the divergence network (no gradients, no optimizer state)
      and trains the convergence network with ``train.pixel_opt`` (ConvergenceLoss) and
      optionally ``train.perceptual_opt``, both on the fused SR image.
    * ``joint`` (the authors' release): every iteration both updates from one forward pass:
      the divergence loss on the predictions and the convergence loss on the fusion of the
      detached predictions.

    Each phase has its own optimizer(s) and scheduler(s), stepped only during the phase with
    the phase's own iteration count (milestones are relative to the phase start). The
    divergence weight alpha follows ``train.alpha_schedule`` (see AlphaSchedule).

    Validation reports the configured metrics of the fused image and, in addition, the PSNR
    of every branch (``psnr_branch<i>``) and of the oracle fusion (``psnr_oracle``: per pixel
    the branch closest to HR, paper Sec. 4.6).
    """

    def __init__(self, opt):
        check_options(opt)
        self.phases = parse_phases(opt) if opt['is_train'] else []
        self.current_phase = None
        self.nonfinite_policy = opt['train'].get('nonfinite', 'error') if opt['is_train'] else 'error'
        self.nonfinite_skips = 0
        device_type = 'cuda' if opt['num_gpu'] != 0 else 'cpu'
        train_opt = opt.get('train') or {}
        # reduced precision and memory layout are options, not defaults: fp32 NCHW is BasicSR's behaviour
        self.channels_last = bool(train_opt.get('channels_last', False)) if opt['is_train'] else \
            bool((opt.get('val') or {}).get('channels_last', False))
        self.train_amp_dtype = resolve_precision(train_opt.get('precision'), device_type) if opt['is_train'] else None
        self.val_amp_dtype = resolve_precision((opt.get('val') or {}).get('precision'), device_type, purpose='infer')
        self._val_forward = None  # a GuardedForward, made at the first validation
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        self.grad_scaler = torch.amp.GradScaler('cuda') if self.train_amp_dtype == torch.float16 else None
        super().__init__(opt)
        bare = self.get_bare_model(self.net_g)
        if not (hasattr(bare, 'diverge') and hasattr(bare, 'converge')):
            raise ValueError(f'D2CModel: network_g.type={opt["network_g"]["type"]!r} is not a D2C network '
                             '(it needs diverge/converge); use type: D2CNet, or model_type: SRModel for other nets.')

    # ----------------------------------------------------------------------------- setup
    def model_to_device(self, net):
        """BasicSR's model_to_device, also on CPU: DDP gets ``device_ids`` only for CUDA."""
        net = net.to(self.device)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if self.opt['dist']:
            device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
            net = DistributedDataParallel(
                net, device_ids=device_ids, find_unused_parameters=self.opt.get('find_unused_parameters', False))
        elif self.opt['num_gpu'] > 1:
            net = DataParallel(net)
        return net

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """BasicSR's load_network with weights_only loading and a clear error on a shape mismatch."""
        if not osp.isfile(load_path):
            raise FileNotFoundError(f'path.pretrain_network_g: checkpoint not found: {load_path}')
        ckpt = torch.load(load_path, map_location='cpu', weights_only=True)
        if param_key is not None and param_key not in ckpt and 'params' in ckpt:
            param_key = 'params'
        loaded = ckpt[param_key] if param_key is not None else ckpt
        loaded = OrderedDict((bare_key(k), v) for k, v in loaded.items())
        current = self.get_bare_model(net).state_dict()
        missing, unexpected, resized = (sorted(keys) for keys in state_dict_differences(current, loaded))
        resized = [f'{k}: checkpoint {tuple(loaded[k].shape)} vs network {tuple(current[k].shape)}' for k in resized]
        if strict and (missing or unexpected or resized):
            def listing(title, keys):
                return f'\n  {title} ({len(keys)}): ' + ', '.join(keys[:8]) + (' ...' if len(keys) > 8 else '')

            raise ValueError(f'D2CModel: {load_path} does not fit network_g (check tree_depth, tree_width, '
                             f'num_group, num_block, num_feat, upscale):' +
                             (listing('missing in the checkpoint', missing) if missing else '') +
                             (listing('not in the network', unexpected) if unexpected else '') +
                             (listing('different shapes', resized) if resized else '') +
                             '\n  or set path.strict_load_g: false to load what fits.')
        self._warn_on_constants_mismatch(ckpt.get('converted_from'), load_path)
        if not strict:  # BasicSR's path: report differences, skip mismatching shapes
            self._print_different_keys_loading(net, loaded, strict)
        get_root_logger().info(f'Loading {load_path} [{param_key}] into {type(self.get_bare_model(net)).__name__}.')
        self.get_bare_model(net).load_state_dict(loaded, strict=strict)

    def _warn_on_constants_mismatch(self, source, load_path):
        """Converted checkpoints name the network_g constants that are not weights (rgb_mean, img_range)."""
        if not isinstance(source, dict) or not isinstance(source.get('network_g'), dict):
            return
        defaults = default_options()
        for key in ('rgb_mean', 'img_range'):
            want = source['network_g'].get(key, defaults[key])
            have = self.opt['network_g'].get(key, defaults[key])
            if not torch.allclose(torch.tensor(want, dtype=torch.float64), torch.tensor(have, dtype=torch.float64)):
                get_root_logger().warning(f'{load_path} was converted for network_g.{key}={list(want) if key == "rgb_mean" else want} '
                                          f'but the options have {have}; outputs will be slightly off. Use the '
                                          'network_g block printed by the converter.')

    def init_training_settings(self):
        train_opt = self.opt['train']
        bare = self.get_bare_model(self.net_g)
        uses_divergence = any(p.name in ('divergence', 'joint') for p in self.phases)
        uses_convergence = any(p.name in ('convergence', 'joint') for p in self.phases)
        if uses_divergence:
            div_opt = deepcopy(train_opt.get('divergence_opt'))
            if not div_opt:
                raise ValueError('D2CModel: a divergence or joint phase needs train.divergence_opt, e.g. '
                                 '{type: DivergenceLoss, alpha: 2.0e-5, theta: 0.8, margin: [5.0e-5, 2.0e-5]}.')
            for key in ('tree_depth', 'tree_width'):
                net_value = getattr(bare, key)
                if div_opt.setdefault(key, net_value) != net_value:
                    raise ValueError(f'D2CModel: train.divergence_opt.{key}={div_opt[key]} but network_g has '
                                     f'{key}={net_value}; remove the key or make them equal.')
            self.cri_div = build_loss(div_opt).to(self.device)
            self.alpha_schedule = AlphaSchedule.from_opt(self.cri_div.alpha, train_opt.get('alpha_schedule'))
        else:
            self.cri_div = None
            self.alpha_schedule = None
        if uses_convergence and not (train_opt.get('pixel_opt') or train_opt.get('perceptual_opt')):
            raise ValueError('D2CModel: a convergence or joint phase needs train.pixel_opt (the convergence '
                             'loss, e.g. {type: ConvergenceLoss, loss_weight: 1.0}).')
        if not uses_convergence:
            # SRModel insists on a pixel or perceptual loss; with no convergence phase none is used
            train_opt.setdefault('pixel_opt', {'type': 'ConvergenceLoss'})
        super().init_training_settings()  # EMA, pixel/perceptual losses, our optimizers and schedulers

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        """Any ``torch.optim`` optimizer by class name (BasicSR 1.4.2 knows only Adam)."""
        optim_cls = getattr(torch.optim, optim_type, None)
        if not (isinstance(optim_cls, type) and issubclass(optim_cls, torch.optim.Optimizer)):
            raise ValueError(f'D2CModel: optim_g.type={optim_type!r} is not an optimizer in torch.optim.')
        return optim_cls(params, lr, **kwargs)

    def _named_parts(self):
        bare = self.get_bare_model(self.net_g)
        parts = {'divergence': [], 'convergence': []}
        for name, param in bare.named_parameters():
            parts['convergence' if is_convergence_key(name) else 'divergence'].append(param)
        return parts

    def setup_optimizers(self):
        parts = self._named_parts()
        for phase in self.phases:
            for part in _TRAINED_PARTS[phase.name]:
                optim_opt = deepcopy(phase.optim_opt)
                optimizer = self.get_optimizer(optim_opt.pop('type'), parts[part], **optim_opt)
                phase.optimizers.append(optimizer)
                self.optimizers.append(optimizer)  # BaseModel saves and resumes this list

    def setup_schedulers(self):
        for phase in self.phases:
            if phase.scheduler_opt is None:
                raise ValueError(f'D2CModel: phase {phase} has no scheduler and train.scheduler is not set.')
            scheduler_opt = deepcopy(phase.scheduler_opt)
            scheduler_type = scheduler_opt.pop('type')
            scheduler_cls = getattr(lr_scheduler, _SCHEDULER_ALIASES.get(scheduler_type, scheduler_type), None)
            if scheduler_cls is None:
                raise ValueError(f'D2CModel: scheduler type {scheduler_type!r} of phase {phase} is unknown; use '
                                 'MultiStepLR, MultiStepRestartLR or CosineAnnealingRestartLR.')
            for optimizer in phase.optimizers:
                scheduler = scheduler_cls(optimizer, **scheduler_opt)
                phase.schedulers.append(scheduler)
                self.schedulers.append(scheduler)

    # ------------------------------------------------------------------------- phases
    def phase_at(self, current_iter):
        """The phase that 1-based iteration ``current_iter`` belongs to (the last one past the end)."""
        for phase in self.phases:
            if current_iter <= phase.end:
                return phase
        return self.phases[-1]

    def _enter_phase(self, phase, current_iter):
        trained = _TRAINED_PARTS[phase.name]
        for part, params in self._named_parts().items():
            for param in params:
                param.requires_grad_(part in trained)
                if part not in trained:
                    param.grad = None  # leftovers of an earlier phase would only hold memory
        if self.opt['dist']:
            # DDP only reduces the parameters that required gradients when it was built, so a
            # frozen part costs neither a find_unused_parameters scan nor a reduction error
            self.net_g = self.model_to_device(self.get_bare_model(self.net_g))
        frozen = [part for part in ('divergence', 'convergence') if part not in trained]
        logger = get_root_logger()
        logger.info(f'Phase {phase.index + 1}/{len(self.phases)} at iter {current_iter}: {phase}; '
                    f'training the {" and ".join(trained)} network'
                    f'{"s" if len(trained) > 1 else ""}{"; frozen: " + frozen[0] if frozen else ""}.')
        self.current_phase = phase

    def update_learning_rate(self, current_iter, warmup_iter=-1):
        """Step only the current phase's schedulers, counting iterations from the phase start."""
        phase = self.phase_at(current_iter)
        if phase is not self.current_phase:
            self._enter_phase(phase, current_iter)
        phase_iter = current_iter - phase.start
        if phase_iter > 1:
            for scheduler in phase.schedulers:
                scheduler.step()
        if phase_iter < warmup_iter:  # linear warm-up at the start of every phase
            for optimizer in phase.optimizers:
                for group in optimizer.param_groups:
                    group['lr'] = group['initial_lr'] / warmup_iter * phase_iter

    def get_current_learning_rate(self):
        phase = self.current_phase or self.phases[0]
        return [group['lr'] for group in phase.optimizers[0].param_groups]

    # ------------------------------------------------------------------------- training
    def feed_data(self, data):
        super().feed_data(data)
        if self.channels_last:
            self.lq = self.lq.contiguous(memory_format=torch.channels_last)

    def _convergence_losses(self, loss_dict):
        l_total = 0
        if self.cri_pix:
            loss_dict['l_conv'] = self.cri_pix(self.output, self.gt)
            l_total = l_total + loss_dict['l_conv']
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(self.output, self.gt)
            for key, value in (('l_percep', l_percep), ('l_style', l_style)):
                if value is not None:
                    loss_dict[key] = value
                    l_total = l_total + value
        return l_total

    def _divergence_losses(self, branches, loss_dict):
        l_div, parts = self.cri_div(branches, self.gt)
        loss_dict['l_div'] = l_div
        loss_dict.update(parts)
        return l_div

    def optimize_parameters(self, current_iter):
        if self.current_phase is None:
            self._enter_phase(self.phase_at(current_iter), current_iter)
        phase = self.current_phase
        alpha = None
        if self.cri_div is not None:
            alpha = self.alpha_schedule(current_iter)
            self.cri_div.alpha = alpha
        for optimizer in phase.optimizers:
            optimizer.zero_grad(set_to_none=True)

        loss_dict = OrderedDict()
        with autocast(self.device.type, self.train_amp_dtype):
            if phase.name == 'divergence':
                branches = self.net_g(self.lq, stage='divergence')
            elif phase.name == 'convergence':
                with torch.no_grad():  # frozen: no graph, no activations kept
                    branches = self.net_g(self.lq, stage='divergence')
                self.output, _ = self.net_g(branches, stage='convergence')
            else:  # joint: one forward, the fusion sees detached predictions
                self.output, branches, _ = self.net_g(self.lq, return_branches=True, fuse_detached=True)
        # losses in fp32: the triplet term compares small distances that bf16 would round away
        l_total = 0
        if phase.name in ('divergence', 'joint'):
            l_total = l_total + self._divergence_losses(branches.float(), loss_dict)
        if phase.name in ('convergence', 'joint'):
            self.output = self.output.float()
            l_total = l_total + self._convergence_losses(loss_dict)
        if self._loss_is_finite(loss_dict, current_iter, phase):
            if self.grad_scaler is None:
                l_total.backward()
                for optimizer in phase.optimizers:
                    optimizer.step()
            else:
                self.grad_scaler.scale(l_total).backward()
                for optimizer in phase.optimizers:
                    self.grad_scaler.step(optimizer)
                self.grad_scaler.update()

        self.log_dict = OrderedDict(phase=_PhaseTag(phase.index, phase.name))
        self.log_dict.update(self.reduce_loss_dict(loss_dict))
        if self.nonfinite_skips:
            self.log_dict['nonfinite_skips'] = self.nonfinite_skips
        if alpha is not None and phase.name != 'convergence':
            self.log_dict['alpha'] = alpha
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    def _loss_is_finite(self, loss_dict, current_iter, phase):
        """False (skip the step) or FloatingPointError when a loss part is NaN or inf.

        With ``train.nonfinite: skip`` the step is skipped and counted (``nonfinite_skips`` in
        the log); in distributed runs every rank skips when any rank saw a non-finite loss, so
        the ranks stay in step. Otherwise training stops, naming iteration, phase and part.
        """
        bad = [name for name, value in loss_dict.items() if not torch.isfinite(value).all()]
        if self.opt['dist']:
            flag = torch.tensor([float(bool(bad))], device=self.device)
            torch.distributed.all_reduce(flag)
            if flag.item() and not bad:
                bad = ['(another rank)']
        if not bad:
            return True
        where = f'iter {current_iter}, phase {phase.name}: non-finite {", ".join(bad)}'
        if self.nonfinite_policy == 'skip':
            self.nonfinite_skips += 1
            get_root_logger().warning(f'Skipping the step at {where} ({self.nonfinite_skips} skipped so far).')
            return False
        raise FloatingPointError(f'Training stopped at {where}. Lower the learning rate or alpha, check the data, '
                                 'or set train.nonfinite: skip to skip such steps.')

    # ---------------------------------------------------------------- checkpoints
    def save(self, epoch, current_iter):
        """SRModel.save, refusing to write a network with NaN or inf weights."""
        for label, net in (('net_g', self.net_g), ('net_g_ema', getattr(self, 'net_g_ema', None))):
            if net is not None and not all(torch.isfinite(p).all() for p in self.get_bare_model(net).parameters()):
                raise FloatingPointError(f'{label} has non-finite weights at iter {current_iter}; not saving it. '
                                         'The last checkpoint on disk is still valid for --auto_resume.')
        super().save(epoch, current_iter)

    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """BasicSR's save_network, written atomically (no half-written .pth after a crash)."""
        nets = net if isinstance(net, list) else [net]
        param_keys = param_key if isinstance(param_key, list) else [param_key]
        save_dict = {}
        for net_, key in zip(nets, param_keys):
            state_dict = self.get_bare_model(net_).state_dict()
            save_dict[key] = OrderedDict((bare_key(k), v.cpu()) for k, v in state_dict.items())
        label = 'latest' if current_iter == -1 else current_iter
        atomic_torch_save(save_dict, osp.join(self.opt['path']['models'], f'{net_label}_{label}.pth'))

    @master_only
    def save_training_state(self, epoch, current_iter):
        """BasicSR's training state plus the phase and alpha schedule, written atomically."""
        if current_iter == -1:
            return
        phase = self.phase_at(current_iter)
        state = {
            'epoch': epoch,
            'iter': current_iter,
            'optimizers': [o.state_dict() for o in self.optimizers],
            'schedulers': [s.state_dict() for s in self.schedulers],
            'd2c': {
                'grad_scaler': self.grad_scaler.state_dict() if self.grad_scaler else None,
                'phase_index': phase.index,
                'phase_name': phase.name,
                'phases': [(p.name, p.iters) for p in self.phases],
                'alpha_schedule': self.alpha_schedule.state_dict() if self.alpha_schedule else None,
                'alpha': self.alpha_schedule(current_iter) if self.alpha_schedule else None,
            },
        }
        atomic_torch_save(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'))

    def resume_training(self, resume_state):
        saved = resume_state.get('d2c')
        if saved is not None:
            phases = [(p.name, p.iters) for p in self.phases]
            if [tuple(p) for p in saved['phases']] != phases:
                raise ValueError(f'D2CModel: the training state was saved with phases {saved["phases"]} but the '
                                 f'option file now has {phases}; resume with the original train.phases.')
            if self.grad_scaler is not None and saved.get('grad_scaler'):
                self.grad_scaler.load_state_dict(saved['grad_scaler'])
        super().resume_training(resume_state)

    # ------------------------------------------------------------------------ testing
    def test(self):
        net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g
        was_training = net.training
        net.eval()
        if self._val_forward is None:
            # a reduced val.precision that breaks an output (fp16 overflow) falls back to fp32 with a warning
            self._val_forward = GuardedForward(self.val_amp_dtype, self.channels_last, warn=get_root_logger().warning,
                                               hint='set val.precision: fp32 to skip the reduced-precision attempt')
        # float32 outputs whatever the forward ran in: metrics and images are computed in fp32
        self.output, self.branches, self.weights = self._val_forward(net, self.lq, return_branches=True)
        net.train(was_training)

    def _psnr_opt(self):
        """PSNR options of the first calculate_psnr metric (crop_border, test_y_channel), else the paper's."""
        for metric_opt in (self.opt['val'].get('metrics') or {}).values():
            if metric_opt.get('type') == 'calculate_psnr':
                return {k: v for k, v in metric_opt.items() if k in ('crop_border', 'test_y_channel')}
        return {'crop_border': self.opt['scale'], 'test_y_channel': True}

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        dataset_name = dataloader.dataset.opt['name']
        metrics_opt = self.opt['val'].get('metrics') or {}
        logger = get_root_logger()
        if self.is_train and self.current_phase is not None and self.current_phase.name == 'divergence':
            logger.info(f'Validation {dataset_name} at iter {current_iter} is in the divergence phase: the '
                        'convergence network is not trained yet, so the fused metrics are NOT the model\'s '
                        'score; judge the branches (psnr_branch*) and psnr_oracle until the convergence phase.')
        num_branch = self.get_bare_model(self.net_g).num_branch
        extra_names = [f'psnr_branch{i + 1}' for i in range(num_branch)] + ['psnr_oracle']
        psnr_opt = self._psnr_opt()
        totals = OrderedDict((name, 0.) for name in list(metrics_opt) + extra_names)
        pbar = tqdm(total=len(dataloader), unit='image') if self.opt['val'].get('pbar', False) else None

        count = scored = 0
        for val_data in dataloader:
            img_name = osp.splitext(osp.basename(val_data['lq_path'][0]))[0]
            self.feed_data(val_data)
            self.test()
            sr_img = tensor2img([self.output.detach().cpu()])
            if hasattr(self, 'gt'):
                gt = self.gt.detach().cpu()
                gt_img = tensor2img([gt])
                for name, metric_opt in metrics_opt.items():
                    totals[name] += calculate_metric({'img': sr_img, 'img2': gt_img}, metric_opt)
                branches = self.branches.detach().cpu()
                for i in range(num_branch):
                    totals[f'psnr_branch{i + 1}'] += calculate_psnr(tensor2img([branches[:, i]]), gt_img, **psnr_opt)
                oracle = oracle_fusion(branches, gt)
                totals['psnr_oracle'] += calculate_psnr(tensor2img([oracle]), gt_img, **psnr_opt)
                del self.gt
                scored += 1
            if save_img:
                self._save_visuals(sr_img, img_name, dataset_name, current_iter)
            del self.lq, self.output, self.branches, self.weights
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            count += 1
            if pbar is not None:
                pbar.update(1)
                pbar.set_description(f'Test {img_name}')
        if pbar is not None:
            pbar.close()

        if scored == 0:  # no ground truth: images only
            return
        self.metric_results = OrderedDict((name, value / scored) for name, value in totals.items())
        self._initialize_best_metric_results(dataset_name)
        for name in extra_names:  # BasicSR only makes records for the configured metrics
            self.best_metric_results[dataset_name].setdefault(name, dict(better='higher', val=-math.inf, iter=-1))
        for name, value in self.metric_results.items():
            self._update_best_metric_result(dataset_name, name, value, current_iter)
        self._log_validation_metric_values(current_iter, dataset_name, tb_logger)

    def _save_visuals(self, sr_img, img_name, dataset_name, current_iter):
        if self.opt['is_train']:
            save_dir = osp.join(self.opt['path']['visualization'], img_name)
            stem = f'{img_name}_{current_iter}'
        else:
            save_dir = osp.join(self.opt['path']['visualization'], dataset_name)
            stem = f'{img_name}_{self.opt["val"].get("suffix") or self.opt["name"]}'
        imwrite(sr_img, osp.join(save_dir, f'{stem}.png'))
        if self.opt['val'].get('save_branches', False):
            branches = self.branches.detach().cpu()
            for i in range(branches.size(1)):
                imwrite(tensor2img([branches[:, i]]), osp.join(save_dir, f'{stem}_branch{i + 1}.png'))
