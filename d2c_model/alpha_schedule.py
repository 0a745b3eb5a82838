"""The divergence weight alpha as a function of the training iteration."""

# keys of train.alpha_schedule in the option file
SCHEDULE_KEYS = ('start_iter', 'period', 'active_iters', 'decay_every', 'decay_factor')


class AlphaSchedule:
    """When the triplet term of the divergence loss is on, and how strongly.

    Mirrors the authors' epoch-based schedule in iterations (at batch 4 on RealSR one
    epoch is about 115 iterations): alpha is 0 before ``start_iter``; from then on it is
    on for the first ``active_iters`` of every ``period`` iterations, and its value, the
    DivergenceLoss' ``alpha``, is multiplied by ``decay_factor`` every ``decay_every``
    iterations (counted from iteration 0). Without a schedule alpha is constant.

    The schedule is a pure function of the global iteration, so a resumed run gets the
    same alpha as an uninterrupted one.

    Args:
        base_alpha (float): alpha of the divergence loss.
        start_iter (int): First iteration with alpha > 0. Default: 0.
        period (int | None): Length of one on/off cycle; None: always on after start.
        active_iters (int | None): Iterations on at the start of every cycle.
        decay_every (int | None): Decay interval; None: no decay.
        decay_factor (float): Multiplier per decay interval. Default: 0.5.
    """

    def __init__(self, base_alpha, start_iter=0, period=None, active_iters=None, decay_every=None, decay_factor=0.5):
        if period is not None and (active_iters is None or not 0 < active_iters <= period):
            raise ValueError(f'train.alpha_schedule: active_iters={active_iters!r} must lie in (0, period={period}].')
        if decay_every is not None and decay_every <= 0:
            raise ValueError(f'train.alpha_schedule: decay_every={decay_every!r} must be positive (or omitted).')
        self.base_alpha = base_alpha
        self.start_iter = start_iter
        self.period = period
        self.active_iters = active_iters
        self.decay_every = decay_every
        self.decay_factor = decay_factor

    @classmethod
    def from_opt(cls, base_alpha, schedule_opt):
        """Build from the ``train.alpha_schedule`` dict (or None for a constant alpha)."""
        schedule_opt = dict(schedule_opt or {})
        unknown = sorted(set(schedule_opt) - set(SCHEDULE_KEYS))
        if unknown:
            raise ValueError(f'train.alpha_schedule: unknown keys {unknown}; known keys: {list(SCHEDULE_KEYS)}.')
        return cls(base_alpha, **schedule_opt)

    def __call__(self, current_iter):
        """alpha at 1-based iteration ``current_iter``."""
        if current_iter < self.start_iter:
            return 0.
        if self.period is not None and (current_iter - self.start_iter) % self.period >= self.active_iters:
            return 0.
        alpha = self.base_alpha
        if self.decay_every is not None:
            alpha *= self.decay_factor**(current_iter // self.decay_every)
        return alpha

    def state_dict(self):
        return dict(
            base_alpha=self.base_alpha,
            start_iter=self.start_iter,
            period=self.period,
            active_iters=self.active_iters,
            decay_every=self.decay_every,
            decay_factor=self.decay_factor)
