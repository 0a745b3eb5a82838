"""D2C-SR losses; importing this package registers them in BasicSR's ``LOSS_REGISTRY``."""
import d2c_compat  # noqa: F401,I001  (before the first ``import basicsr``)

from .convergence_loss import ConvergenceLoss
from .divergence_loss import DivergenceLoss, common_parent_level

__all__ = ['DivergenceLoss', 'ConvergenceLoss', 'common_parent_level']
