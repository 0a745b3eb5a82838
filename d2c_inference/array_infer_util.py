"""Exported networks on image files with numpy alone: tiling, the reduced-precision guard, outputs, pipelining.

What ``d2c-infer`` does with a PyTorch network (:mod:`.tile_util`, :mod:`.infer_util`), for a
network run by ONNX Runtime or OpenVINO, in float32 arrays: the same tiles and stitching
(:func:`tile_boxes` is shared), the same image kinds and outputs, and the same fall-back from a
reduced precision to fp32 (:class:`GuardedRun`, a port of :class:`.tile_util.GuardedForward`).
Importing it imports neither torch nor basicsr, so a deployed run starts in a fraction of a
second (``d2c_deploy.exported_infer_util`` opens the runtime and calls :func:`run_images`).

The network is any object with ``upscale`` and ``run_array(lq, return_branches, precision)``
(:class:`d2c_deploy.runtime_util.RuntimeModel`): inference sits below deployment and never imports it.

:func:`run_images` overlaps the work around the network with it: a reader thread decodes the next
image while the current one is inferred, a writer thread encodes and writes the previous one
(OpenCV and both runtimes release the GIL).
"""
import math
import re
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from os import path as osp

import cv2
import numpy as np
from tqdm import tqdm

from d2c_utils.errors import ImageError, UserError, report_user_error
from d2c_utils.img_util import DEFAULT_MAX_PIXELS as MAX_PIXELS
from d2c_utils.img_util import (
    compose_output,
    image_kind,
    output_ext,
    read_image,
    split_input_array,
    to_bgr,
    write_image,
)
from d2c_utils.visual_util import labelled_grid, weight_heatmap

# mean distance (range 0-1) between an SR image's block averages and its input beyond which the
# output is treated as broken (as tile_util.WRONG_OUTPUT_LEVEL); reduced and fp32 outputs that agree at
# least this well (PSNR, dB) are the same image (tile_util.AGREEMENT_DB)
WRONG_OUTPUT_LEVEL = 0.2
AGREEMENT_DB = 30.
FALLBACK_HINT = 'use --precision fp32 to skip the reduced-precision attempt'


@dataclass
class OutputOptions:
    """What :func:`process_image` writes and how (``d2c-infer``'s flags of the same names).

    Attributes:
        output (str): Output folder (must exist).
        suffix (str): Outputs are ``<name>_<suffix>.<ext>``; empty: ``<name>.<ext>``.
        ext (str): 'auto' (the input's format where it can hold the image), 'png' or 'jpg'.
        outscale (float | None): Final scale (LANCZOS4 resize of the output); None: the network's.
        tile, tile_pad, pre_pad (int): Tiling (see :func:`d2c_inference.tile_util.super_resolve`).
        save_branches (bool): Also write every branch's prediction.
        save_weights (bool): Also write the weight heatmaps and the grid picture.
        grid_size (int): Longest side of a grid cell; 0 = full size.
        reference (str | None): Folder of ground-truth images with the same file names.
        perceptual (tuple[str]): Perceptual metrics against the reference too: 'lpips', 'dists'.
        kernel_crop (int): DAN: side of the central LR window the kernel is estimated on (0: all).
        save_kernel (bool): DAN: also write the estimated kernel (``_kernel.png``, ``_kernel.npy``).
        samples, temperature, seed, downscale: SDFlow (see :mod:`d2c_inference.sdflow_infer_util`).
        max_pixels (int): Larger inputs (by their header) are skipped before decoding; 0: no limit.
        inputs (frozenset[str]): The run's input files (real paths): never written (see :meth:`target`).
    """
    output: str
    suffix: str = 'out'
    ext: str = 'auto'
    outscale: float = None
    tile: int = 0
    tile_pad: int = 32
    pre_pad: int = 0
    save_branches: bool = False
    save_weights: bool = False
    grid_size: int = 512
    reference: str = None
    perceptual: tuple = ()
    kernel_crop: int = 256
    save_kernel: bool = False
    samples: int = 1
    temperature: float = None
    seed: int = 0
    downscale: bool = False
    max_pixels: int = MAX_PIXELS
    inputs: frozenset = frozenset()
    # real output path -> the input it was written for, in this run
    claimed: dict = field(default_factory=dict)

    @classmethod
    def from_namespace(cls, args, inputs=()):
        """The options from parsed command-line arguments with the same names, for the run's ``inputs``."""
        known = {name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)}
        return cls(**known, inputs=frozenset(osp.realpath(p) for p in inputs))

    def target(self, name, source):
        """The path of output ``name`` written for input ``source``, refused if it is an input or already written.

        Raises:
            ImageError: the output would replace an input of this run, or the output of another
                input of this run (``x.png`` and ``x.jpg`` with ``--ext png``).
        """
        path = osp.join(self.output, name)
        real = osp.realpath(path)
        if real in self.inputs:
            raise ImageError(f'its output {path} is an input of this run and would be replaced; choose another -o or '
                             '--suffix')
        earlier = self.claimed.setdefault(real, source)
        if earlier != source:
            raise ImageError(f'its output {path} was already written for {earlier} in this run; pass --ext auto or '
                             'rename one of the inputs')
        return path


def split_even(length, tile):
    """Split ``range(length)`` into ``ceil(length / tile)`` nearly equal parts.

    Equal parts (rather than ``tile, tile, ..., rest``) avoid a thin last tile whose channel
    attention would see statistics of a small window.

    Returns:
        list[tuple[int, int]]: (start, stop) pairs covering ``[0, length)`` without overlap.
    """
    num = max(1, math.ceil(length / tile))
    bounds = [round(i * length / num) for i in range(num + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def tile_boxes(height, width, tile, tile_pad):
    """Tiles of an (height, width) LR image and their padded input windows.

    Args:
        height, width (int): LR image size.
        tile (int): Largest tile side (LR pixels); 0 or >= the image means one tile.
        tile_pad (int): Context added on every side of a tile, clipped at the image border
            (where the network's own zero padding applies, as in untiled inference).

    Returns:
        list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]: per tile
        ``(y0, y1, x0, x1)`` of the tile and of its padded window, in LR pixels.
    """
    if tile <= 0:
        tile = max(height, width)
    boxes = []
    for y0, y1 in split_even(height, tile):
        for x0, x1 in split_even(width, tile):
            window = (max(y0 - tile_pad, 0), min(y1 + tile_pad, height), max(x0 - tile_pad,
                                                                             0), min(x1 + tile_pad, width))
            boxes.append(((y0, y1, x0, x1), window))
    return boxes


def array_psnr(img, ref):
    """PSNR in dB (peak 1) between two float arrays of the same shape, in float64; ``inf`` when identical."""
    mse = float(np.mean((img.astype(np.float64) - ref.astype(np.float64))**2))
    return float('inf') if mse == 0 else 10 * math.log10(1. / mse)


def output_problem(lq, out):
    """Why an output is unusable, or None: :func:`d2c_inference.tile_util.output_problem` on arrays.

    Args:
        lq (ndarray): (N, 3, h, w) input in [0, 1].
        out (ndarray | tuple[ndarray, ...]): SR (N, 3, sh, sw) first.
    """
    outs = out if isinstance(out, tuple) else (out, )
    if not all(bool(np.isfinite(t).all()) for t in outs):
        return 'non-finite values (inf/NaN)'
    sr, lq = outs[0], lq.astype(np.float32)
    # torch's std is the sample standard deviation (n - 1); the same here, so both paths decide alike
    sr_std, lq_std = float(np.std(sr, ddof=1, dtype=np.float64)), float(np.std(lq, ddof=1, dtype=np.float64))
    if sr_std <= 0.01 * lq_std:
        return f'a flat image (standard deviation {sr_std:.2g}, input {lq_std:.2g})'
    scale = max(1, sr.shape[-1] // lq.shape[-1])
    height, width = sr.shape[-2] // scale, sr.shape[-1] // scale
    blocks = sr[..., :height * scale, :width * scale].reshape(*sr.shape[:-2], height, scale, width, scale)
    distance = float(np.abs(blocks.mean(axis=(-3, -1), dtype=np.float64) - lq).mean())
    if distance > WRONG_OUTPUT_LEVEL:
        return f'an image far from the input (mean |block average - input| = {distance:.3f} of the range 0-1)'
    return None


class GuardedRun:
    """``net.run_array`` at a reduced precision, falling back to fp32 for broken outputs.

    The rule of :class:`d2c_inference.tile_util.GuardedForward`: a suspicious reduced-precision
    output (:func:`output_problem`) is recomputed in fp32; if fp32 is sane (or the two disagree),
    the fp32 output is used, ``warn`` says why once, and every later pass runs in fp32. If fp32 is
    as flat or as far, that is the model's (or the input's) doing: its fp32 output is used for this
    pass, the reduced precision stays and those checks stop. Non-finite values always fall back.
    One runtime call per pass otherwise.

    Args:
        net: Has ``run_array(lq, return_branches, precision)`` (:class:`d2c_deploy.runtime_util.RuntimeModel`).
        precision (str | None): 'bf16' / 'fp16', None for fp32 (no checks).
        warn (callable): ``warn(message)``.
        hint (str): How to avoid the attempt, appended to the warning.

    Attributes:
        precision: The precision used now (None after a fall-back).
        fallback_reason (str | None): Why it fell back, if it did.
        calls (int): Runtime calls made.
    """

    def __init__(self, net, precision=None, warn=print, hint=FALLBACK_HINT):
        self.net = net
        self.precision = precision
        self.warn = warn
        self.hint = hint
        self.fallback_reason = None
        self.calls = 0
        self._check_distance = True

    def _run(self, lq, return_branches, precision):
        self.calls += 1
        return self.net.run_array(lq, return_branches, precision)

    def __call__(self, lq, return_branches=False):
        out = self._run(lq, return_branches, self.precision)
        if self.precision is None:
            return out
        problem = output_problem(lq, out)
        finite = problem is None or not problem.startswith('non-finite')
        if problem is None or (finite and not self._check_distance):
            return out
        reference = self._run(lq, return_branches, None)
        if finite and output_problem(lq, reference) is not None:
            first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
            if array_psnr(first(out), first(reference)) >= AGREEMENT_DB:
                self._check_distance = False  # fp32 does the same: the model's (or input's) doing, not an overflow
                return reference
        self.fallback_reason = f'{self.precision} gave {problem}'
        self.warn(f'{self.fallback_reason}; falling back to fp32 for this and all further passes ({self.hint})')
        self.precision = None
        return reference


def super_resolve_array(run, img, scale, tile=0, tile_pad=0, pre_pad=0, return_branches=False):
    """Super-resolve one image array, whole or tile by tile: :func:`d2c_inference.tile_util.super_resolve` in numpy.

    Args:
        run (callable): ``run(lq, return_branches)`` -> SR array, or (SR, branches, weights) (a :class:`GuardedRun`).
        img (ndarray): LR image (1, 3, H, W), float32 in [0, 1].
        scale (int): The network's scale factor s.
        tile, tile_pad, pre_pad (int): As :func:`d2c_inference.tile_util.super_resolve` (same tiles, same stitching).
        return_branches (bool): Also return branches and weight maps.

    Returns:
        tuple[ndarray, ndarray | None, ndarray | None]: float32, not clamped: SR (1, 3, sH, sW),
        branches (1, P, 3, sH, sW) and weights (1, P, sH, sW) (None unless ``return_branches``).
    """
    if img.ndim != 4 or img.shape[0] != 1:
        raise ValueError(f'super_resolve_array: expected one image (1, C, H, W), got shape {tuple(img.shape)}')
    height, width = img.shape[2:]
    pre_pad = max(0, min(int(pre_pad), height - 1, width - 1))
    if pre_pad:  # torch's reflect padding: the edge pixel is not repeated
        img = np.pad(img, ((0, 0), (0, 0), (0, pre_pad), (0, pre_pad)), mode='reflect')
    pad_h, pad_w = img.shape[2:]

    sr = branches = weights = None
    for (y0, y1, x0, x1), (wy0, wy1, wx0, wx1) in tile_boxes(pad_h, pad_w, tile, tile_pad):
        out = run(np.ascontiguousarray(img[:, :, wy0:wy1, wx0:wx1]), return_branches)
        out = out if return_branches else (out, )
        oy0, ox0 = (y0 - wy0) * scale, (x0 - wx0) * scale
        oy1, ox1 = oy0 + (y1 - y0) * scale, ox0 + (x1 - x0) * scale
        if sr is None:
            sr = np.empty((1, out[0].shape[1], pad_h * scale, pad_w * scale), np.float32)
            if return_branches:
                branches = np.empty((1, *out[1].shape[1:3], pad_h * scale, pad_w * scale), np.float32)
                weights = np.empty((1, out[2].shape[1], pad_h * scale, pad_w * scale), np.float32)
        dst = (Ellipsis, slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale))
        src = (Ellipsis, slice(oy0, oy1), slice(ox0, ox1))
        sr[dst] = out[0][src]
        if return_branches:
            branches[dst] = out[1][src]
            weights[dst] = out[2][src]
    if pre_pad:
        crop = (Ellipsis, slice(0, height * scale), slice(0, width * scale))
        sr = np.ascontiguousarray(sr[crop])
        if return_branches:
            branches, weights = np.ascontiguousarray(branches[crop]), np.ascontiguousarray(weights[crop])
    return sr, branches, weights


def to_uint8_bgr(rgb):
    """(1, 3, H, W) RGB array -> uint8 BGR (H, W, 3), as ``basicsr.utils.tensor2img`` does for tensors."""
    return (to_bgr(rgb) * 255.).round().astype(np.uint8)


def bicubic_array(lq, scale):
    """The input upscaled with cv2 INTER_CUBIC, uint8 BGR: :func:`d2c_utils.eval_util.bicubic_upscale` on an array."""
    lr = to_bgr(lq)
    up = cv2.resize(lr, (lr.shape[1] * scale, lr.shape[0] * scale), interpolation=cv2.INTER_CUBIC)
    return (np.clip(up, 0, 1) * 255).round().astype(np.uint8)


def write_grid(path, lq, branches, weights, sr, scale, max_side):
    """Input (bicubic) | branches | fused, and the weight heatmaps under the branches (arrays)."""
    cells = [bicubic_array(lq, scale)] + [to_uint8_bgr(branches[:, i]) for i in range(branches.shape[1])]
    cells.append(to_uint8_bgr(sr))
    heat = [weight_heatmap(w) for w in weights[0]]
    height, width = cells[0].shape[:2]
    if max_side and max(height, width) > max_side:  # keep the picture a viewable size
        factor = max_side / max(height, width)
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        cells = [cv2.resize(c, size, interpolation=cv2.INTER_AREA) for c in cells]
        heat = [cv2.resize(h, size, interpolation=cv2.INTER_AREA) for h in heat]
    num = branches.shape[1]
    rows = [cells, [None] + heat + [None]]
    labels = [['input (bicubic)'] + [f'branch {i + 1}' for i in range(num)] + ['fused'],
              [''] + [f'weight {i + 1}' for i in range(num)] + ['']]
    write_image(path, labelled_grid(rows, labels))


@dataclass
class InputImage:
    """A decoded input: ``lq`` (1, 3, H, W) float32 RGB in [0, 1], ``alpha`` (H, W) or None, its kind and range."""
    path: str
    lq: np.ndarray
    alpha: np.ndarray
    kind: str
    max_value: float


def read_input(path, max_pixels=MAX_PIXELS):
    """Decode ``path`` into an :class:`InputImage` (ImageError if it cannot be used)."""
    img = read_image(path, max_pixels)
    kind, max_value = image_kind(img)
    lq, alpha = split_input_array(img)
    return InputImage(path, lq, alpha, kind, max_value)


def super_resolve_image(run, image, scale, options):
    """SR (and, for ``--save-branches`` / ``--save-weights``, branches and weights) of one :class:`InputImage`."""
    need_branches = options.save_branches or options.save_weights
    return super_resolve_array(run, image.lq, scale, options.tile, options.tile_pad, options.pre_pad, need_branches)


def write_outputs(image, result, scale, options, prog='d2c-infer'):
    """Write the SR image of ``image`` in its kind, and the branches, weight maps and grid asked for.

    ``result``: what :func:`super_resolve_image` returned. Raises ImageError for an output that cannot
    be written (the input is skipped) and UserError for a full disk.
    """
    path, lq = image.path, image.lq
    sr, branches, weights = result
    kind, max_value, alpha = image.kind, image.max_value, image.alpha
    height, width = lq.shape[2:]
    size = None
    if options.outscale is not None and options.outscale != scale:
        size = (max(1, int(round(width * options.outscale))), max(1, int(round(height * options.outscale))))
    ext, note = output_ext(options.ext, path, kind, max_value)
    if note:
        tqdm.write(f'{prog}: note: {osp.basename(path)}: {note}', file=sys.stderr)
    stem = osp.splitext(osp.basename(path))[0]
    name = f'{stem}_{options.suffix}' if options.suffix else stem
    write_image(options.target(f'{name}.{ext}', path), compose_output(to_bgr(sr), kind, max_value, alpha, size))
    if options.save_branches:
        for i in range(branches.shape[1]):
            out = compose_output(to_bgr(branches[:, i]), kind, max_value, alpha, size)
            write_image(options.target(f'{stem}_branch{i + 1}.{ext}', path), out)
    if options.save_weights:
        for i, weight in enumerate(weights[0]):
            write_image(options.target(f'{stem}_weight{i + 1}.png', path), weight_heatmap(weight))
        write_grid(options.target(f'{stem}_grid.png', path), lq, branches, weights, sr, scale, options.grid_size)


def run_images(inputs, net, run, options, prog='d2c-infer', quiet=False):
    """Super-resolve ``inputs`` and write their outputs, reading ahead and writing behind the network.

    The main thread runs the network; one thread decodes the next image meanwhile and one encodes
    and writes the finished ones, in input order (at most two waiting, so memory stays bounded).
    Messages and exit statuses are ``d2c-infer``'s.

    Args:
        inputs (list[str]): Image files.
        net: Has ``upscale`` (and is what ``run`` runs).
        run (callable): ``run(lq, return_branches)`` (a :class:`GuardedRun`).
        options (OutputOptions): What to write.
        prog (str): Prefix of the messages.
        quiet (bool): No progress bar.

    Returns:
        int: 0 all written, 1 some inputs skipped (listed on stderr), 2 a full disk (what was written before).
    """
    failed, written = [], 0
    pending = deque()  # (input, future of its writing), in input order
    reader = ThreadPoolExecutor(1, thread_name_prefix='d2c-read')
    writer = ThreadPoolExecutor(1, thread_name_prefix='d2c-write')

    def skip(path, err):
        failed.append(path)
        tqdm.write(f'{prog}: skipped {path}: {err}', file=sys.stderr)

    def collect():
        nonlocal written
        path, future = pending.popleft()
        try:
            future.result()
            written += 1
        except (ImageError, OSError) as err:  # OSError: e.g. the output folder became unwritable
            skip(path, err)

    try:
        reads = deque(reader.submit(read_input, path, options.max_pixels) for path in inputs[:1])
        for index, path in enumerate(tqdm(inputs, unit='img', disable=quiet, file=sys.stderr)):
            if index + 1 < len(inputs):
                reads.append(reader.submit(read_input, inputs[index + 1], options.max_pixels))
            try:
                image = reads.popleft().result()
                result = super_resolve_image(run, image, net.upscale, options)
            except ImageError as err:
                skip(path, err)
                continue
            pending.append((path, writer.submit(write_outputs, image, result, net.upscale, options, prog)))
            while len(pending) > 2 or (pending and pending[0][1].done()):
                collect()
        while pending:
            collect()
    except UserError as err:  # a full disk: the next images would fail the same way
        print(f'{written} of {len(inputs)} image(s) written to {options.output} before', file=sys.stderr)
        return report_user_error(prog, err)
    finally:  # Ctrl-C, an error: what is queued is dropped, what runs finishes (whole files only)
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)
    print(f'{len(inputs) - len(failed)} of {len(inputs)} image(s) written to {options.output}')
    if failed:
        print(f'{prog}: {len(failed)} input(s) skipped: {", ".join(failed)}', file=sys.stderr)
        return 1
    return 0


# what d2c-infer appends to an input's name: --suffix, and the extra outputs of every model kind
_OUTPUT_TAGS = r'(?:branch\d+|weight\d+|grid|kernel|sample\d+|lr\d+|mean|spread)'


def earlier_outputs(inputs, suffix):
    """The files among ``inputs`` that d2c-infer wrote for another of them (``<stem>_<suffix or tag>.<ext>``).

    A re-run with the output folder as input folder must not super-resolve its own outputs
    (``photo_out_out.png``).
    """
    stems = {osp.splitext(osp.basename(p))[0] for p in inputs}
    tags = _OUTPUT_TAGS if not suffix else f'(?:{re.escape(suffix)}|{_OUTPUT_TAGS})'
    pattern = re.compile(rf'(.+)_{tags}')
    found = []
    for path in inputs:
        match = pattern.fullmatch(osp.splitext(osp.basename(path))[0])
        if match and match.group(1) in stems:
            found.append(path)
    return found
