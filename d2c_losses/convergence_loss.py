from basicsr.losses.basic_loss import MSELoss
from basicsr.utils.registry import LOSS_REGISTRY


@LOSS_REGISTRY.register()
class ConvergenceLoss(MSELoss):
    """Convergence loss L2^C = ||I_SR - I_HR||_2 (paper Eq. 9).

    The mean squared error between the fused SR image and HR, exactly BasicSR's
    ``MSELoss``; registered under its own name so option files read like the paper and
    the two-phase model can tell the convergence loss apart.

    Args:
        loss_weight (float): Loss weight. Default: 1.0.
        reduction (str): 'none' | 'mean' | 'sum'. Default: 'mean'.

    Called as ``loss(sr, gt)`` with ``sr`` and ``gt`` of shape (N, C, H, W) in [0, 1].
    """
