"""``train.nonfinite: rollback``: go back to the last good state after repeated non-finite steps.

DANv2's users meet NaN losses after tens of thousands of iterations and are told to resume from
the last good checkpoint by hand; this does it in the run. Every ``train.rollback.every``
optimiser steps whose weights are all finite, an in-memory snapshot is taken (on the CPU, so it
costs no GPU memory): the networks (``net_g``, ``net_g_ema``, ``net_d``), the optimisers'
states, the GradScaler and the model's own state (:meth:`PluginModelMixin.extra_training_state`:
D2C's alpha schedule, DAN's kernel sampler, SDFlow's noise generator). After ``after``
consecutive non-finite steps (each one skipped, as with ``skip``), or when a snapshot or a save
finds non-finite weights, the snapshot is loaded back, the learning rates are multiplied by
``lr_factor`` and it is logged; after ``max`` roll-backs training stops with FloatingPointError.

The iteration counter (BasicSR's ``current_iter``) does not go back, so the learning-rate
schedule stays where the counter is: the schedulers are not rewound, the restored optimisers get
the schedule's current rates (times ``lr_factor``), and the schedulers' base rates are scaled too,
so later milestones, restarts and warm-ups keep the reduction. Under DDP every rank sees the same
agreed non-finite decisions (:meth:`PluginModelMixin.loss_is_finite` all-reduces them) and the same
weights, so all ranks roll back together at the same step.
"""
import copy

import torch

from basicsr.utils import get_root_logger
from d2c_utils.errors import UserError

ROLLBACK_DEFAULTS = {'after': 3, 'max': 5, 'lr_factor': 0.5, 'every': 100}


def rollback_options(train_opt):
    """``train.rollback`` with its defaults; UserError naming the key for a bad value.

    Keys: ``after`` (consecutive non-finite steps that trigger a roll-back, >= 1), ``max`` (roll-backs
    before training stops, >= 1), ``lr_factor`` (multiplier of every learning rate at a roll-back,
    in (0, 1]; 1 keeps them), ``every`` (optimiser steps between snapshots of the last good state, >= 1).
    """
    given = train_opt.get('rollback') or {}
    if not isinstance(given, dict):
        raise UserError(f'train.rollback={given!r}; use a mapping such as {ROLLBACK_DEFAULTS}')
    unknown = sorted(set(given) - set(ROLLBACK_DEFAULTS))
    if unknown:
        raise UserError(f'train.rollback: unknown keys {unknown}; known: {list(ROLLBACK_DEFAULTS)}')
    opt = dict(ROLLBACK_DEFAULTS, **given)
    for key in ('after', 'max', 'every'):
        if isinstance(opt[key], bool) or not isinstance(opt[key], int) or opt[key] < 1:
            raise UserError(f'train.rollback.{key}={opt[key]!r}; use an integer >= 1')
    factor = opt['lr_factor']
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise UserError(f'train.rollback.lr_factor={factor!r}; use a number in (0, 1] (1 keeps the learning rate)')
    return opt


def _to_cpu(obj):
    """A deep copy of ``obj`` with every tensor cloned onto the CPU."""
    if torch.is_tensor(obj):
        return obj.detach().to('cpu', copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


class RollbackGuard:
    """The last good state of a model and the roll-back bookkeeping (see the module docstring).

    Attributes:
        count (int): Roll-backs so far (saved in the training state, so ``max`` spans resumes).
        streak (int): Consecutive non-finite steps.
        snapshot_iter (int | None): The iteration the snapshot was taken after.
    """

    def __init__(self, options):
        self.options = options
        self.count = 0
        self.streak = 0
        self.steps = 0
        self.snapshot = None
        self.snapshot_iter = None

    @property
    def has_snapshot(self):
        return self.snapshot is not None

    # ------------------------------------------------------------------ snapshots
    def take_snapshot(self, model, current_iter):
        """Keep the model's state after iteration ``current_iter`` as the last good one."""
        nets = {}
        for name in ('net_g', 'net_g_ema', 'net_d'):
            net = getattr(model, name, None)
            if net is not None:
                nets[name] = _to_cpu(model.get_bare_model(net).state_dict())
        self.snapshot = {
            'nets': nets,
            'optimizers': [_to_cpu(o.state_dict()) for o in model.optimizers],
            'grad_scaler': _to_cpu(model.grad_scaler.state_dict()) if model.grad_scaler is not None else None,
            'extra': _to_cpu(model.extra_training_state(max(current_iter, 1))),
        }
        self.snapshot_iter = current_iter

    def good_step(self, model, current_iter):
        """After a finite step: every ``every`` steps, refresh the snapshot if the weights are finite."""
        self.streak = 0
        self.steps += 1
        if self.steps % self.options['every']:
            return
        bad = model.nonfinite_networks()
        if bad:
            self.roll_back(model, current_iter, f'non-finite weights in {", ".join(bad)}')
        else:
            self.take_snapshot(model, current_iter)

    def bad_step(self, model, current_iter, problem):
        """After a skipped step: roll back when ``after`` of them came in a row."""
        self.streak += 1
        if self.streak >= self.options['after']:
            self.roll_back(model, current_iter, f'{self.streak} consecutive non-finite steps (last: {problem})')

    # ------------------------------------------------------------------ restoring
    def roll_back(self, model, current_iter, reason):
        """Load the snapshot into ``model``, lower the learning rates, log it; FloatingPointError after ``max``."""
        limit = self.options['max']
        if self.count >= limit:
            raise FloatingPointError(
                f'Training stopped at iter {current_iter}: {reason}, and train.rollback.max={limit} roll-backs are '
                'used up. Lower the learning rate, check the data, or raise train.rollback.max; the last checkpoint '
                'on disk is still valid for --auto_resume.')
        snap = self.snapshot
        for name, state in snap['nets'].items():
            model.get_bare_model(getattr(model, name)).load_state_dict(state)
        factor = self.options['lr_factor']
        for optimizer, state in zip(model.optimizers, snap['optimizers']):
            # the schedule follows the iteration counter, which does not go back: keep its current rates
            current = [(group['lr'], group.get('initial_lr')) for group in optimizer.param_groups]
            optimizer.load_state_dict(state)
            for group, (lr, initial_lr) in zip(optimizer.param_groups, current):
                group['lr'] = lr * factor
                if initial_lr is not None:
                    group['initial_lr'] = initial_lr * factor
            optimizer.zero_grad(set_to_none=True)
        if factor != 1:
            for scheduler in model.schedulers:
                if hasattr(scheduler, 'base_lrs'):
                    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if snap['grad_scaler'] is not None:
            model.grad_scaler.load_state_dict(snap['grad_scaler'])
        model.restore_extra_state(_to_cpu(snap['extra']))
        self.count += 1
        self.streak = 0
        lrs = model.get_current_learning_rate()
        get_root_logger().warning(
            f'Rolling back at iter {current_iter}: {reason}. Restored the state after iter {self.snapshot_iter} '
            f'(networks, optimisers, GradScaler, model state); learning rate x{factor} -> '
            f'{", ".join(f"{lr:.3e}" for lr in lrs)} (roll-back {self.count} of at most {limit}).')
