"""d2c-sr's models; importing this package registers every network, loss, metric, data set and model with BasicSR."""
import d2c_compat

d2c_compat.apply()  # must run before the first ``import basicsr``

import d2c_arch  # noqa: E402,F401  (registers D2CNet, DAN, SDFlow)
import d2c_data  # noqa: E402,F401  (registers HRImageDataset, UnpairedImageDataset)
import d2c_losses  # noqa: E402,F401  (registers DivergenceLoss, ConvergenceLoss)
import d2c_metrics  # noqa: E402,F401  (registers the authors' metrics)
from .alpha_schedule import AlphaSchedule  # noqa: E402
from .d2c_model import D2CModel  # noqa: E402
from .d2c_realesrnet_model import D2CRealESRNetModel  # noqa: E402
from .dan_model import DANModel  # noqa: E402
from .model_mixin import PluginModelMixin  # noqa: E402
from .sdflow_model import SDFlowModel  # noqa: E402

__all__ = ['D2CModel', 'D2CRealESRNetModel', 'DANModel', 'AlphaSchedule', 'PluginModelMixin', 'SDFlowModel']
