"""Gradient accumulation (``train.accumulate: N``) in BasicSR's training loop.

One BasicSR iteration (``current_iter``) is one optimiser step made of N micro-batches drawn
from the loader, so ``total_iter``, the schedulers, EMA, logging, validation, checkpoints, the
non-finite policy and resuming all count optimiser steps, and the effective batch is
``batch_size_per_gpu x N x world size``. :func:`use_accumulating_loader` makes d2c-train's loop
hand the model :class:`MicroBatches`: the first micro-batch (a plain data dict, so every
``feed_data`` reads it as before) carrying the other N - 1 in ``rest``;
:class:`d2c_model.PluginModelMixin` feeds and trains them one after the other before stepping.
"""
import math

from .errors import UserError


class MicroBatches(dict):
    """A training batch (BasicSR's data dict) followed by ``rest``, the other micro-batches of the step."""

    def __init__(self, first, rest=()):
        super().__init__(first)
        self.rest = list(rest)


def accumulate_steps(opt):
    """``train.accumulate`` of an option dict (1 when absent); UserError unless an integer >= 1."""
    value = (opt.get('train') or {}).get('accumulate', 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f'train.accumulate={value!r}; use an integer >= 1 (micro-batches per optimiser step)')
    return value


class GroupedLoader:
    """Iterate a data loader in groups of ``n`` batches, each group one :class:`MicroBatches`.

    The last group of an epoch is shorter when the loader's length is not a multiple of ``n``
    (the step then averages over the micro-batches it has).
    """

    def __init__(self, loader, n):
        self.loader = loader
        self.n = n

    def __len__(self):
        return math.ceil(len(self.loader) / self.n)

    def __iter__(self):
        group = []
        for batch in self.loader:
            group.append(batch)
            if len(group) == self.n:
                yield MicroBatches(group[0], group[1:])
                group = []
        if group:
            yield MicroBatches(group[0], group[1:])

    def __getattr__(self, name):  # sampler, dataset, batch_size, ... of the wrapped loader
        return getattr(self.loader, name)


def use_accumulating_loader(train_module):
    """Make ``basicsr.train``'s ``create_train_val_dataloader`` group batches by ``train.accumulate``.

    BasicSR sizes its epoch loop from batches per epoch; with N micro-batches per iteration an
    epoch has N times fewer iterations, so the number of epochs is recomputed to reach
    ``total_iter``. With ``accumulate: 1`` (the default) nothing changes.
    """
    create = getattr(train_module.create_train_val_dataloader, '__wrapped__', train_module.create_train_val_dataloader)

    def create_train_val_dataloader(opt, logger):
        train_loader, train_sampler, val_loaders, total_epochs, total_iters = create(opt, logger)
        n = accumulate_steps(opt)
        if n > 1 and train_loader is not None:
            train_loader = GroupedLoader(train_loader, n)
            steps = max(1, len(train_loader))
            total_epochs = math.ceil(total_iters / steps)
            batch = opt['datasets']['train']['batch_size_per_gpu']
            logger.info(f'Gradient accumulation: {n} micro-batches of {batch} per optimiser step (effective batch '
                        f'{batch * n * opt.get("world_size", 1)}); one iteration = one optimiser step; {steps} '
                        f'steps per epoch, {total_epochs} epochs for {total_iters} iterations.')
        return train_loader, train_sampler, val_loaders, total_epochs, total_iters

    create_train_val_dataloader.__wrapped__ = create
    train_module.create_train_val_dataloader = create_train_val_dataloader
