"""Data sets of d2c-sr; importing this package registers them in BasicSR's ``DATASET_REGISTRY``."""
import d2c_compat  # noqa: F401,I001  (before the first ``import basicsr``)

from .hr_image_dataset import HRImageDataset
from .unpaired_image_dataset import UnpairedImageDataset

__all__ = ['HRImageDataset', 'UnpairedImageDataset']
