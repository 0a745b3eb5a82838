"""d2c-sr's models; importing this package registers every network, loss, metric, data set and model with BasicSR."""
import d2c_arch  # noqa: F401  (registers D2CNet, DAN, SDFlow)
import d2c_data  # noqa: F401  (registers HRImageDataset, UnpairedImageDataset)
import d2c_losses  # noqa: F401  (registers DivergenceLoss, ConvergenceLoss)
import d2c_metrics  # noqa: F401  (registers the authors' metrics)
from .alpha_schedule import AlphaSchedule
from .d2c_model import D2CModel
from .d2c_realesrnet_model import D2CRealESRNetModel
from .dan_model import DANModel
from .model_mixin import PluginModelMixin
from .sdflow_model import SDFlowModel

__all__ = ['D2CModel', 'D2CRealESRNetModel', 'DANModel', 'AlphaSchedule', 'PluginModelMixin', 'SDFlowModel']
