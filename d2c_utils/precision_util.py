"""Choosing reduced precision (autocast) for training, validation and inference."""
import contextlib

import torch

PRECISIONS = ('fp32', 'bf16', 'fp16', 'auto')
_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def cpu_has_native_bf16():
    """True if this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 autocast pays off.

    Without it oneDNN emulates bf16 and autocast is usually slower than fp32.
    """
    capability = getattr(torch.backends.cpu, 'get_cpu_capability', lambda: '')()
    checks = [getattr(torch.cpu, name, None) for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported')]
    return any(check() for check in checks if check is not None) or 'AMX' in str(capability).upper()


def resolve_precision(precision, device_type, purpose='train'):
    """Map 'fp32' | 'bf16' | 'fp16' | 'auto' (or None) to an autocast dtype or None (plain fp32).

    'auto' on CPU: bf16 where the CPU supports it natively, else fp32. 'auto' on CUDA depends on
    ``purpose``: for 'train' bf16 where supported (fp32's range: no loss scaling), else fp16;
    for 'infer' fp16, whose 10-bit mantissa agrees better with fp32 than bf16's 7 bits (the
    inference path guards against fp16 overflow by falling back to fp32). fp16 on CPU is
    refused: it is emulated there and slower than fp32.
    """
    precision = 'fp32' if precision in (None, False, 'none') else precision
    if precision not in PRECISIONS:
        raise ValueError(f'precision {precision!r} is unknown; use one of {PRECISIONS}.')
    if precision == 'auto':
        if device_type == 'cuda' and purpose == 'infer':
            precision = 'fp16'
        elif device_type == 'cuda':
            precision = 'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
        else:
            precision = 'bf16' if cpu_has_native_bf16() else 'fp32'
    if precision == 'fp16' and device_type != 'cuda':
        raise ValueError('precision fp16 needs CUDA; use bf16 (or auto) on CPU.')
    if precision == 'bf16' and device_type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise ValueError('precision bf16: this GPU has no bf16 support (it needs compute capability 8.0 or newer); '
                         'use fp16 or auto.')
    return _DTYPES.get(precision)


def precision_name(dtype):
    """'fp32' for None, else 'bf16' / 'fp16' (for messages and logs)."""
    return {torch.bfloat16: 'bf16', torch.float16: 'fp16'}.get(dtype, 'fp32')


def autocast(device_type, dtype):
    """``torch.autocast`` for ``dtype``, or a no-op context for plain fp32 (``dtype`` None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)
