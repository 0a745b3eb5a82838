"""D2C-SR architectures; importing this package registers them in BasicSR's ``ARCH_REGISTRY``."""
import d2c_compat

d2c_compat.apply()  # must run before the first ``import basicsr``

from .branch_util import BRANCH_REGISTRY, EDSRBranch, RCANBranch  # noqa: E402
from .d2c_arch import (  # noqa: E402
                       NOT_INFERABLE,
                       D2CNet,
                       bare_key,
                       default_options,
                       infer_options,
                       is_convergence_key,
                       state_dict_differences,
                       upsampler_scale,
)

__all__ = [
    'D2CNet', 'BRANCH_REGISTRY', 'RCANBranch', 'EDSRBranch', 'NOT_INFERABLE', 'bare_key', 'default_options',
    'infer_options', 'is_convergence_key', 'state_dict_differences', 'upsampler_scale'
]
