"""Exported D2CNets run by ONNX Runtime or OpenVINO, behind the interface the inference code uses.

:class:`RuntimeModel` carries what ``d2c-infer`` reads from a D2CNet (``upscale``,
``num_branch``, ``tree_depth``, ``tree_width``) and a :meth:`RuntimeModel.run` that
:func:`d2c_inference.tile_util.run_network` calls in place of ``net(lq)``, so tiling, image kinds,
bit depths, alpha, outputs, the progress bar and the fall-back from a reduced precision are the
same code on every backend.

:func:`select_backend` decides what ``--backend auto`` runs; :func:`load_runtime_model` opens
an ``.onnx`` file, or exports a ``.pth`` checkpoint once and keeps the file in a cache keyed by
the checkpoint's bytes and options, so later runs start at once.
"""
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import tempfile
import time
import uuid
from os import path as osp

import numpy as np

from d2c_utils.errors import UserError
from d2c_utils.output_util import atomic_write_bytes, remove_stale_temps
from .metadata_util import OUTPUTS, parse_metadata, require

# torch is imported only by what takes tensors (RuntimeModel.run) and by the export: d2c-infer on an
# exported model runs with numpy and the runtime alone (d2c_deploy.exported_infer_util)

BACKENDS = ('auto', 'torch', 'onnxruntime', 'openvino')
# measured by benchmarks/bench_export.py on a 2-core AVX512-BF16 CPU (README, Export and deployment):
# OpenVINO at its default precision was the fastest at >= 50 dB agreement, then our own PyTorch path
AUTO_ORDER_CPU = ('openvino', 'torch')
CACHE_ENV = 'D2C_SR_CACHE'
# OpenVINO's names of d2c-sr's precisions (None: fp32)
_OV_HINTS = {None: 'f32', 'bf16': 'bf16', 'fp16': 'f16'}


def installed(backend):
    """True if the runtime of ``backend`` can be imported (without importing it)."""
    return backend == 'torch' or importlib.util.find_spec(backend) is not None


def select_backend(requested, model_path, device):
    """The backend that runs ``model_path`` on ``device``, and why (for the log line).

    Args:
        requested (str): One of :data:`BACKENDS`.
        model_path (str): A ``.pth`` checkpoint or an ``.onnx`` file.
        device (torch.device | str): The device (or its type, 'cpu' / 'cuda') asked for.

    Returns:
        tuple[str, str]: backend name and the reason it was chosen.
    """
    is_onnx = model_path.lower().endswith('.onnx')
    device_type = getattr(device, 'type', device)
    if requested == 'torch' and is_onnx:
        raise UserError(f'--backend torch runs .pth checkpoints; {model_path} is an ONNX file: use --backend '
                        'onnxruntime, openvino or auto')
    if requested != 'auto':
        if requested == 'openvino' and device_type == 'cuda':
            raise UserError('--backend openvino runs on the CPU here; use --device cpu, or --backend onnxruntime / '
                            'torch for CUDA')
        if not installed(requested):
            extra = 'onnx' if requested == 'onnxruntime' else 'openvino'
            raise UserError(f'--backend {requested}: the package {requested!r} is not installed; install it with '
                            f'pip install "d2c-sr[{extra}]"')
        return requested, 'requested'
    if device_type == 'cuda':
        if not is_onnx:
            return 'torch', 'auto: CUDA device'
        order = ('onnxruntime', )
    else:
        order = ('openvino', 'onnxruntime') if is_onnx else AUTO_ORDER_CPU
    for backend in order:
        if installed(backend):
            return backend, f'auto: the fastest installed on {device_type.upper()} (README, Export and deployment)'
    raise UserError(f'{model_path} is an ONNX file and neither OpenVINO nor ONNX Runtime is installed; install one '
                    'with pip install "d2c-sr[openvino]" or pip install "d2c-sr[onnx]"')


def default_cache_dir():
    """Where exported checkpoints are kept: $D2C_SR_CACHE, else $XDG_CACHE_HOME/d2c-sr, else ~/.cache/d2c-sr."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get('XDG_CACHE_HOME') or osp.join(osp.expanduser('~'), '.cache')
    return osp.join(base, 'd2c-sr')


class RuntimeModel:
    """An exported D2CNet (``d2c-export`` file) with D2CNet's interface for inference.

    Attributes:
        upscale, num_branch, tree_depth, tree_width (int): As D2CNet's.
        has_branches (bool): The file also gives branches and weight maps (``--outputs all``).
        meta (dict): The file's ``d2c_sr.*`` metadata (see :func:`d2c_deploy.export_util.read_metadata`).
        backend (str): 'onnxruntime' or 'openvino'.
        prepare_seconds (float): Time to open/compile the file (export excluded).
        runs_exported (bool): True: what inference (:mod:`d2c_inference.tile_util`) asks instead of
            importing this class (inference sits below deployment and never imports it).
    """
    backend = ''
    runs_exported = True

    def __init__(self, path, meta):
        self.path = path
        self.meta = meta
        self.upscale = meta['upscale']
        self.num_branch = meta['num_branch']
        self.tree_depth = meta['tree_depth']
        self.tree_width = meta['tree_width']
        self.has_branches = meta['outputs'] == 'all'
        self.prepare_seconds = 0.

    def run(self, lq, return_branches=False, dtype=None):
        """Like :func:`d2c_inference.tile_util.run_network`: float32 tensors on the host.

        Args:
            lq (Tensor): (N, C, h, w) float32 in [0, 1].
            return_branches (bool): Also return branches (N, P, C, sh, sw) and weights (N, P, sh, sw).
            dtype (torch.dtype | None): Reduced precision to compute in (backend-specific).
        """
        import torch  # noqa: PLC0415  (only the tensor interface needs it)

        precision = {torch.bfloat16: 'bf16', torch.float16: 'fp16'}.get(dtype)
        outs = self.run_array(lq.detach().cpu().float().numpy(), return_branches, precision)
        if return_branches:
            return tuple(torch.from_numpy(out) for out in outs)
        return torch.from_numpy(outs)

    def run_array(self, lq, return_branches=False, precision=None):
        """One forward pass on float32 arrays: what :meth:`run` does, without torch.

        Args:
            lq (ndarray): (N, C, h, w) float32 in [0, 1].
            return_branches (bool): Also return branches (N, P, C, sh, sw) and weights (N, P, sh, sw).
            precision (str | None): 'bf16' / 'fp16' to compute in (backend-specific), None: fp32.

        Returns:
            ndarray | tuple[ndarray, ndarray, ndarray]: float32, not clamped: SR (N, C, sh, sw), and with
            ``return_branches`` also the branches and the weights.
        """
        if return_branches and not self.has_branches:
            raise UserError(f'{self.path} has only the fused output; branches, weight maps and --reference metrics '
                            'need a file exported with d2c-export --outputs all')
        array = np.ascontiguousarray(lq, dtype=np.float32)
        # one image at a time: the tile loop sends one, and SwinIR files have a batch of 1
        if array.shape[0] == 1:
            outs = self._run(array, precision)
        else:
            outs = [
                np.concatenate(parts, axis=0)
                for parts in zip(*(self._run(array[i:i + 1], precision) for i in range(array.shape[0])))
            ]
        return tuple(outs[:3]) if return_branches else outs[0]

    def _run(self, array, dtype):
        raise NotImplementedError


class OnnxRuntimeModel(RuntimeModel):
    """An exported D2CNet in an ONNX Runtime session (CPU, or CUDA with onnxruntime-gpu)."""
    backend = 'onnxruntime'

    def __init__(self, path, meta, device):
        super().__init__(path, meta)
        ort = require('onnxruntime', '--backend onnxruntime')
        providers = ['CPUExecutionProvider']
        if getattr(device, 'type', device) == 'cuda':
            if 'CUDAExecutionProvider' not in ort.get_available_providers():
                raise UserError('--device cuda with ONNX Runtime needs the onnxruntime-gpu package (this one has '
                                f'{ort.get_available_providers()}); use --device cpu')
            providers.insert(0, 'CUDAExecutionProvider')
        start = time.perf_counter()
        try:
            self.session = ort.InferenceSession(path, providers=providers)
        except Exception as err:  # a damaged file, external data it may not read, an op this runtime lacks
            raise runtime_error(path, 'ONNX Runtime', err) from None
        self.prepare_seconds = time.perf_counter() - start
        self.input_name = self.session.get_inputs()[0].name
        self.precision_name = meta['precision']

    def _run(self, array, precision):
        if precision is not None:
            raise UserError('ONNX Runtime runs the file in the precision it was exported in; use --precision fp32 '
                            '(or auto), or export with d2c-export --precision fp16')
        return self.session.run(None, {self.input_name: array})


class OpenVINOModel(RuntimeModel):
    """An exported D2CNet compiled by OpenVINO for the CPU, once per precision (dynamic shapes).

    OpenVINO's CPU plugin computes in bf16 by default on CPUs with native bf16 (AVX512-BF16,
    AMX), in fp32 elsewhere; :attr:`default_precision` says which ('bf16' or None).

    With a ``cache_dir``, compiled models are kept in OpenVINO's model cache (its ``CACHE_DIR``)
    in ``<cache_dir>/openvino/<OpenVINO version>-<precision>/<file digest>/``: a later run loads
    the compiled blob instead of compiling the file again; a new OpenVINO, another precision or
    other file contents compile into a folder of their own (OpenVINO's own key for a file is its
    path: an edited file would load the old blob). None or '' compiles every run.

    Args:
        path (str): The ONNX file.
        meta (dict): Its metadata.
        cache_dir (str | None): The cache folder of d2c-sr (:func:`default_cache_dir`), or None / ''.
        precision (str | None): 'auto' (:attr:`default_precision`), 'fp32', 'bf16': compile for it now,
            so a file OpenVINO refuses is reported before any image and the compile time is known
            (:attr:`prepare_seconds`); None: compile on first use.
    """
    backend = 'openvino'

    def __init__(self, path, meta, cache_dir=None, precision=None):
        super().__init__(path, meta)
        self.ov = require('openvino', '--backend openvino')
        self.core = self.ov.Core()
        hint = str(self.core.get_property('CPU', 'INFERENCE_PRECISION_HINT'))
        self.default_precision = 'bf16' if 'bf16' in hint or 'bfloat16' in hint else None
        self.cache_dir = cache_dir
        self.compiled = {}
        self.compile_cached = {}
        self.precision_name = meta['precision']
        self.model = None
        self.digest = None
        if not cache_dir:  # in memory: the file may be a temporary export, removed once opened
            try:
                self.model = self.core.read_model(path)
            except Exception as err:
                raise runtime_error(path, 'OpenVINO', err) from None
        if precision in ('auto', 'fp32', 'bf16'):
            self.compiled_for({'auto': self.default_precision, 'fp32': None, 'bf16': 'bf16'}[precision])

    @property
    def default_dtype(self):
        """:attr:`default_precision` as an autocast dtype (torch.bfloat16 or None), for the PyTorch-driven path."""
        if self.default_precision is None:
            return None
        import torch  # noqa: PLC0415

        return torch.bfloat16

    def model_cache_folder(self, precision):
        """OpenVINO's cache folder for ``precision`` (None: fp32), or None without a cache."""
        if not self.cache_dir:
            return None
        if self.digest is None:
            from d2c_utils.output_util import file_sha256  # noqa: PLC0415
            self.digest = file_sha256(self.path)[:16]
        version = re.sub(r'[^A-Za-z0-9.+-]', '_', self.ov.__version__)  # '2026.4.1-...-releases/2026/4'
        return osp.join(self.cache_dir, 'openvino', f'{version}-{_OV_HINTS[precision]}', self.digest)

    def compiled_for(self, precision):
        """The model compiled for ``precision`` ('bf16' / 'fp16' / None: fp32), compiling it on first use."""
        if precision not in self.compiled:
            start = time.perf_counter()
            config = {'INFERENCE_PRECISION_HINT': _OV_HINTS[precision]}
            folder = self.model_cache_folder(precision)
            try:
                os.makedirs(folder, exist_ok=True)
                cached = bool(os.listdir(folder))
                config['CACHE_DIR'] = folder
            except (OSError, TypeError):  # no cache (None), or an unwritable one: compile as without one
                cached = False
            try:
                # from the path: with a cache OpenVINO then skips reading the file when the blob is there
                source = self.path if self.model is None else self.model
                self.compiled[precision] = self.core.compile_model(source, 'CPU', config)
            except Exception as err:  # a damaged file, an op this runtime lacks
                raise runtime_error(self.path, 'OpenVINO', err) from None
            self.compile_cached[precision] = cached
            self.prepare_seconds += time.perf_counter() - start
        return self.compiled[precision]

    def _run(self, array, precision):
        compiled = self.compiled_for(precision)
        result = compiled(array)
        return [result[port] for port in compiled.outputs]


def runtime_error(path, runtime, err):
    """The UserError for a file a runtime refuses, in one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return UserError(f'{runtime} cannot open {path}: {(lines[0] if lines else type(err).__name__)[:300]}; use a file '
                     'written by d2c-export (weights inside the file, no external data outside its folder)')


def read_onnx_metadata(path):
    """The ``d2c_sr.*`` metadata of an ONNX file, reading only its header-level protobuf fields.

    Raises:
        UserError: missing, unreadable, or not written by d2c-export.
    """
    if not osp.isfile(path):
        raise UserError(f'model file not found: {path} (pass --model <a .pth or a .onnx written by d2c-export>)')
    onnx = importlib.util.find_spec('onnx')
    if onnx is not None:
        import onnx  # noqa: PLC0415
        try:
            proto = onnx.load_model(path, load_external_data=False)
        except Exception as err:
            raise UserError(f'cannot read {path}: corrupt or not an ONNX file ({type(err).__name__}: '
                            f'{str(err).splitlines()[0][:200] if str(err) else "empty"})') from None
        props = {p.key: p.value for p in proto.metadata_props}
    else:  # a machine with only the runtime: ask the runtime for the metadata
        ort = require('onnxruntime', f'reading {path}')
        try:
            props = dict(
                ort.InferenceSession(path, providers=['CPUExecutionProvider']).get_modelmeta().custom_metadata_map)
        except Exception as err:
            raise UserError(
                f'cannot read {path}: corrupt or not an ONNX file ({str(err).splitlines()[0][:200]})') from None
    prefix = 'd2c_sr.'
    return parse_metadata({k[len(prefix):]: v for k, v in props.items() if k.startswith(prefix)}, path)


def installed_version(package):
    """The installed version of ``package`` by its metadata (without importing it), or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def checkpoint_digest(model_path, net_opt, param_key, outputs):
    """A key for the cache of exports: the checkpoint's bytes, the options, the output set, the versions.

    Computable without torch (``d2c-infer`` looks the export up before deciding whether it needs torch).

    Args:
        model_path (str): The checkpoint.
        net_opt (dict): ``network_g`` it is built with.
        param_key (str | None): ``--param-key`` as given (None: the loader's default); the checkpoint's
            bytes decide which state dict that is, so the key need not know it.
        outputs (str): 'fused' or 'all'.
    """
    from d2c_utils.output_util import file_sha256
    digest = hashlib.sha256(file_sha256(model_path).encode())
    settings = {'net_opt': net_opt, 'param_key': param_key, 'outputs': outputs, 'torch': installed_version('torch')}
    digest.update(json.dumps(settings, sort_keys=True, default=list).encode())
    return digest.hexdigest()[:32]


def cached_export_path(cache_dir, model_path, net_opt, param_key, outputs):
    """Where :func:`export_cached` keeps the export of a checkpoint (see :func:`checkpoint_digest`)."""
    return osp.join(cache_dir, 'onnx', f'{checkpoint_digest(model_path, net_opt, param_key, outputs)}.onnx')


def cached_export_info(onnx_path):
    """What the loader said about the checkpoint of a cached export (``param_key``, ``opt_source``,
    ``warnings``), kept beside it as ``<key>.json``; None if there is none (an export of an older version)."""
    try:
        with open(osp.splitext(onnx_path)[0] + '.json', encoding='utf-8') as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    keys = {'param_key', 'opt_source', 'warnings'}
    return info if isinstance(info, dict) and keys <= set(info) else None


def write_cached_export_info(onnx_path, info):
    """Keep ``load_model``'s description of the checkpoint beside its cached export (see :func:`cached_export_info`)."""
    kept = {'param_key': info.get('param_key'), 'opt_source': info.get('opt_source'), 'warnings': info['warnings']}
    try:
        atomic_write_bytes(osp.splitext(onnx_path)[0] + '.json', json.dumps(kept, default=str).encode('utf-8'))
    except (OSError, UserError):  # a full or read-only cache: later runs take the PyTorch path to it, no harm
        pass


def export_cached(net, model_path, info, outputs, cache_dir, log):
    """An ONNX file of ``net`` (loaded from ``model_path``): from the cache, or exported into it.

    Args:
        net (D2CNet): Loaded by :func:`d2c_inference.checkpoint_util.load_model`.
        model_path (str): Its checkpoint.
        info (dict): What ``load_model`` returned (``net_opt``, ``param_key``), and ``requested_param_key``
            (``--param-key`` as given; default: ``param_key``), which keys the cache.
        outputs (str): 'fused' or 'all'.
        cache_dir (str | None): Cache folder; None or '' exports to a temporary file that is removed
            at exit (every run pays the export).
        log (callable): ``log(message)`` for what happened (export time).

    Returns:
        str: the ONNX file.
    """
    if cache_dir:
        path = cached_export_path(cache_dir, model_path, info['net_opt'],
                                  info.get('requested_param_key', info['param_key']), outputs)
        remove_stale_temps(osp.dirname(path))  # what killed exports left
        if osp.isfile(path):
            log(f'exported model from the cache: {path}')
            if cached_export_info(path) is None:
                write_cached_export_info(path, info)
            return path
    else:  # a temporary file named like atomic_write's, so one a killed run left is removed by the next run
        folder = tempfile.gettempdir()
        remove_stale_temps(folder)
        path = osp.join(folder, f'.d2c-sr-export.d2c-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp')
    from .export_util import export_onnx  # noqa: PLC0415  (imports torch: only a run that exports needs it)

    try:
        result = export_onnx(net, path, outputs=outputs, net_opt=info['net_opt'], source=osp.basename(model_path))
    except OSError as err:
        raise UserError(f'cannot write the exported model to {path}: {err.strerror or err}; pass --cache-dir '
                        'with a writable folder (or --cache-dir "" for no cache)') from None
    if cache_dir:  # what the loader said, for the runs that find the export without loading the checkpoint
        write_cached_export_info(path, info)
    where = f', kept in {path} for later runs' if cache_dir else ' (no cache: --cache-dir "")'
    log(f'exported {model_path} to ONNX once in {result["seconds"]:.1f} s{where}')
    return path


def load_runtime_model(path,
                       backend,
                       device,
                       outputs='all',
                       net=None,
                       info=None,
                       cache_dir=None,
                       log=print,
                       precision=None):
    """Open an exported D2CNet for ``backend``; a ``.pth`` (already loaded as ``net``) is exported first.

    Args:
        path (str): ``.onnx`` file, or the ``.pth`` checkpoint ``net`` was loaded from.
        backend (str): 'onnxruntime' or 'openvino'.
        device (torch.device): cpu (or cuda for ONNX Runtime).
        outputs (str): For a ``.pth``: what to export ('all' when branches are wanted).
        net, info: The loaded D2CNet and ``load_model``'s description, for a ``.pth``.
        cache_dir (str | None): See :func:`export_cached`; OpenVINO keeps its compiled models
            beside the exports (:class:`OpenVINOModel`).
        log (callable): For messages.
        precision (str | None): ``--precision``: OpenVINO compiles for it at once (see :class:`OpenVINOModel`).

    Returns:
        RuntimeModel
    """
    if backend not in ('onnxruntime', 'openvino'):
        raise UserError(f'backend {backend!r}: use one of {BACKENDS}')

    def open_file(onnx_path):
        return open_runtime_model(onnx_path, backend, device, cache_dir, precision)

    if net is None:
        return open_file(path)
    exported = export_cached(net, path, info, outputs, cache_dir, log)
    try:
        return open_file(exported)
    except UserError as err:
        if not cache_dir:
            raise
        # a damaged cache entry (a disk error, an edit): export again instead of failing every later run
        log(f'notice: the cached export {exported} cannot be used ({err}); exporting {path} again')
        os.remove(exported)
        return open_file(export_cached(net, path, info, outputs, cache_dir, log))
    finally:
        if not cache_dir and osp.exists(exported):
            os.remove(exported)  # the runtimes hold the model in memory now: nothing stays in the temp folder


def open_runtime_model(path, backend, device, cache_dir=None, precision=None):
    """An ONNX file written by d2c-export, opened for ``backend``; UserError naming the file if it cannot be.

    ``cache_dir`` and ``precision``: OpenVINO's compiled-model cache and what to compile now (:class:`OpenVINOModel`).
    """
    meta = read_onnx_metadata(path)
    if backend == 'onnxruntime':
        return OnnxRuntimeModel(path, meta, device)
    return OpenVINOModel(path, meta, cache_dir, precision)


# --------------------------------------------------------------------------------- DAN and SDFlow
# What --backend auto runs per method on a CPU, fastest first, as benchmarks/bench_export_methods.py measured
# on the project's 2-core AMD EPYC in two runs (docs/deployment.md, Speed of DAN and SDFlow; every runtime in fp32
# there, the CPU had no native bf16): DAN OpenVINO 1.8-3.6x plain fp32, ONNX Runtime 1.2-2.6x, our PyTorch path
# 1.1-1.5x; SDFlow ONNX Runtime ahead of OpenVINO by 5-10% in both runs (0.90 against 0.97 s at 128x128),
# PyTorch 0.9-1.1x. D2CNet: AUTO_ORDER_CPU above.
AUTO_ORDER = {
    'D2CNet': AUTO_ORDER_CPU,
    'DAN': ('openvino', 'onnxruntime', 'torch'),
    'SDFlow': ('onnxruntime', 'openvino', 'torch')
}


class ExportedGraphs:
    """The files of one export (``d2c_sr.paths``: graph -> file) opened by one runtime.

    :meth:`run` takes and returns numpy arrays by name; OpenVINO compiles each graph once per precision.
    """

    def __init__(self, meta, backend, device):
        import torch  # only the PyTorch-driven path of DAN and SDFlow needs it

        self.backend = backend
        self.paths = meta['paths']
        self.prepare_seconds = 0.
        self.default_dtype = None
        start = time.perf_counter()
        if backend == 'onnxruntime':
            ort = require('onnxruntime', '--backend onnxruntime')
            providers = ['CPUExecutionProvider']
            if device.type == 'cuda':
                if 'CUDAExecutionProvider' not in ort.get_available_providers():
                    raise UserError('--device cuda with ONNX Runtime needs the onnxruntime-gpu package (this one has '
                                    f'{ort.get_available_providers()}); use --device cpu')
                providers.insert(0, 'CUDAExecutionProvider')
            self.sessions = {}
            for graph, path in self.paths.items():
                try:
                    self.sessions[graph] = ort.InferenceSession(path, providers=providers)
                except Exception as err:
                    raise runtime_error(path, 'ONNX Runtime', err) from None
        else:
            ov = require('openvino', '--backend openvino')
            self.core = ov.Core()
            hint = str(self.core.get_property('CPU', 'INFERENCE_PRECISION_HINT'))
            self.default_dtype = torch.bfloat16 if 'bf16' in hint or 'bfloat16' in hint else None
            self.models, self.compiled = {}, {}
            for graph, path in self.paths.items():
                try:
                    self.models[graph] = self.core.read_model(path)
                except Exception as err:
                    raise runtime_error(path, 'OpenVINO', err) from None
        self.prepare_seconds = time.perf_counter() - start

    def run(self, graph, feeds, dtype=None):
        """The outputs of ``graph`` (a list of arrays, in the file's order) for ``feeds`` (name -> array)."""
        import torch  # only the PyTorch-driven path of DAN and SDFlow needs it

        if self.backend == 'onnxruntime':
            if dtype is not None:
                raise UserError('ONNX Runtime runs the file in the precision it was exported in; use --precision '
                                'fp32 (or auto)')
            return self.sessions[graph].run(None, feeds)
        key = (graph, dtype)
        if key not in self.compiled:
            start = time.perf_counter()
            config = {'INFERENCE_PRECISION_HINT': _OV_HINTS[{torch.bfloat16: 'bf16', torch.float16: 'fp16'}.get(dtype)]}
            self.compiled[key] = self.core.compile_model(self.models[graph], 'CPU', config)
            self.prepare_seconds += time.perf_counter() - start
        compiled = self.compiled[key]
        result = compiled(feeds)
        return [result[port] for port in compiled.outputs]


def _array(tensor):
    return np.ascontiguousarray(tensor.detach().cpu().numpy())


class ExportedMethodModel:
    """An exported DAN or SDFlow (``d2c-export`` files) with the calls the per-method inference code makes.

    Attributes:
        meta (dict): The main file's metadata (:func:`d2c_deploy.metadata_util.parse_method_metadata`).
        backend (str): 'onnxruntime' or 'openvino'.
        upscale (int): The scale.
        default_dtype (torch.dtype | None): OpenVINO's default precision here (bf16 on CPUs with native bf16).
        has_branches (bool): False: no branches or weight maps.
        runs_exported (bool): True: inference calls :meth:`run` (and the method's own calls) instead of a module.
    """
    runs_exported = True
    has_branches = False

    def __init__(self, path, meta, backend, device):
        self.path, self.meta, self.backend = path, meta, backend
        self.upscale = meta['upscale']
        self.graphs = ExportedGraphs(meta, backend, device)
        self.default_dtype = self.graphs.default_dtype

    @property
    def prepare_seconds(self):
        return self.graphs.prepare_seconds

    def run(self, lq, return_branches=False, dtype=None):
        raise NotImplementedError


class DANRuntimeModel(ExportedMethodModel):
    """An exported DAN: the whole loop (``dan`` graph) and the Restorer with a given code (``restore``).

    What :mod:`d2c_inference.dan_infer_util` calls: :meth:`estimate_code` on the kernel window, then
    :meth:`restore` on the image or every tile (through ``FixedKernelRestorer``), so tiles share one kernel.
    """

    def __init__(self, path, meta, backend, device):
        super().__init__(path, meta, backend, device)
        self.kernel_size, self.code_length, self.loop = meta['kernel_size'], meta['code_length'], meta['loop']

    def estimate_code(self, lq, dtype=None):
        """(code c_{T-1} (N, t), kernel k_T (N, l, l)), float32 on the host, of lq (N, C, h, w) in [0, 1]."""
        import torch  # only the PyTorch-driven path of DAN and SDFlow needs it

        _, kernel, code = self.graphs.run('dan', {'lq': _array(lq.float())}, dtype)
        return torch.from_numpy(code).float(), torch.from_numpy(kernel).float()

    def restore(self, lq, code, dtype=None):
        """SR (N, C, sh, sw) of lq (N, C, h, w) with the code (1 or N, t): the Restorer alone."""
        import torch  # only the PyTorch-driven path of DAN and SDFlow needs it

        code = code.float().expand(lq.size(0), -1)
        (sr, ) = self.graphs.run('restore', {'lq': _array(lq.float()), 'code': _array(code)}, dtype)
        return torch.from_numpy(sr)

    def run(self, lq, return_branches=False, dtype=None):
        """The whole loop's SR image (what ``DAN.forward`` gives)."""
        import torch  # only the PyTorch-driven path of DAN and SDFlow needs it

        if return_branches:
            raise UserError('DAN has no branches or weight maps; drop --save-branches / --save-weights')
        return torch.from_numpy(self.graphs.run('dan', {'lq': _array(lq.float())}, dtype)[0])


class SDFlowRuntimeModel(ExportedMethodModel):
    """An exported SDFlow: SR (``sr`` graph) and downscaling (``downscale``), the random draws made here.

    The draws are PyTorch's, from the caller's ``torch.Generator``, in the order and shapes of
    ``SDFlow.super_resolve`` and ``SDFlow.downscale``: a seed gives the PyTorch backend's sample.
    """

    def __init__(self, path, meta, backend, device):
        super().__init__(path, meta, backend, device)
        self.temperature = meta['temperature']
        self.mixture_sampling = meta.get('mixture_sampling', 'element')
        self.has_downscaler = 'downscale' in meta['paths']

    @staticmethod
    def _normal(shape, temperature, generator):
        import torch  # only the PyTorch-driven path of DAN and SDFlow needs it

        # SDFlow's _noise draws nothing at temperature 0
        if temperature == 0:
            return torch.zeros(shape)
        device = generator.device if generator is not None else 'cpu'
        return torch.randn(shape, generator=generator, device=device).cpu()

    def super_resolve(self, lq, temperature=None, generator=None, dtype=None):
        """One SR sample (N, 3, 4h, 4w) in [0, 1] of lq (N, 3, h, w) in [0, 1] (``SDFlow.super_resolve``)."""
        import torch  # only the PyTorch-driven path of DAN and SDFlow needs it

        temperature = self.temperature if temperature is None else float(temperature)
        n, _, height, width = lq.shape
        noise = self._normal((n, self.meta['hf_channels'], height, width), temperature, generator)
        feeds = {'lq': _array(lq.float()), 'temperature': np.array([temperature], np.float32), 'noise': _array(noise)}
        return torch.from_numpy(self.graphs.run('sr', feeds, dtype)[0])

    def downscale(self, hr, temperature=None, generator=None, dtype=None):
        """One LR sample (N, 3, H/4, W/4) in [0, 1] of hr (N, 3, H, W), sides multiples of 4 (``SDFlow.downscale``)."""
        import torch  # only the PyTorch-driven path of DAN and SDFlow needs it

        if not self.has_downscaler:
            raise UserError(f'{self.path} holds no downscaler (exported from an SDFlow with downscaler: false); use a '
                            'checkpoint with lr_flow and deg_flow')
        temperature = self.temperature if temperature is None else float(temperature)
        n, _, height, width = hr.shape
        pad_h, pad_w = -height % 8, -width % 8
        x = hr.float().cpu()
        if pad_h or pad_w:
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode='reflect')
        shape = (n, self.meta['deg_channels'], x.shape[2] // 8, x.shape[3] // 8)
        device = generator.device if generator is not None else 'cpu'
        count = n if self.mixture_sampling == 'image' else int(torch.Size(shape).numel())
        index = torch.randint(self.meta['components'], (count, ), device=device, generator=generator).cpu()
        index = index.view(-1, 1, 1, 1).expand(shape) if self.mixture_sampling == 'image' else index.view(shape)
        noise = self._normal(shape, temperature, generator)
        feeds = {
            'hr': _array(x),
            'temperature': np.array([temperature], np.float32),
            'component': _array(index.contiguous()),
            'noise': _array(noise)
        }
        lq = torch.from_numpy(self.graphs.run('downscale', feeds, dtype)[0])
        return lq[:, :, :height // 4, :width // 4]

    def run(self, lq, return_branches=False, dtype=None):
        """An SR sample at the file's temperature, with fresh noise."""

        if return_branches:
            raise UserError('SDFlow has no branches or weight maps')
        return self.super_resolve(lq, None, None, dtype)


# method -> its runtime model (D2CNet: RuntimeModel and its subclasses above)
METHOD_RUNTIME_MODELS = {'DAN': DANRuntimeModel, 'SDFlow': SDFlowRuntimeModel}


def deployable(method):
    """True if ``method`` (a registry entry) runs on ONNX Runtime and OpenVINO (the entry says so)."""
    return method.deployable


def select_method_backend(requested, model_path, device, method):
    """:func:`select_backend` with ``auto`` following the measured order of ``method`` (:data:`AUTO_ORDER`)."""
    order = AUTO_ORDER.get(method, AUTO_ORDER_CPU)
    if requested != 'auto' or device.type == 'cuda' or model_path.lower().endswith('.onnx') or order is AUTO_ORDER_CPU:
        return select_backend(requested, model_path, device)
    backend = next((b for b in order if installed(b)), 'torch')
    return backend, f'auto: the fastest installed for {method} on {device.type.upper()} (README, Export and deployment)'


def onnx_method(path):
    """The method name an ONNX file written by d2c-export holds (files before methods were named: D2CNet)."""
    return read_onnx_metadata(path).get('method') or 'D2CNet'


def export_method_cached(net, model_path, info, cache_dir, log):
    """:func:`export_cached` for a method other than D2CNet: its files from the cache, or exported into it.

    Returns:
        tuple[str, list[str]]: the main file and every file of the export.
    """
    from .export_util import export_graphs_onnx
    from .metadata_util import graph_file

    graphs = info['method'].export_graphs(net)
    if cache_dir:
        key = checkpoint_digest(model_path, info['net_opt'], info['param_key'], info['method'].name)
        path = osp.join(cache_dir, 'onnx', f'{key}.onnx')
        remove_stale_temps(osp.dirname(path))
        files = [graph_file(path, graph.name, i) for i, graph in enumerate(graphs)]
        if all(osp.isfile(f) for f in files):
            log(f'exported model from the cache: {path}')
            return path, files
    else:
        folder = tempfile.gettempdir()
        remove_stale_temps(folder)
        path = osp.join(folder, f'.d2c-sr-export.d2c-{os.getpid()}-{uuid.uuid4().hex[:8]}.onnx')
        files = [graph_file(path, graph.name, i) for i, graph in enumerate(graphs)]
    meta = {
        'upscale': net.upscale,
        'network_g': json.dumps(info['net_opt'] or {}, sort_keys=True, default=list),
        'source': osp.basename(model_path)
    }
    try:
        result = export_graphs_onnx(graphs, path, info['method'].name, metadata=meta)
    except OSError as err:
        raise UserError(f'cannot write the exported model to {path}: {err.strerror or err}; pass --cache-dir '
                        'with a writable folder (or --cache-dir "" for no cache)') from None
    where = f', kept in {path} for later runs' if cache_dir else ' (no cache: --cache-dir "")'
    log(f'exported {model_path} to ONNX once in {result["seconds"]:.1f} s{where}')
    return path, files


def load_method_runtime_model(path,
                              backend,
                              device,
                              outputs='all',
                              net=None,
                              info=None,
                              cache_dir=None,
                              log=print,
                              precision='auto'):
    """:func:`load_runtime_model` for every method: D2CNet there, DAN and SDFlow here (same arguments).

    ``path`` is an ``.onnx`` file (its metadata names the method) or the ``.pth`` ``net`` was loaded from
    (``info['method']`` names it).
    """
    if backend not in ('onnxruntime', 'openvino'):
        raise UserError(f'backend {backend!r}: use one of {BACKENDS}')
    method = onnx_method(path) if net is None else info['method'].name
    model_class = METHOD_RUNTIME_MODELS.get(method)
    if model_class is None:
        return load_runtime_model(path, backend, device, outputs, net, info, cache_dir, log, precision=precision)
    if net is None:
        return model_class(path, read_onnx_metadata(path), backend, device)
    main, files = export_method_cached(net, path, info, cache_dir, log)
    try:
        try:
            return model_class(main, read_onnx_metadata(main), backend, device)
        except UserError as err:
            if not cache_dir:
                raise
            log(f'notice: the cached export {main} cannot be used ({err}); exporting {path} again')
            for name in files:
                if osp.exists(name):
                    os.remove(name)
            main, files = export_method_cached(net, path, info, cache_dir, log)
            return model_class(main, read_onnx_metadata(main), backend, device)
    finally:
        if not cache_dir:
            for name in files:  # the runtimes hold the graphs in memory now
                if osp.exists(name):
                    os.remove(name)


__all__ = [
    'BACKENDS', 'OUTPUTS', 'RuntimeModel', 'OnnxRuntimeModel', 'OpenVINOModel', 'select_backend', 'installed',
    'load_runtime_model', 'read_onnx_metadata', 'default_cache_dir', 'AUTO_ORDER', 'DANRuntimeModel',
    'SDFlowRuntimeModel', 'deployable', 'select_method_backend', 'load_method_runtime_model'
]
