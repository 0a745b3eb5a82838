"""What the plugin's architectures share: option checking with messages a user can act on, and
the block-chain-with-concatenated-fusion body of RDN and IMDN."""
import inspect

import torch
from torch import nn as nn

from d2c_utils.errors import UserError


def accepted_options(cls):
    """Names of the keyword options ``cls.__init__`` takes (``**kwargs`` catch-alls excluded)."""
    params = inspect.signature(cls.__init__).parameters
    return [
        name for name, p in params.items() if name != 'self' and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def reject_unknown_options(cls, unknown, where='network_g', hints=None):
    """Raise a one-line UserError for option keys ``cls`` does not take.

    BasicSR builds a network as ``cls(**network_g)``, so a key the class does not know
    would otherwise end in a bare ``TypeError: __init__() got an unexpected keyword argument``.

    Args:
        cls (type): The architecture (or branch) class.
        unknown (dict): The unexpected options (``**kwargs`` of its ``__init__``); nothing
            happens when empty.
        where (str): Where the options come from, for the message (``network_g``,
            ``network_g.branch_opt``).
        hints (dict[str, str] | None): Per key, a sentence saying where the key belongs.

    Raises:
        UserError: naming the first unknown key, the class, and the keys it accepts.
    """
    if not unknown:
        return
    key = sorted(unknown)[0]
    others = f' (and {len(unknown) - 1} more: {sorted(unknown)[1:]})' if len(unknown) > 1 else ''
    hint = (hints or {}).get(key, '')
    raise UserError(f'{where}: {cls.__name__} has no option {key!r}{others}; {hint}'
                    f'it accepts: {", ".join(accepted_options(cls))}.')


class ConcatFusionChain(nn.Module):
    """Blocks in a row whose outputs are all concatenated and fused: RDN's global feature fusion,
    IMDN's distillation concat. Subclasses set ``self.blocks`` (a ModuleList) and ``self.fusion``
    (``num_block * F`` channels -> ``F``).

    Shapes: ``(N, F, H, W)`` -> ``(N, F, H, W)``.
    """

    def forward(self, x):
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return self.fusion(torch.cat(outs, dim=1))
