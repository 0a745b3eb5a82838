"""D2C-SR's training phases (paper Sec. 3.4): which part of D2CNet trains when, read from ``train.phases``."""
from copy import deepcopy

from d2c_utils.errors import UserError

PHASE_NAMES = ('divergence', 'convergence', 'joint')
# which parts of D2CNet a phase trains (the rest is frozen)
TRAINED_PARTS = {
    'divergence': ('divergence', ),
    'convergence': ('convergence', ),
    'joint': ('divergence', 'convergence'),
}


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


class PhaseTag(float):
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
        raise UserError('D2CModel: train.phases is missing. List the phases in order, e.g.\n'
                        '  phases:\n    - {name: divergence, iters: 1000}\n    - {name: convergence, iters: 200}')
    phases, start = [], 0
    for index, phase_opt in enumerate(phases_opt):
        name = phase_opt.get('name')
        if name not in PHASE_NAMES:
            raise UserError(f'D2CModel: train.phases[{index}].name={name!r} is unknown; use one of {PHASE_NAMES}.')
        iters = phase_opt.get('iters')
        if not isinstance(iters, int) or iters <= 0:
            raise UserError(f'D2CModel: train.phases[{index}].iters={iters!r} must be a positive integer.')
        unknown = sorted(set(phase_opt) - {'name', 'iters', 'optim_g', 'scheduler'})
        if unknown:
            raise UserError(f'D2CModel: train.phases[{index}] has unknown keys {unknown}; '
                            'allowed: name, iters, optim_g, scheduler.')
        optim_opt = deepcopy(phase_opt.get('optim_g', train_opt.get('optim_g')))
        scheduler_opt = deepcopy(phase_opt.get('scheduler', train_opt.get('scheduler')))
        if optim_opt is None:
            raise UserError(f'D2CModel: train.phases[{index}] ({name}) has no optim_g and train.optim_g is not set.')
        phases.append(Phase(index, name, start, iters, optim_opt, scheduler_opt))
        start += iters
    total_iter = int(train_opt['total_iter'])
    if start != total_iter:
        lengths = ' + '.join(str(p.iters) for p in phases)
        raise UserError(f'D2CModel: the phase lengths add up to {lengths} = {start}, but train.total_iter is '
                        f'{total_iter}; make them equal.')
    return phases
