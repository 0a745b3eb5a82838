import math
from collections import OrderedDict
from copy import deepcopy
from os import path as osp

import torch
from tqdm import tqdm

from basicsr.losses import build_loss
from basicsr.metrics import calculate_metric
from basicsr.metrics.psnr_ssim import calculate_psnr
from basicsr.models import lr_scheduler
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, imwrite, tensor2img
from basicsr.utils.registry import MODEL_REGISTRY
from d2c_arch import is_convergence_key
from d2c_utils.errors import UserError
from d2c_utils.eval_util import oracle_fusion
from .alpha_schedule import AlphaSchedule
from .model_mixin import PluginModelMixin
from .phase_schedule import TRAINED_PARTS, PhaseTag, parse_phases

# BasicSR's option names for its schedulers -> classes in basicsr.models.lr_scheduler
_SCHEDULER_ALIASES = {'MultiStepLR': 'MultiStepRestartLR'}


def check_options(opt):
    """Catch option mistakes that would otherwise fail late or silently, naming key and fix."""
    net_opt = opt.get('network_g') or {}
    scale = opt.get('scale')
    upscale = net_opt.get('upscale', 4)
    if scale is not None and upscale != scale:
        raise UserError(f'D2CModel: network_g.upscale={upscale} but scale={scale} (the data sets use scale); '
                        'make them equal.')
    for name, dataset in (opt.get('datasets') or {}).items():
        gt_size = dataset.get('gt_size')
        if gt_size is not None and scale and gt_size % scale:
            raise UserError(f'D2CModel: datasets.{name}.gt_size={gt_size} is not divisible by scale={scale}; '
                            f'use a multiple such as {gt_size - gt_size % scale or scale}.')


@MODEL_REGISTRY.register()
class D2CModel(PluginModelMixin, SRModel):
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

    training_state_key = 'd2c'

    def __init__(self, opt):
        check_options(opt)
        self.phases = parse_phases(opt) if opt['is_train'] else []
        self.current_phase = None
        self.setup_plugin_options(opt)
        super().__init__(opt)
        bare = self.get_bare_model(self.net_g)
        if not (hasattr(bare, 'diverge') and hasattr(bare, 'converge')):
            raise UserError(f'D2CModel: network_g.type={opt["network_g"]["type"]!r} is not a D2C network '
                            '(it needs diverge/converge); use type: D2CNet, or model_type: SRModel for other nets.')

    # ----------------------------------------------------------------------------- setup
    def init_training_settings(self):
        train_opt = self.opt['train']
        bare = self.get_bare_model(self.net_g)
        uses_divergence = any(p.name in ('divergence', 'joint') for p in self.phases)
        uses_convergence = any(p.name in ('convergence', 'joint') for p in self.phases)
        if uses_divergence:
            div_opt = deepcopy(train_opt.get('divergence_opt'))
            if not div_opt:
                raise UserError('D2CModel: a divergence or joint phase needs train.divergence_opt, e.g. '
                                '{type: DivergenceLoss, alpha: 2.0e-5, theta: 0.8, margin: [5.0e-5, 2.0e-5]}.')
            for key in ('tree_depth', 'tree_width'):
                net_value = getattr(bare, key)
                if div_opt.setdefault(key, net_value) != net_value:
                    raise UserError(f'D2CModel: train.divergence_opt.{key}={div_opt[key]} but network_g has '
                                    f'{key}={net_value}; remove the key or make them equal.')
            self.cri_div = build_loss(div_opt).to(self.device)
            self.alpha_schedule = AlphaSchedule.from_opt(self.cri_div.alpha, train_opt.get('alpha_schedule'))
        else:
            self.cri_div = None
            self.alpha_schedule = None
        if uses_convergence and not (train_opt.get('pixel_opt') or train_opt.get('perceptual_opt')):
            raise UserError('D2CModel: a convergence or joint phase needs train.pixel_opt (the convergence '
                            'loss, e.g. {type: ConvergenceLoss, loss_weight: 1.0}).')
        if not uses_convergence:
            # SRModel insists on a pixel or perceptual loss; with no convergence phase none is used
            train_opt.setdefault('pixel_opt', {'type': 'ConvergenceLoss'})
        super().init_training_settings()  # EMA, pixel/perceptual losses, our optimizers and schedulers

    def _named_parts(self):
        bare = self.get_bare_model(self.net_g)
        parts = {'divergence': [], 'convergence': []}
        for name, param in bare.named_parameters():
            parts['convergence' if is_convergence_key(name) else 'divergence'].append(param)
        return parts

    def setup_optimizers(self):
        parts = self._named_parts()
        for phase in self.phases:
            for part in TRAINED_PARTS[phase.name]:
                optim_opt = deepcopy(phase.optim_opt)
                optimizer = self.get_optimizer(optim_opt.pop('type'), parts[part], **optim_opt)
                phase.optimizers.append(optimizer)
                self.optimizers.append(optimizer)  # BaseModel saves and resumes this list

    def setup_schedulers(self):
        for phase in self.phases:
            if phase.scheduler_opt is None:
                raise UserError(f'D2CModel: phase {phase} has no scheduler and train.scheduler is not set.')
            scheduler_opt = deepcopy(phase.scheduler_opt)
            scheduler_type = scheduler_opt.pop('type')
            scheduler_cls = getattr(lr_scheduler, _SCHEDULER_ALIASES.get(scheduler_type, scheduler_type), None)
            if scheduler_cls is None:
                raise UserError(f'D2CModel: scheduler type {scheduler_type!r} of phase {phase} is unknown; use '
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
        trained = TRAINED_PARTS[phase.name]
        for part, params in self._named_parts().items():
            for param in params:
                param.requires_grad_(part in trained)
                if part not in trained:
                    param.grad = None  # leftovers of an earlier phase would only hold memory
        if self.opt['dist']:
            # DDP only reduces the parameters that required gradients when it was built, so a
            # frozen part costs neither a find_unused_parameters scan nor a reduction error
            self.net_g = self.model_to_device(self.get_bare_model(self.net_g))
        # train.compile: the trained parts changed, so compile the phase's forward passes afresh
        self.reset_compiled()
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
        super().optimize_parameters(current_iter)

    def optimize_micro_batch(self, current_iter):
        phase = self.current_phase
        alpha = None
        if self.cri_div is not None:
            alpha = self.alpha_schedule(current_iter)
            self.cri_div.alpha = alpha

        loss_dict = OrderedDict()
        net_g = self.training_forward(self.net_g)
        with self.train_autocast():
            if phase.name == 'divergence':
                branches = net_g(self.lq, stage='divergence')
            elif phase.name == 'convergence':
                with torch.no_grad():  # frozen: no graph, no activations kept
                    branches = net_g(self.lq, stage='divergence')
                self.output, _ = net_g(branches, stage='convergence')
            else:  # joint: one forward, the fusion sees detached predictions
                self.output, branches, _ = net_g(self.lq, return_branches=True, fuse_detached=True)
        # losses in fp32: the triplet term compares small distances that bf16 would round away
        l_total = 0
        if phase.name in ('divergence', 'joint'):
            l_total = l_total + self._divergence_losses(branches.float(), loss_dict)
        if phase.name in ('convergence', 'joint'):
            self.output = self.output.float()
            l_total = l_total + self._convergence_losses(loss_dict)
        if self.loss_is_finite(loss_dict, f'iter {current_iter}, phase {phase.name}'):
            self.backward_and_step(l_total, phase.optimizers)

        self.log_dict = OrderedDict(phase=PhaseTag(phase.index, phase.name))
        self.log_dict.update(self.reduce_loss_dict(loss_dict))
        if alpha is not None and phase.name != 'convergence':
            self.log_dict['alpha'] = alpha

    # ---------------------------------------------------------------- checkpoints
    def extra_training_state(self, current_iter):
        """The phase and the alpha schedule, saved with BasicSR's training state."""
        phase = self.phase_at(current_iter)
        return {
            'phase_index': phase.index,
            'phase_name': phase.name,
            'phases': [(p.name, p.iters) for p in self.phases],
            'alpha_schedule': self.alpha_schedule.state_dict() if self.alpha_schedule else None,
            'alpha': self.alpha_schedule(current_iter) if self.alpha_schedule else None,
        }

    def check_resumed_state(self, saved):
        phases = [(p.name, p.iters) for p in self.phases]
        if [tuple(p) for p in saved['phases']] != phases:
            raise UserError(f'D2CModel: the training state was saved with phases {saved["phases"]} but the '
                            f'option file now has {phases}; resume with the original train.phases.')

    # ------------------------------------------------------------------------ testing
    def test(self):
        net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g
        was_training = net.training
        net.eval()
        # float32 outputs whatever the forward ran in: metrics and images are computed in fp32; a reduced
        # val.precision that breaks an output (fp16 overflow) falls back to fp32 with a warning
        self.output, self.branches, self.weights = self.val_forward()(net, self.lq, return_branches=True)
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
