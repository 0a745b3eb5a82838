"""What every model of this plugin needs and BasicSR's SRModel lacks, in one mixin.

Put it first among the bases, ``class MyModel(PluginModelMixin, SRModel)``, and call
:meth:`PluginModelMixin.setup_plugin_options` before ``super().__init__(opt)``. It gives:

* precision and memory layout from YAML: ``train.precision`` (autocast with a GradScaler for
  fp16), ``train.channels_last``, ``val.precision`` / ``val.channels_last`` (validation through a
  :class:`~d2c_inference.tile_util.GuardedForward` that falls back to fp32 on broken outputs);
* the non-finite-loss policy ``train.nonfinite: error | skip | rollback`` (all ranks act together;
  ``rollback`` restores the last good in-memory state after ``train.rollback.after`` non-finite steps,
  see :mod:`d2c_model.rollback`);
* gradient accumulation ``train.accumulate: N``: one iteration is one optimiser step over N
  micro-batches (:mod:`d2c_utils.accumulate_util`); models write :meth:`optimize_micro_batch` and
  :meth:`feed_micro_batch`, and this mixin's :meth:`optimize_parameters` runs them N times, then
  steps, updates EMA and applies the non-finite policy once per step;
* ``train.compile`` (``torch.compile`` of the networks the training forward runs, eager fall-back
  with one warning): models call their networks through :meth:`training_forward`;
* ``logger.save_format: pth | safetensors`` for the network files (options and provenance in a
  safetensors file's metadata); training states stay BasicSR's ``.state``;
* weights-only, checked loading of ``path.pretrain_network_g`` through the project's one loader
  (:mod:`d2c_inference.checkpoint_util`), with one clear message when the weights do not fit;
* atomic saves of networks and training states, and no save of a network with NaN/inf weights;
* distributed training on CPU (gloo) as well as GPU, and any ``torch.optim`` optimizer by name.

Resuming on a CPU-only machine is handled by the entry points (:mod:`d2c_tools.pipeline_util`),
which map saved states onto the run's device.
"""
import contextlib
import datetime
import platform
from os import path as osp

import torch
from torch.nn.parallel import DataParallel, DistributedDataParallel

from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from d2c_arch import bare_key
from d2c_inference.checkpoint_util import (
    atomic_torch_save,
    existing_weights_file,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from d2c_inference.tile_util import GuardedForward
from d2c_utils.accumulate_util import MicroBatches, accumulate_steps
from d2c_utils.compile_util import CompiledCall, compile_options
from d2c_utils.errors import UserError
from d2c_utils.precision_util import autocast, resolve_precision
from .rollback import RollbackGuard, rollback_options

NONFINITE_POLICIES = ('error', 'skip', 'rollback')
SAVE_FORMATS = ('pth', 'safetensors')
# networks a model of ours may train (saved in snapshots, unsynchronised during accumulation)
NETWORK_ATTRS = ('net_g', 'net_g_ema', 'net_d')


class PluginModelMixin:
    """Precision, robust saving/loading and the non-finite policy for a BasicSR model class.

    Attributes set by :meth:`setup_plugin_options`: ``channels_last`` (bool),
    ``train_amp_dtype`` / ``val_amp_dtype`` (torch dtype or None for fp32), ``grad_scaler``
    (GradScaler for fp16 training, else None), ``nonfinite_policy``, ``nonfinite_skips`` (steps
    skipped so far), ``accumulate`` (micro-batches per step), ``compile_options`` (None: eager),
    ``save_format`` ('pth' | 'safetensors'), ``rollback`` (a RollbackGuard, or None).
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
        self.rollback = RollbackGuard(rollback_options(train_opt)) if policy == 'rollback' else None
        if policy != 'rollback' and is_train and train_opt.get('rollback') is not None:
            raise UserError(f'{type(self).__name__}: train.rollback is set but train.nonfinite is {policy!r}; set '
                            'train.nonfinite: rollback or remove train.rollback.')
        self.accumulate = accumulate_steps(opt) if is_train else 1
        self.compile_options = compile_options(train_opt.get('compile')) if is_train else None
        self._compiled = {}  # id(net) -> (net, CompiledCall)
        self._warned = set()
        self._micro_index, self._micro_count = 0, 1
        self._rest_micro_batches, self._fed_group = [], False
        self._step_ok, self._step_problem = True, None
        self.save_format = (opt.get('logger') or {}).get('save_format', 'pth')
        if self.save_format not in SAVE_FORMATS:
            raise UserError(f'{type(self).__name__}: logger.save_format={self.save_format!r}; use one of '
                            f'{SAVE_FORMATS}.')
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
                # DDP broadcasts buffers through one flat bucket and refuses to copy back into a
                # channels_last (1, C, 1, 1) buffer (D2CNet's mean): buffers keep the NCHW layout
                for module in net.modules():
                    for name, buf in module._buffers.items():
                        if buf is not None and buf.dim() == 4:
                            module._buffers[name] = buf.clone(memory_format=torch.contiguous_format)
        if self.opt['dist']:
            device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
            net = DistributedDataParallel(
                net, device_ids=device_ids, find_unused_parameters=self.opt.get('find_unused_parameters', False))
        elif self.opt['num_gpu'] > 1:
            net = DataParallel(net)
        return net

    def feed_data(self, data):
        """Feed a batch; of a :class:`MicroBatches`, the other micro-batches wait for :meth:`optimize_parameters`."""
        self._fed_group = isinstance(data, MicroBatches)
        self._rest_micro_batches = list(data.rest) if self._fed_group else []
        self.feed_micro_batch(data)

    def feed_micro_batch(self, data):
        """Put one data dict on the device (``self.lq``, ``self.gt``); models that make their own data override."""
        super().feed_data(data)
        if self.channels_last:
            self.lq = self.lq.contiguous(memory_format=torch.channels_last)

    # ------------------------------------------------------------------------ compile
    def warn_once(self, message):
        if message not in self._warned:
            self._warned.add(message)
            get_root_logger().warning(message)

    def training_forward(self, net):
        """``net`` as the training forward should call it: compiled with ``train.compile``, else ``net`` itself.

        The compiled callable is made once per network object; :meth:`reset_compiled` drops them
        (D2CModel does at a phase switch, where the trained parts change).
        """
        if self.compile_options is None:
            return net
        entry = self._compiled.get(id(net))
        if entry is None or entry[0] is not net:
            name = type(self.get_bare_model(net)).__name__
            entry = (net, CompiledCall(net, self.compile_options, self.warn_once, name=name))
            self._compiled[id(net)] = entry
        return entry[1]

    def reset_compiled(self):
        """Forget the compiled networks; the next :meth:`training_forward` compiles afresh."""
        self._compiled = {}

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

    def optimize_parameters(self, current_iter):
        """One optimiser step: ``train.accumulate`` micro-batches, then EMA and the non-finite policy.

        The first micro-batch was fed by the training loop (:meth:`feed_data`); the others are fed
        here. Gradients are zeroed once, each micro-batch's loss is divided by their number in
        :meth:`backward_and_step` (the mean over the whole step's batch), and the optimisers step
        after the last one; under DDP the gradients are reduced only then. A non-finite loss in
        any micro-batch skips the whole step.
        """
        rest = self._rest_micro_batches
        self._rest_micro_batches = []
        if self.accumulate > 1 and not self._fed_group:
            raise UserError(
                f'train.accumulate={self.accumulate} needs d2c-train\'s loop, which draws the micro-batches '
                'of every step from the loader; basicsr/train.py feeds one batch per iteration')
        if self.rollback is not None and not self.rollback.has_snapshot:
            self.rollback.take_snapshot(self, current_iter - 1)  # the starting (or resumed) state
        count = 1 + len(rest)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self._step_ok, self._step_problem = True, None
        logs = []
        for index in range(count):
            if index:
                self.feed_micro_batch(rest[index - 1])
            self._micro_index, self._micro_count = index, count
            with self._gradient_sync(index == count - 1):
                self.optimize_micro_batch(current_iter)
            logs.append(dict(getattr(self, 'log_dict', None) or {}))
            if not self._step_ok:
                break
        self._micro_index, self._micro_count = 0, 1
        self.log_dict = mean_log(logs)
        self._end_step(current_iter)

    def optimize_micro_batch(self, current_iter):
        """Forward, losses and :meth:`backward_and_step` of the fed micro-batch; every model writes it."""
        raise NotImplementedError

    def _gradient_sync(self, last):
        """DDP's no_sync on every wrapped network except at the step's last micro-batch."""
        stack = contextlib.ExitStack()
        if not last:
            for name in NETWORK_ATTRS:
                net = getattr(self, name, None)
                if isinstance(net, DistributedDataParallel):
                    stack.enter_context(net.no_sync())
        return stack

    def _end_step(self, current_iter):
        if self._step_ok:
            if self.ema_decay > 0:
                self.model_ema(decay=self.ema_decay)
            if self.rollback is not None:
                self.rollback.good_step(self, current_iter)
        else:
            for optimizer in self.optimizers:  # nothing of the skipped step may leak into the next
                optimizer.zero_grad(set_to_none=True)
            self.nonfinite_skips += 1
            get_root_logger().warning(f'Skipping the step at {self._step_problem} ({self.nonfinite_skips} skipped so '
                                      'far).')
            if self.rollback is not None:
                self.rollback.bad_step(self, current_iter, self._step_problem)
        if self.nonfinite_skips:
            self.log_dict['nonfinite_skips'] = float(self.nonfinite_skips)
        if self.rollback is not None and self.rollback.count:
            self.log_dict['rollbacks'] = float(self.rollback.count)

    def backward_and_step(self, loss, optimizers, clip_norm=0, params=None):
        """Backward pass and, at the step's last micro-batch, the optimizer steps (through the GradScaler for fp16).

        With ``train.accumulate: N`` the loss is divided by the number of micro-batches of the
        step, so the accumulated gradient is that of the mean loss over all of them. With
        ``clip_norm`` > 0 the gradient norm of ``params`` is clipped to it before the steps (on
        unscaled, accumulated gradients under fp16).
        """
        if self._micro_count > 1:
            loss = loss / self._micro_count
        if self.grad_scaler is None:
            loss.backward()
        else:
            self.grad_scaler.scale(loss).backward()
        if self._micro_index < self._micro_count - 1:
            return
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

        With ``train.nonfinite: skip`` or ``rollback`` the whole optimiser step is skipped and
        counted (``nonfinite_skips`` in the log); in distributed runs every rank skips when any
        rank saw a non-finite loss, so the ranks stay in step. With ``error`` training stops,
        naming ``where`` (iteration, phase) and the part.
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
        if self._micro_count > 1:
            where += f' (micro-batch {self._micro_index + 1} of {self._micro_count})'
        if self.nonfinite_policy in ('skip', 'rollback'):
            self._step_ok, self._step_problem = False, where
            return False
        raise FloatingPointError(f'Training stopped at {where}. Lower the learning rate or alpha, check the data, '
                                 'or set train.nonfinite: skip (or rollback) to skip such steps.')

    # ------------------------------------------------------------------------ loading
    def load_network(self, net, load_path, strict=True, param_key='params'):
        """BasicSR's load_network through the project's loader: weights only, one clear mismatch message."""
        bare = self.get_bare_model(net)
        # BasicSR's resume names net_g_<iter>.pth; with logger.save_format: safetensors the file is .safetensors
        load_path = existing_weights_file(load_path)
        ckpt = load_checkpoint(load_path, what='a .pth or .safetensors written by training as path.pretrain_network_g')
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
    def nonfinite_networks(self):
        """Names of the networks (net_g, net_g_ema, net_d) with NaN or inf weights on any rank."""
        bad = [
            name for name in NETWORK_ATTRS if getattr(self, name, None) is not None and not all(
                torch.isfinite(p).all() for p in self.get_bare_model(getattr(self, name)).parameters())
        ]
        if self.opt.get('dist'):
            flags = torch.tensor([float(name in bad) for name in NETWORK_ATTRS], device=self.device)
            torch.distributed.all_reduce(flags)
            bad = [name for name, flag in zip(NETWORK_ATTRS, flags.tolist()) if flag]
        return bad

    def check_finite_weights(self, current_iter):
        """FloatingPointError if a network has NaN or inf weights: such a network is not saved.

        With ``train.nonfinite: rollback`` the last good state is restored instead (counted as a
        roll-back), and that is what gets saved.
        """
        bad = self.nonfinite_networks()
        if bad and self.rollback is not None:
            self.rollback.roll_back(self, current_iter, f'non-finite weights in {", ".join(bad)} before saving')
            bad = self.nonfinite_networks()
        if bad:
            raise FloatingPointError(f'{bad[0]} has non-finite weights at iter {current_iter}; not saving it. '
                                     'The last checkpoint on disk is still valid for --auto_resume.')

    def save(self, epoch, current_iter):
        """The model's save, refusing to write a network with NaN or inf weights."""
        self.check_finite_weights(current_iter)
        super().save(epoch, current_iter)

    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """BasicSR's save_network, written atomically (no half-written file after a crash).

        ``logger.save_format: safetensors`` writes ``<label>_<iter>.safetensors`` instead of
        ``.pth``: the same ``params`` / ``params_ema`` state dicts, plus the network's options
        (``network_g``, so d2c-infer needs no --opt) and the run's options and provenance in the
        metadata (see :func:`d2c_inference.checkpoint_util.save_checkpoint`).
        """
        nets = net if isinstance(net, list) else [net]
        param_keys = param_key if isinstance(param_key, list) else [param_key]
        save_dict = {}
        for net_, key in zip(nets, param_keys):
            state_dict = self.get_bare_model(net_).state_dict()
            save_dict[key] = {bare_key(k): v.cpu() for k, v in state_dict.items()}
        label = 'latest' if current_iter == -1 else current_iter
        path = osp.join(self.opt['path']['models'], f'{net_label}_{label}.{self.save_format}')
        if self.save_format == 'pth':
            atomic_torch_save(save_dict, path)  # BasicSR's own layout, nothing added
            return
        # network_g is the key every loader of ours reads a generator's options from (net_d: network_d)
        opt_key = net_label.replace('net_', 'network_', 1)
        if self.opt.get(opt_key):
            save_dict[opt_key] = dict(self.opt[opt_key])
        save_checkpoint(save_dict, path, metadata={'options': self.opt, 'provenance': self._provenance(current_iter)})

    def _provenance(self, current_iter):
        from importlib import metadata
        versions = {}
        for dist in ('d2c-sr', 'basicsr', 'torch'):
            try:
                versions[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                versions[dist] = None
        return {
            'written_by': 'd2c-sr training',
            'model_type': type(self).__name__,
            'name': self.opt.get('name'),
            'iter': current_iter,
            'time_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'python': platform.python_version(),
            'versions': versions,
        }

    def extra_training_state(self, current_iter):
        """The model's own entries of a training state (a dict of plain values); override to add."""
        return {}

    def check_resumed_state(self, saved):
        """Raise UserError if the model's saved entries do not fit the current options; override."""

    def restore_extra_state(self, saved):
        """Restore what :meth:`extra_training_state` saved (random generators, ...); override with it.

        Called when resuming and when rolling back to the last good state.
        """

    @master_only
    def save_training_state(self, epoch, current_iter):
        """BasicSR's training state plus the GradScaler and :meth:`extra_training_state`, written atomically."""
        if current_iter == -1:
            return
        extra = {'grad_scaler': self.grad_scaler.state_dict() if self.grad_scaler else None}
        extra['nonfinite'] = {'skips': self.nonfinite_skips, 'rollbacks': self.rollback.count if self.rollback else 0}
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
            counts = saved.get('nonfinite') or {}
            self.nonfinite_skips = counts.get('skips', 0)
            if self.rollback is not None:
                self.rollback.count = counts.get('rollbacks', 0)
            self.restore_extra_state(saved)
        super().resume_training(resume_state)


def mean_log(logs):
    """One log of a step from its micro-batches' logs: plain floats averaged, anything else from the last."""
    if len(logs) <= 1:
        return dict(logs[0]) if logs else {}
    merged = dict(logs[-1])
    for key, value in merged.items():
        values = [log[key] for log in logs if type(log.get(key)) is float]
        if type(value) is float and values:
            merged[key] = sum(values) / len(values)
    return merged
