"""D2C-SR architectures; importing this package registers them in BasicSR's ``ARCH_REGISTRY``.

What a checkpoint's tensors say about D2CNet is read beside it: :func:`infer_options` (and
``d2c_arch.d2c_arch.NOT_INFERABLE``, what cannot be read); ``d2c_arch.d2c_arch`` also holds
``state_dict_differences`` and ``upsampler_scale``.
"""
import d2c_compat

d2c_compat.apply()  # must run before the first ``import basicsr``

from .branch_util import BRANCH_REGISTRY, EDSRBranch, RCANBranch  # noqa: E402
from .d2c_arch import D2CNet, bare_key, default_options, infer_options, is_convergence_key  # noqa: E402

__all__ = [
    'D2CNet', 'BRANCH_REGISTRY', 'RCANBranch', 'EDSRBranch', 'bare_key', 'default_options', 'infer_options',
    'is_convergence_key'
]
