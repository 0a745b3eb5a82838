"""``d2c-infer`` on an exported D2CNet with numpy, OpenCV and the runtime only: no torch, no basicsr.

:func:`run_exported` takes the parsed arguments of ``d2c-infer`` and runs them when the model is
an ONNX file written by ``d2c-export``, or a checkpoint whose export is already in the cache
(found by the checkpoint's bytes and the ``--opt`` file's ``network_g``, as
:func:`d2c_deploy.runtime_util.export_cached` keys it), and the backend is ONNX Runtime or OpenVINO
on the CPU. It returns None where it cannot (a checkpoint without a cached export or without
``--opt``, ``--backend torch``, CUDA, ``--compile``, ``--reference`` metrics, ``--fp16``): the tool
then takes its PyTorch-driven path, which exports and caches the model (or runs PyTorch).

Everything else is the PyTorch-driven path's: the same tiles and stitching, image kinds, outputs,
guard with its fp32 fall-back (:mod:`d2c_inference.array_infer_util`), messages and exit statuses.
Importing this module imports neither torch nor basicsr (``tests/test_deploy/test_torch_free.py``).
"""
import os
import sys

from d2c_inference.array_infer_util import GuardedRun, OutputOptions, run_images
from d2c_inference.registry import method_named, method_of_options
from d2c_utils.errors import UserError, report_user_error
from d2c_utils.option_check import read_option_file
from .runtime_util import (
    METHOD_RUNTIME_MODELS,
    cached_export_info,
    cached_export_path,
    default_cache_dir,
    onnx_method,
    open_runtime_model,
    select_backend,
)


def nvidia_gpu_present():
    """True if this machine shows an NVIDIA GPU (driver files), without importing torch.

    ``--device auto`` may then mean CUDA, which only torch can tell: such runs take the PyTorch-driven path.
    """
    return any(os.path.exists(p) for p in ('/proc/driver/nvidia/version', '/dev/nvidia0', '/dev/nvidiactl'))


def takes_exported_path(args):
    """True if nothing ``args`` asks for needs torch (apart from finding the model file; see :func:`exported_file`)."""
    if args.backend not in ('auto', 'onnxruntime', 'openvino') or args.device == 'cuda':
        return False
    if args.device == 'auto' and args.backend != 'openvino' and nvidia_gpu_present():
        return False
    # --reference: metrics through BasicSR (torch); --fp16: the old spelling's CPU warning; --compile: PyTorch
    return not (args.compile or args.fp16 or args.reference or args.perceptual)


def exported_file(args, outputs):
    """The ONNX file to run and what the loader said about its checkpoint, or None if torch is needed to get one.

    Args:
        args (Namespace): ``d2c-infer``'s arguments.
        outputs (str): 'fused', or 'all' when branches or weight maps are written.

    Returns:
        tuple[str, dict] | None: the file and ``opt_source``, ``param_key``, ``warnings``.
    """
    if args.model.lower().endswith('.onnx'):
        try:  # DAN's and SDFlow's runtime models take the PyTorch-driven path (their per-method code is torch's)
            if onnx_method(args.model) in METHOD_RUNTIME_MODELS:
                return None
        except UserError:  # a damaged file: the PyTorch-driven path says what is wrong
            return None
        return args.model, {'opt_source': f'{args.model} (exported)', 'param_key': None, 'warnings': []}
    cache_dir = default_cache_dir() if args.cache_dir is None else args.cache_dir
    if not (cache_dir and args.opt and os.path.isfile(args.model)):
        return None
    try:  # the loader's rule 1: the option file's network_g (checkpoint_util.option_file_network)
        opt = read_option_file(args.opt, flag='--opt', check=False)
        net_opt = dict(opt['network_g'])
        method = method_of_options(net_opt, args.opt)
        if not method.deployable or method.name in METHOD_RUNTIME_MODELS:
            return None
        path = cached_export_path(cache_dir, args.model, net_opt, args.param_key, outputs)
    except (UserError, OSError, TypeError, KeyError):  # the PyTorch-driven path says what is wrong
        return None
    info = cached_export_info(path) if os.path.isfile(path) else None
    if info is None:
        return None
    print(f'{args.prog}: exported model from the cache: {path}', file=sys.stderr)
    return path, info


def exported_precision(precision, model, warn):
    """The precision ('bf16' or None: fp32) ``--precision`` means for an exported model (as the PyTorch-driven path)."""
    if model.backend == 'onnxruntime':
        if precision in ('auto', 'fp32'):
            return None
        raise UserError(f'--precision {precision}: ONNX Runtime runs the precision the file was exported in '
                        f'({model.meta["precision"]}); use --precision auto or fp32, --backend openvino, or '
                        'd2c-export --precision fp16')
    if precision == 'auto':
        return model.default_precision
    if precision == 'fp16':
        raise UserError('--precision fp16: precision fp16 needs CUDA; use bf16 (or auto) on CPU.')
    if precision == 'bf16' and model.default_precision != 'bf16':
        warn('this CPU has no native bf16 (AVX512-BF16/AMX); bf16 is emulated and likely slower than '
             '--precision fp32')
    return 'bf16' if precision == 'bf16' else None


def run_exported(args, prog, warn, select_inputs):
    """Run ``d2c-infer`` without torch if it can be; its exit status, or None to take the PyTorch-driven path.

    Args:
        args (Namespace): ``d2c-infer``'s parsed arguments (``given``: the flags the user set).
        prog (str): 'd2c-infer', the prefix of messages.
        warn (callable): ``warn(message)`` for warnings.
        select_inputs (callable): ``select_inputs(args)`` -> the input files (the tool's own rule).
    """
    if not takes_exported_path(args):
        return None
    args.prog = prog
    need_branches = args.save_branches or args.save_weights
    try:
        backend, why = select_backend(args.backend, args.model, 'cpu')
        if backend == 'torch':
            return None
        found = exported_file(args, 'all' if need_branches else 'fused')
        if found is None:
            return None
        path, info = found
        method = method_named('D2CNet')  # what d2c-export writes
        method.refuse(args.given, args.model)
        inputs = select_inputs(args)
        cache_dir = default_cache_dir() if args.cache_dir is None else args.cache_dir
        try:
            model = open_runtime_model(path, backend, 'cpu', cache_dir, args.precision)
        except UserError:
            if path == args.model:
                raise
            return None  # a damaged cache entry: the PyTorch-driven path exports the checkpoint again
        if need_branches and not model.has_branches:
            raise UserError(f'{args.model} has only the fused output; --save-branches, --save-weights and --reference '
                            'need a file exported with d2c-export --outputs all')
        precision = exported_precision(args.precision, model, warn)
        if backend == 'openvino':
            model.compiled_for(precision)  # compiled (or loaded from OpenVINO's cache) now, timed in the log line
        for line in info['warnings']:
            warn(f'{args.model}: {line}')
        try:
            os.makedirs(args.output, exist_ok=True)
        except OSError as err:
            raise UserError(f'cannot create the output folder {args.output}: {err.strerror or err}') from None
    except UserError as err:
        return report_user_error(prog, err)
    tiling = f'tile {args.tile}, pad {args.tile_pad}' if args.tile else 'no tiling'
    weights = args.model + (f' [{info["param_key"]}]' if info.get('param_key') else '')
    prepared = f'{model.meta["precision"]} file, '
    if backend == 'openvino':
        source = 'loaded from the compiled-model cache' if model.compile_cached.get(precision) else 'compiled'
        prepared += f'{source} in {model.prepare_seconds:.2f} s'
    else:
        prepared += f'session in {model.prepare_seconds:.2f} s'
    print(f'{method.describe(model, args)}; weights {weights}; options {info["opt_source"]}; backend {backend} '
          f'({why}); cpu, {precision or "fp32"}, {prepared}; {tiling}; {len(inputs)} input(s) -> {args.output}')
    guard = GuardedRun(model, precision, warn)
    return run_images(inputs, model, guard, OutputOptions.from_namespace(args, inputs), prog, args.quiet)
