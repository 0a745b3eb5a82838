"""Reading and writing images as stored: gray, BGR, BGRA; 8 and 16 bit; non-ASCII paths.

The one image reader of the project (:func:`read_image`): inference, data preparation and the
demo read through it, so a truncated or odd file gets the same clear message everywhere.
"""
import os
from os import path as osp

import cv2
import numpy as np

from .errors import ImageError, UserError

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# the IEND chunk: length 0, type, CRC; every complete PNG ends with these 12 bytes
PNG_IEND = b'\x00\x00\x00\x00IEND\xaeB`\x82'


def check_container(data, ext):
    """Raise ImageError if a PNG or JPEG file is cut off or misnamed.

    OpenCV may decode a cut-off file into a partly grey image without an error, so the
    container's end is checked before the pixels are trusted.
    """
    if ext == '.png':
        if not data.startswith(PNG_SIGNATURE):
            raise ImageError('not a PNG file (bad signature) although named .png')
        if not data.endswith(PNG_IEND):
            raise ImageError(
                f'PNG is truncated: it does not end with an IEND chunk ({len(data)} bytes); '
                're-download or re-export it', 'truncated')
    elif ext in ('.jpg', '.jpeg'):
        if not data.startswith(b'\xff\xd8'):
            raise ImageError('not a JPEG file (bad signature) although named .jpg')
        if not data.rstrip(b'\x00\r\n ').endswith(b'\xff\xd9'):
            raise ImageError('JPEG is truncated: no end-of-image marker; re-download or re-export it', 'truncated')


def read_image(path):
    """Decode an image file as stored (works with non-ASCII paths).

    Returns:
        ndarray: uint8 or uint16, (H, W) gray, (H, W, 3) BGR or (H, W, 4) BGRA (gray + alpha
        PNGs decode as BGRA).

    Raises:
        ImageError: unreadable, empty, truncated or damaged file, not an image, unsupported
            pixel type or channel count; ``kind`` says which of 'unreadable', 'truncated',
            'unsupported'.
    """
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as err:
        raise ImageError(f'cannot read: {err.strerror or err}') from None
    if not data:
        raise ImageError('empty file (0 bytes)')
    check_container(data, osp.splitext(path)[1].lower())
    # what basicsr.utils.imfrombytes(data, 'unchanged') does, without importing basicsr (and torch),
    # so that data preparation starts in a fraction of a second
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageError('not an image OpenCV can decode (unknown format or damaged file)')
    if img.dtype not in (np.uint8, np.uint16):
        raise ImageError(f'unsupported pixel type {img.dtype}; 8- and 16-bit images are supported', 'unsupported')
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[2] not in (3, 4):
        raise ImageError(f'unsupported number of channels {img.shape[2]}; gray, RGB and RGBA are supported',
                         'unsupported')
    return img


def write_image(path, img):
    """Encode by the file's extension and write (works with non-ASCII paths)."""
    ok, buf = cv2.imencode(osp.splitext(path)[1], img)
    if not ok:
        raise ImageError(f'OpenCV could not encode {osp.basename(path)}')
    buf.tofile(path)


def image_kind(img):
    """'gray', 'rgb' or 'rgba' and the maximum value (255 or 65535) of a decoded image."""
    kind = 'gray' if img.ndim == 2 else ('rgba' if img.shape[2] == 4 else 'rgb')
    return kind, (65535. if img.dtype == np.uint16 else 255.)


def split_input(img):
    """Decoded image -> network input and what is needed to rebuild the same kind of image.

    Returns:
        tuple[Tensor, ndarray | None]: LR (1, 3, H, W) float32 RGB in [0, 1] (16-bit images keep
        full precision) and the alpha channel (H, W) float32 in [0, 1] or None.
    """
    from basicsr.utils import img2tensor  # only here: the readers above must not import torch
    kind, max_value = image_kind(img)
    img = img.astype(np.float32) / max_value
    alpha = None
    if kind == 'gray':
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)  # the network is RGB: run gray as 3 equal channels
    elif kind == 'rgba':
        alpha, img = img[..., 3], img[..., :3]
    return img2tensor(img, bgr2rgb=True, float32=True).unsqueeze(0), alpha


def to_bgr(tensor):
    """(1, 3, H, W) or (3, H, W) RGB tensor -> (H, W, 3) float32 BGR ndarray, clamped to [0, 1]."""
    rgb = tensor.reshape(-1, *tensor.shape[-2:]).clamp(0, 1).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(rgb[..., ::-1])


def compose_output(bgr, kind, max_value, alpha=None, size=None):
    """Network output -> an image of the input's kind.

    Args:
        bgr (ndarray): (sH, sW, 3) float32 BGR in [0, 1].
        kind (str): 'gray' (converted back from 3 channels), 'rgb' or 'rgba'.
        max_value (float): 255 (uint8 out) or 65535 (uint16 out).
        alpha (ndarray | None): LR alpha (H, W) in [0, 1], upscaled here with cv2 INTER_LINEAR.
        size (tuple[int, int] | None): Final (width, height) (``--outscale``), resized with
            cv2 INTER_LANCZOS4 before quantisation; None keeps the network's size.

    Returns:
        ndarray: uint8 / uint16, (H', W') gray, (H', W', 3) BGR or (H', W', 4) BGRA.
    """
    out = bgr
    if kind == 'gray':
        out = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)
    elif kind == 'rgba':
        up_alpha = cv2.resize(alpha, (out.shape[1], out.shape[0]), interpolation=cv2.INTER_LINEAR)
        out = np.dstack([out, up_alpha])
    if size is not None and size != (out.shape[1], out.shape[0]):
        out = cv2.resize(out, size, interpolation=cv2.INTER_LANCZOS4)
    dtype = np.uint16 if max_value > 255 else np.uint8
    return (np.clip(out, 0, 1) * max_value).round().astype(dtype)


def output_ext(requested, input_path, kind, max_value):
    """File extension for an output and a note when the requested format cannot hold it."""
    ext = osp.splitext(input_path)[1].lower().lstrip('.') if requested == 'auto' else requested
    if kind == 'rgba' and ext not in ('png', 'tif', 'tiff', 'webp'):
        return 'png', f'{ext or "no extension"} cannot hold an alpha channel: writing PNG'
    if max_value > 255 and ext not in ('png', 'tif', 'tiff'):
        return 'png', f'{ext or "no extension"} cannot hold 16-bit samples: writing PNG'
    if not ext or not cv2.haveImageWriter(f'x.{ext}'):
        return 'png', f'OpenCV cannot write .{ext} files: writing PNG'
    return ext, None


def list_inputs(path):
    """One file, or the non-hidden files of a folder (sorted); raises UserError if none."""
    if osp.isfile(path):
        return [path]
    if osp.isdir(path):
        names = sorted(n for n in os.listdir(path) if not n.startswith('.') and osp.isfile(osp.join(path, n)))
        if not names:
            raise UserError(f'input folder {path} has no files')
        return [osp.join(path, n) for n in names]
    raise UserError(f'input not found: {path} (pass -i <image or folder>)')
