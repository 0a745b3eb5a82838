"""Data sets of d2c-sr; importing this package registers them in BasicSR's ``DATASET_REGISTRY``."""
import d2c_compat

d2c_compat.apply()  # must run before the first ``import basicsr``

from .hr_image_dataset import HRImageDataset  # noqa: E402
from .unpaired_image_dataset import UnpairedImageDataset  # noqa: E402

__all__ = ['HRImageDataset', 'UnpairedImageDataset']
