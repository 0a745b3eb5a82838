"""What every model of this plugin needs and BasicSR's SRModel lacks, in one mixin.

Put it first among the bases, ``class MyModel(PluginModelMixin, SRModel)``, and call
:meth:`PluginModelMixin.setup_plugin_options` before ``super().__init__(opt)``. It gives:

* precision and memory layout from YAML: ``train.precision`` (autocast with a GradScaler for
  fp16), ``train.channels_last``, ``val.precision`` / ``val.channels_last`` (validation through a
  :class:`~d2c_utils.tile_util.GuardedForward` that falls back to fp32 on broken outputs);
* the non-finite-loss policy ``train.nonfinite: error | skip`` (all ranks skip together);
* weights-only, checked loading of ``path.pretrain_network_g`` through the project's one loader
  (:mod:`d2c_utils.checkpoint_util`), with one clear message when the weights do not fit;
* atomic saves of networks and training states, and no save of a network with NaN/inf weights;
* distributed training on CPU (gloo) as well as GPU, and any ``torch.optim`` optimizer by name.

Resuming on a CPU-only machine is handled by the entry points (:mod:`d2c_utils.entry_util`),
which map saved states onto the run's device.
"""
from os import path as osp

import torch
from torch.nn.parallel import DataParallel, DistributedDataParallel

from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from d2c_arch import bare_key
from d2c_utils.checkpoint_util import atomic_torch_save, load_checkpoint, load_weights
from d2c_utils.errors import UserError
from d2c_utils.precision_util import autocast, resolve_precision
from d2c_utils.tile_util import GuardedForward

NONFINITE_POLICIES = ('error', 'skip')


class PluginModelMixin:
    """Precision, robust saving/loading and the non-finite policy for a BasicSR model class.

    Attributes set by :meth:`setup_plugin_options`: ``channels_last`` (bool),
    ``train_amp_dtype`` / ``val_amp_dtype`` (torch dtype or None for fp32), ``grad_scaler``
    (GradScaler for fp16 training, else None), ``nonfinite_policy``, ``nonfinite_skips``.
    """

    # key of the model's own entries in a training state (see extra_training_state)
    training_state_key = 'plugin'

    def setup_plugin_options(self, opt):
        """Read the options this mixin handles; call before ``super().__init__(opt)``."""
        is_train = opt['is_train']
        train_opt = opt.get('train') or {}
        val_opt = opt.get('val') or {}
        policy = train_opt.get('nonfinite', 'error') if is_train else 'error'
        if policy not in NONFINITE_POLICIES:
            raise UserError(f'{type(self).__name__}: train.nonfinite={policy!r}; use one of {NONFINITE_POLICIES}.')
        self.nonfinite_policy = policy
        self.nonfinite_skips = 0
        device_type = 'cuda' if opt['num_gpu'] != 0 else 'cpu'
        # reduced precision and memory layout are options, not defaults: fp32 NCHW is BasicSR's behaviour
        self.channels_last = bool(train_opt.get('channels_last', False)) if is_train else \
            bool(val_opt.get('channels_last', False))
        self.train_amp_dtype = resolve_precision(train_opt.get('precision'), device_type) if is_train else None
        self.val_amp_dtype = resolve_precision(val_opt.get('precision'), device_type, purpose='infer')
        self._val_forward = None  # a GuardedForward, made at the first validation
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        self.grad_scaler = torch.amp.GradScaler('cuda') if self.train_amp_dtype == torch.float16 else None

    # ------------------------------------------------------------------------ devices
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

    def feed_data(self, data):
        super().feed_data(data)
        if self.channels_last:
            self.lq = self.lq.contiguous(memory_format=torch.channels_last)

    def train_autocast(self):
        """The autocast context of ``train.precision`` (a no-op for fp32)."""
        return autocast(self.device.type, self.train_amp_dtype)

    def val_forward(self):
        """The validation forward pass at ``val.precision``, falling back to fp32 on broken outputs."""
        if self._val_forward is None:
            self._val_forward = GuardedForward(
                self.val_amp_dtype,
                self.channels_last,
                warn=get_root_logger().warning,
                hint='set val.precision: fp32 to skip the reduced-precision attempt')
        return self._val_forward

    # ------------------------------------------------------------------------ optimisation
    def get_optimizer(self, optim_type, params, lr, **kwargs):
        """Any ``torch.optim`` optimizer by class name (BasicSR 1.4.2 knows only Adam)."""
        optim_cls = getattr(torch.optim, optim_type, None)
        if not (isinstance(optim_cls, type) and issubclass(optim_cls, torch.optim.Optimizer)):
            raise UserError(f'{type(self).__name__}: optim_g.type={optim_type!r} is not an optimizer in torch.optim.')
        return optim_cls(params, lr, **kwargs)

    def backward_and_step(self, loss, optimizers, clip_norm=0, params=None):
        """Backward pass and optimizer steps, through the GradScaler for fp16 training.

        With ``clip_norm`` > 0 the gradient norm of ``params`` is clipped to it before the steps
        (on unscaled gradients under fp16).
        """
        if self.grad_scaler is None:
            loss.backward()
        else:
            self.grad_scaler.scale(loss).backward()
        if clip_norm:
            if self.grad_scaler is not None:
                for optimizer in optimizers:
                    self.grad_scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        for optimizer in optimizers:
            if self.grad_scaler is None:
                optimizer.step()
            else:
                self.grad_scaler.step(optimizer)
        if self.grad_scaler is not None:
            self.grad_scaler.update()

    def loss_is_finite(self, loss_dict, where):
        """False (skip the step) or FloatingPointError when a loss part is NaN or inf.

        With ``train.nonfinite: skip`` the step is skipped and counted (``nonfinite_skips`` in
        the log); in distributed runs every rank skips when any rank saw a non-finite loss, so
        the ranks stay in step. Otherwise training stops, naming ``where`` (iteration, phase) and
        the part.
        """
        bad = [name for name, value in loss_dict.items() if not torch.isfinite(value).all()]
        if self.opt['dist']:
            flag = torch.tensor([float(bool(bad))], device=self.device)
            torch.distributed.all_reduce(flag)
            if flag.item() and not bad:
                bad = ['(another rank)']
        if not bad:
            return True
        where = f'{where}: non-finite {", ".join(bad)}'
        if self.nonfinite_policy == 'skip':
            self.nonfinite_skips += 1
            get_root_logger().warning(f'Skipping the step at {where} ({self.nonfinite_skips} skipped so far).')
            return False
        raise FloatingPointError(f'Training stopped at {where}. Lower the learning rate or alpha, check the data, '
                                 'or set train.nonfinite: skip to skip such steps.')

    # ------------------------------------------------------------------------ loading
    def load_network(self, net, load_path, strict=True, param_key='params'):
        """BasicSR's load_network through the project's loader: weights only, one clear mismatch message."""
        bare = self.get_bare_model(net)
        ckpt = load_checkpoint(load_path, what='a .pth written by training as path.pretrain_network_g')
        if param_key is not None and isinstance(ckpt, dict) and param_key not in ckpt and 'params' in ckpt:
            param_key = 'params'  # BasicSR's fall-back for checkpoints without params_ema
        info = load_weights(
            bare,
            ckpt,
            load_path,
            self.opt['network_g'],
            self.opt.get('opt_path') or 'the option file',
            param_key=param_key,
            strict=strict,
            param_key_option='path.param_key_g',
            hint='check tree_depth, tree_width, num_group, num_block, num_feat, upscale, or set '
            'path.strict_load_g: false to load what fits',
            # BasicSR's report of differing keys; it also drops the keys whose shapes differ
            report_loose=lambda state: self._print_different_keys_loading(net, state, strict))
        logger = get_root_logger()
        for line in info['warnings']:
            logger.warning(f'{load_path}: {line}')
        logger.info(f'Loading {load_path} [{info["param_key"]}] into {type(bare).__name__}.')

    # ------------------------------------------------------------------------ saving
    def check_finite_weights(self, current_iter):
        """FloatingPointError if net_g (or net_g_ema) has NaN or inf weights: such a network is not saved."""
        for label, net in (('net_g', self.net_g), ('net_g_ema', getattr(self, 'net_g_ema', None))):
            if net is not None and not all(torch.isfinite(p).all() for p in self.get_bare_model(net).parameters()):
                raise FloatingPointError(f'{label} has non-finite weights at iter {current_iter}; not saving it. '
                                         'The last checkpoint on disk is still valid for --auto_resume.')

    def save(self, epoch, current_iter):
        """The model's save, refusing to write a network with NaN or inf weights."""
        self.check_finite_weights(current_iter)
        super().save(epoch, current_iter)

    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """BasicSR's save_network, written atomically (no half-written .pth after a crash)."""
        nets = net if isinstance(net, list) else [net]
        param_keys = param_key if isinstance(param_key, list) else [param_key]
        save_dict = {}
        for net_, key in zip(nets, param_keys):
            state_dict = self.get_bare_model(net_).state_dict()
            save_dict[key] = {bare_key(k): v.cpu() for k, v in state_dict.items()}
        label = 'latest' if current_iter == -1 else current_iter
        atomic_torch_save(save_dict, osp.join(self.opt['path']['models'], f'{net_label}_{label}.pth'))

    def extra_training_state(self, current_iter):
        """The model's own entries of a training state (a dict of plain values); override to add."""
        return {}

    def check_resumed_state(self, saved):
        """Raise UserError if the model's saved entries do not fit the current options; override."""

    @master_only
    def save_training_state(self, epoch, current_iter):
        """BasicSR's training state plus the GradScaler and :meth:`extra_training_state`, written atomically."""
        if current_iter == -1:
            return
        extra = {'grad_scaler': self.grad_scaler.state_dict() if self.grad_scaler else None}
        extra.update(self.extra_training_state(current_iter))
        state = {
            'epoch': epoch,
            'iter': current_iter,
            'optimizers': [o.state_dict() for o in self.optimizers],
            'schedulers': [s.state_dict() for s in self.schedulers],
            self.training_state_key: extra,
        }
        atomic_torch_save(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'))

    def resume_training(self, resume_state):
        saved = resume_state.get(self.training_state_key)
        if saved is not None:
            self.check_resumed_state(saved)
            if self.grad_scaler is not None and saved.get('grad_scaler'):
                self.grad_scaler.load_state_dict(saved['grad_scaler'])
        super().resume_training(resume_state)
