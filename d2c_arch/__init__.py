"""D2C-SR architectures; importing this package registers them in BasicSR's ``ARCH_REGISTRY``.

D2CNet (d2cnet_arch.py) with one branch module per backbone (branch_util.py) and per-leaf tails
(upsample_util.py); the Table 3 originals BasicSR lacks: VDSR, RDN, IMDN; DANv2 for blind SR
(dan_arch.py); SDFlow for unpaired SR and downscaling (sdflow_arch.py, its flow layers in
flow_util.py). What a checkpoint's tensors say about D2CNet is read beside it: :func:`infer_options` (and
``d2c_arch.d2cnet_arch.NOT_INFERABLE``, what cannot be read).
"""
import d2c_compat  # noqa: F401,I001  (before the first ``import basicsr``)

from .branch_util import BRANCH_REGISTRY, EDSRBranch, RCANBranch
from .d2cnet_arch import D2CNet, bare_key, default_options, infer_options, is_convergence_key
from .dan_arch import DAN, infer_dan_options
from .imdn_arch import IMDN
from .rdn_arch import RDN
from .sdflow_arch import SDFlow, infer_sdflow_options
from .vdsr_arch import VDSR

# every branch type (SRResNetBranch, RRDBBranch, SwinIRBranch, RDNBranch, IMDNBranch, VDSRBranch, ...) is in
# BRANCH_REGISTRY and d2c_arch.branch_util
__all__ = [
    'D2CNet', 'BRANCH_REGISTRY', 'RCANBranch', 'EDSRBranch', 'VDSR', 'RDN', 'IMDN', 'bare_key', 'default_options',
    'infer_options', 'is_convergence_key', 'DAN', 'infer_dan_options', 'SDFlow', 'infer_sdflow_options'
]
