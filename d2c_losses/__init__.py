"""D2C-SR losses; importing this package registers them in BasicSR's ``LOSS_REGISTRY``."""
import d2c_compat

d2c_compat.apply()  # must run before the first ``import basicsr``

from .convergence_loss import ConvergenceLoss  # noqa: E402
from .divergence_loss import DivergenceLoss, common_parent_level  # noqa: E402

__all__ = ['DivergenceLoss', 'ConvergenceLoss', 'common_parent_level']
