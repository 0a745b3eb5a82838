"""Reading and writing images as stored: gray, BGR, BGRA; 8 and 16 bit; non-ASCII paths.

The one image reader of the project (:func:`read_image`): inference, data preparation and the
demo read through it, so a truncated or odd file gets the same clear message everywhere.
"""
import io
import os
import struct
import warnings
from os import path as osp

import cv2
import numpy as np

from .errors import ImageError, UserError
from .output_util import atomic_write_bytes

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
JPEG_SIGNATURE = b'\xff\xd8'
# the IEND chunk: length 0, type, CRC; every complete PNG ends with these 12 bytes
PNG_IEND = b'\x00\x00\x00\x00IEND\xaeB`\x82'
# the largest image decoded unless asked for more (--max-pixels): 2^28 = 16384 x 16384. A few-MB PNG may
# claim 100000 x 100000 pixels and OpenCV's own limit (2^30) lets it ask for gigabytes
DEFAULT_MAX_PIXELS = 1 << 28
# JPEG start-of-frame markers (they carry the size); C4 (DHT), C8 (JPG) and CC (DAC) are not frames
_JPEG_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# formats OpenCV writes with losses the network output should not suffer: written as PNG instead
_LOSSY_PALETTE_EXTS = ('gif', )


def _jpeg_size(data):
    index = 2
    while index + 9 < len(data):
        if data[index] != 0xFF:
            return None
        marker = data[index + 1]
        if marker == 0xFF:  # fill byte
            index += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            index += 2
            continue
        length = struct.unpack('>H', data[index + 2:index + 4])[0]
        if marker in _JPEG_SOF:
            height, width = struct.unpack('>HH', data[index + 5:index + 9])
            return width, height
        index += 2 + length
    return None


def header_size(data):
    """(width, height) an image file's header claims, read without decoding the pixels; None if unknown.

    PNG (IHDR), JPEG (start of frame), GIF (logical screen), BMP; other formats through Pillow's
    header parser when it is installed.
    """
    if data.startswith(PNG_SIGNATURE) and data[12:16] == b'IHDR':
        return struct.unpack('>II', data[16:24])
    if data.startswith(JPEG_SIGNATURE):
        return _jpeg_size(data)
    if data[:6] in (b'GIF87a', b'GIF89a'):
        return struct.unpack('<HH', data[6:10])
    if data.startswith(b'BM') and len(data) >= 26:
        width, height = struct.unpack('<ii', data[18:26])
        return abs(width), abs(height)
    try:
        from PIL import Image
    except ImportError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except Image.DecompressionBombError:
        return (1 << 31, 1)  # Pillow's own limit (far above ours) was exceeded
    except Exception:  # a format Pillow does not know: OpenCV decides below
        return None


def gif_frames(data):
    """Number of frames of a GIF file (1 if Pillow, which counts them, is not installed)."""
    try:
        from PIL import Image
    except ImportError:
        return 1
    try:
        with Image.open(io.BytesIO(data)) as img:
            return getattr(img, 'n_frames', 1)
    except Exception:
        return 1


def check_size(data, max_pixels):
    """Raise ImageError if the header claims more than ``max_pixels`` pixels (checked before decoding)."""
    size = header_size(data)
    if size is not None and max_pixels and size[0] * size[1] > max_pixels:
        raise ImageError(
            f'the header claims {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, more than the limit of '
            f'{max_pixels:,}; not decoded (a damaged file or a decompression bomb). For a genuine image that '
            'large pass --max-pixels', 'unsupported')


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
        if not data.startswith(JPEG_SIGNATURE):
            raise ImageError('not a JPEG file (bad signature) although named .jpg')
        if not data.rstrip(b'\x00\r\n ').endswith(b'\xff\xd9'):
            raise ImageError('JPEG is truncated: no end-of-image marker; re-download or re-export it', 'truncated')


def read_image(path, max_pixels=DEFAULT_MAX_PIXELS):
    """Decode an image file as stored (works with non-ASCII paths).

    Args:
        path (str): The file.
        max_pixels (int): Larger images (by their header) are refused before decoding; 0: no limit.

    Returns:
        ndarray: uint8 or uint16, (H, W) gray, (H, W, 3) BGR or (H, W, 4) BGRA (gray + alpha
        PNGs decode as BGRA).

    Raises:
        ImageError: unreadable, empty, truncated or damaged file, not an image, unsupported
            pixel type or channel count, more than ``max_pixels``, an animated GIF; ``kind`` says
            which of 'unreadable', 'truncated', 'unsupported'.
    """
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as err:
        raise ImageError(f'cannot read: {err.strerror or err}') from None
    if not data:
        raise ImageError('empty file (0 bytes)')
    check_container(data, osp.splitext(path)[1].lower())
    check_size(data, max_pixels)
    if data[:6] in (b'GIF87a', b'GIF89a'):
        frames = gif_frames(data)
        if frames > 1:  # OpenCV would silently give the first frame
            raise ImageError(
                f'animated GIF with {frames} frames; only single images are super-resolved: extract the frames '
                '(e.g. ffmpeg -i in.gif frames/%04d.png) and pass the folder', 'unsupported')
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
    """Encode by the file's extension and write atomically (works with non-ASCII paths).

    A failed write (full disk, kill) leaves no partial file and an existing ``path`` untouched
    (:func:`d2c_utils.output_util.atomic_write`).
    """
    ok, buf = cv2.imencode(osp.splitext(path)[1], img)
    if not ok:
        raise ImageError(f'OpenCV could not encode {osp.basename(path)}')
    atomic_write_bytes(path, buf.tobytes())


def image_kind(img):
    """'gray', 'rgb' or 'rgba' and the maximum value (255 or 65535) of a decoded image."""
    kind = 'gray' if img.ndim == 2 else ('rgba' if img.shape[2] == 4 else 'rgb')
    return kind, (65535. if img.dtype == np.uint16 else 255.)


def split_input_array(img):
    """Decoded image -> network input as an array, and what is needed to rebuild the same kind of image.

    Returns:
        tuple[ndarray, ndarray | None]: LR (1, 3, H, W) float32 RGB in [0, 1] (16-bit images keep
        full precision) and the alpha channel (H, W) float32 in [0, 1] or None.
    """
    kind, max_value = image_kind(img)
    img = img.astype(np.float32) / max_value
    alpha = None
    if kind == 'gray':
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)  # the network is RGB: run gray as 3 equal channels
    elif kind == 'rgba':
        alpha, img = img[..., 3], img[..., :3]
    return np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))[None], alpha


def split_input(img):
    """:func:`split_input_array` with the LR image as a tensor (1, 3, H, W), float32 RGB in [0, 1]."""
    import torch  # only here: the readers above must not import torch

    lq, alpha = split_input_array(img)
    return torch.from_numpy(lq), alpha


def to_bgr(image):
    """(1, 3, H, W) or (3, H, W) RGB tensor or ndarray -> (H, W, 3) float32 BGR ndarray, clamped to [0, 1]."""
    if isinstance(image, np.ndarray):
        rgb = np.clip(image.reshape(-1, *image.shape[-2:]), 0, 1).transpose(1, 2, 0)
    else:
        rgb = image.reshape(-1, *image.shape[-2:]).clamp(0, 1).permute(1, 2, 0).numpy()
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
    if ext in _LOSSY_PALETTE_EXTS:
        return 'png', f'{ext} has a 256-colour palette and would lose detail: writing PNG'
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
