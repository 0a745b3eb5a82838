"""Perceptual metrics as BasicSR metrics: LPIPS (the D2C-SR paper's Table 2) and DISTS.

Both are computed by the packages of the optional extra ``perceptual`` (``pip install
"d2c-sr[perceptual]"``), never re-implemented here:

* ``calculate_lpips``: the ``lpips`` package (Zhang et al., the reference implementation; its
  linear heads ``weights/v0.1/<net>.pth`` ship inside the package). Default ``net: alex``,
  ``version: '0.1'``: LPIPS v0.1 as the SR papers report it. Lower is better.
* ``calculate_dists``: ``piq.DISTS`` (Ding et al.; VGG16 with L2 pooling, inputs whose shorter
  side exceeds 256 are resized to 256 first, as the DISTS authors do). Lower is better.

Their backbones come from torchvision's usual files in the torch hub cache
(``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``): AlexNet
``alexnet-owt-7be5be79.pth`` (LPIPS alex), VGG16 ``vgg16-397923af.pth`` (LPIPS vgg, DISTS),
SqueezeNet 1.1 ``squeezenet1_1-b8a52dc0.pth`` (LPIPS squeeze), and DISTS's alpha/beta
``dists_weights.pt`` (piq's release). A missing file is downloaded from its usual address the
first time (``download: true``, the default; with a socket time-out, so a machine without
internet fails in seconds instead of hanging); when it cannot be had the metric stops with one
line naming the file, the folder to put it in and where to get it (a :class:`MissingWeightsError`,
a ``UserError``: d2c-test and d2c-infer print it as ``<prog>: error: ...``). ``download: false``
never touches the network.

BasicSR's validation hands metrics uint8 BGR images (``tensor2img``), so these functions take
images in [0, 255], BGR, HWC (or CHW with ``input_order='CHW'``); gray images are repeated to
three channels. The networks are built once per (metric, options, device) and kept.

Option files use them as::

    metrics:
      lpips: {type: calculate_lpips, crop_border: 0, better: lower}
      dists: {type: calculate_dists, crop_border: 0, better: lower}
"""
import os
import socket
import warnings
from contextlib import contextmanager
from os import path as osp

import numpy as np
import torch

from basicsr.metrics.metric_util import reorder_image
from basicsr.utils.registry import METRIC_REGISTRY
from d2c_utils.errors import UserError

EXTRA_HINT = 'pip install "d2c-sr[perceptual]"'
# torchvision weight enums of the backbones (their .url gives the file name torchvision caches)
LPIPS_BACKBONES = {'alex': 'AlexNet_Weights', 'vgg': 'VGG16_Weights', 'squeeze': 'SqueezeNet1_1_Weights'}
LPIPS_VERSIONS = ('0.0', '0.1')
DOWNLOAD_TIMEOUT = 30  # seconds without a byte before a download counts as failed
# built networks: (metric, options..., device) -> module in eval mode; tests may put their own here
NETWORKS = {}


class MissingWeightsError(UserError):
    """A backbone weight file is not in the torch hub cache and could not be downloaded."""


def hub_checkpoint_dir():
    """Where torch (and torchvision) keep downloaded weights: ``torch.hub.get_dir()/checkpoints``."""
    return osp.join(torch.hub.get_dir(), 'checkpoints')


@contextmanager
def _socket_timeout(seconds):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def ensure_weight_files(urls, what, download=True):
    """The paths of the ``urls``' files in the torch hub cache; missing ones downloaded there first if allowed.

    Args:
        urls (sequence[str]): The files' usual addresses (torchvision's / the library's); the file
            name is the address's last part, as torch.hub names its downloads.
        what (str): What needs them, for the message (e.g. 'calculate_lpips (net alex)').
        download (bool): Try the usual download of a missing file (with a socket time-out).

    Raises:
        MissingWeightsError: one line naming every missing file, the folder and the addresses.
    """
    folder = hub_checkpoint_dir()
    paths, missing, reason = [], [], 'download: false'
    for url in urls:
        path = osp.join(folder, osp.basename(url))
        paths.append(path)
        if osp.isfile(path):
            continue
        if not download:
            missing.append(url)
            continue
        try:
            os.makedirs(folder, exist_ok=True)
            with _socket_timeout(DOWNLOAD_TIMEOUT):
                torch.hub.download_url_to_file(url, path, progress=True)  # VGG16 is 528 MB: show it
        except Exception as err:  # no network, proxy, HTTP error, full disk: all mean "put it there yourself"
            missing.append(url)
            reason = f'download failed: {type(err).__name__}: {err}'.replace('\n', ' ')
    if missing:
        names = ' and '.join(osp.basename(url) for url in missing)
        sources = ', '.join(missing)
        raise MissingWeightsError(f'{what} needs the weight file{"s" if len(missing) > 1 else ""} {names} in {folder} '
                                  f'({reason}); copy {"them" if len(missing) > 1 else "it"} there from {sources} (or '
                                  'set TORCH_HOME to a folder whose hub/checkpoints holds them)')
    return paths


def _import(module, metric):
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f'{metric} needs the {module} package: {EXTRA_HINT}') from None


def _device(device):
    if device in (None, 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(device)


def _backbone_url(net):
    import torchvision
    return getattr(torchvision.models, LPIPS_BACKBONES[net]).IMAGENET1K_V1.url


def load_lpips_backbone(model, path):
    """Copy torchvision's ``features.<i>.*`` tensors from ``path`` into an ``lpips.LPIPS``'s backbone.

    lpips splits torchvision's ``features`` into ``slice<k>`` modules keeping the layer indices as
    names (``slice2.3.weight`` is ``features.3.weight``), so the keys map by rule; every tensor of
    the backbone must be found with its shape.
    """
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # truncated download, another file under that name
        raise MissingWeightsError(f'{path} cannot be read ({type(err).__name__}: {err}); delete it so that it is '
                                  'fetched again, or copy a good one there'.replace('\n', ' ')) from None
    target = model.net.state_dict()
    loaded = {}
    for key, value in target.items():
        source = 'features.' + key.split('.', 1)[1]
        if source not in state or state[source].shape != value.shape:
            raise MissingWeightsError(f'{path} is not the torchvision backbone lpips expects: {source} '
                                      f'{"missing" if source not in state else tuple(state[source].shape)}, '
                                      f'expected {tuple(value.shape)}; delete it so that it is fetched again')
        loaded[key] = state[source]
    model.net.load_state_dict(loaded)


def lpips_network(net='alex', version='0.1', device='auto', download=True):
    """The ``lpips.LPIPS`` network (eval mode, no gradients) with torchvision's pretrained backbone.

    Built with a random backbone (``pnet_rand=True``: the lpips package never downloads), whose
    tensors are then read from the torch hub cache (:func:`ensure_weight_files`); the v0.x linear
    heads are the lpips package's own files.
    """
    if net not in LPIPS_BACKBONES:
        raise UserError(f'calculate_lpips: net {net!r}; use one of {sorted(LPIPS_BACKBONES)}')
    version = str(version)
    if version not in LPIPS_VERSIONS:
        raise UserError(f'calculate_lpips: version {version!r}; use one of {LPIPS_VERSIONS}')
    device = _device(device)
    key = ('lpips', net, version, str(device))
    if key not in NETWORKS:
        lpips = _import('lpips', 'calculate_lpips')
        path, = ensure_weight_files([_backbone_url(net)], f'calculate_lpips (net {net})', download)
        with warnings.catch_warnings():  # lpips asks torchvision with the old `pretrained=False` spelling
            warnings.simplefilter('ignore', UserWarning)
            model = lpips.LPIPS(net=net, version=version, pnet_rand=True, verbose=False)
        load_lpips_backbone(model, path)
        NETWORKS[key] = model.eval().requires_grad_(False).to(device)
    return NETWORKS[key]


def dists_network(device='auto', download=True):
    """``piq.DISTS`` (eval mode, no gradients), built from the files of the torch hub cache."""
    device = _device(device)
    key = ('dists', str(device))
    if key not in NETWORKS:
        piq = _import('piq', 'calculate_dists')
        import torchvision
        paths = ensure_weight_files([torchvision.models.VGG16_Weights.IMAGENET1K_V1.url, piq.DISTS._weights_url],
                                    'calculate_dists', download)
        try:
            with warnings.catch_warnings():  # piq asks torchvision with the old `pretrained=True` spelling
                warnings.simplefilter('ignore', UserWarning)
                model = piq.DISTS(reduction='none')  # both files are cached now: torch reads them, nothing is fetched
        except Exception as err:  # a truncated or foreign file under one of those names
            raise MissingWeightsError(f'calculate_dists: {" or ".join(paths)} cannot be read ({type(err).__name__}: '
                                      f'{err}); delete the damaged file so that it is fetched again, or copy a good '
                                      'one there'.replace('\n', ' ')) from None
        NETWORKS[key] = model.eval().requires_grad_(False).to(device)
    return NETWORKS[key]


def check_weight_files(metrics_opt):
    """Make sure the weight files of the LPIPS/DISTS metrics in ``metrics_opt`` are in the torch hub cache.

    Called by d2c-train and d2c-test before BasicSR starts, so that a missing file stops the run at
    once instead of at the first validation, hours later. Only files are checked (and fetched where
    allowed); the networks are built on first use.

    Args:
        metrics_opt (dict | None): ``val.metrics`` of an option file: name -> {type: ..., ...}.

    Raises:
        UserError: the package is missing, an option is wrong or a file cannot be had (one line).
    """
    for name, metric in (metrics_opt or {}).items():
        if not isinstance(metric, dict) or metric.get('type') not in ('calculate_lpips', 'calculate_dists'):
            continue
        download = metric.get('download', True)
        if metric['type'] == 'calculate_lpips':
            net = metric.get('net', 'alex')
            if net not in LPIPS_BACKBONES:
                raise UserError(f'val.metrics.{name}: net {net!r}; use one of {sorted(LPIPS_BACKBONES)}')
            _import('lpips', 'calculate_lpips')
            ensure_weight_files([_backbone_url(net)], f'calculate_lpips (net {net})', download)
        else:
            piq = _import('piq', 'calculate_dists')
            import torchvision
            ensure_weight_files([torchvision.models.VGG16_Weights.IMAGENET1K_V1.url, piq.DISTS._weights_url],
                                'calculate_dists', download)


def image_tensor(img, input_order, crop_border, name):
    """BasicSR's metric input -> (1, 3, H, W) float32 RGB tensor in [0, 1].

    Args:
        img (ndarray): [0, 255], BGR, (H, W, C) or (C, H, W) with ``input_order='CHW'``; C in 1, 3.
    """
    if input_order not in ('HWC', 'CHW'):
        raise ValueError(f'{name}: input_order must be "HWC" or "CHW", got {input_order!r}.')
    img = reorder_image(np.asarray(img), input_order=input_order).astype(np.float32)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if img.shape[2] != 3:
        raise ValueError(f'{name}: needs gray or 3-channel BGR images, got shape {img.shape}.')
    if crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border]
    img = np.clip(img / 255., 0., 1.)[..., ::-1]  # BGR -> RGB: both networks were trained on RGB
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]


def _pair(img, img2, input_order, crop_border, name, device):
    if np.shape(img) != np.shape(img2):
        raise ValueError(f'{name}: image shapes differ: {np.shape(img)} vs {np.shape(img2)}.')
    return (image_tensor(img, input_order, crop_border,
                         name).to(device), image_tensor(img2, input_order, crop_border, name).to(device))


@METRIC_REGISTRY.register()
def calculate_lpips(img,
                    img2,
                    crop_border=0,
                    input_order='HWC',
                    net='alex',
                    version='0.1',
                    device='auto',
                    download=True,
                    **kwargs):
    """LPIPS distance between an SR image and its ground truth (the ``lpips`` package); lower is better.

    Args:
        img (ndarray): SR image, range [0, 255] (uint8 from BasicSR's validation), BGR, (H, W, 3).
        img2 (ndarray): HR image, same shape and range.
        crop_border (int): Pixels shaved at each border first. Default: 0 (the whole image).
        input_order (str): 'HWC' or 'CHW'. Default: 'HWC'.
        net (str): Backbone: 'alex' (default, what SR papers report), 'vgg' or 'squeeze'.
        version (str): Linear heads '0.1' (default) or '0.0'.
        device (str): 'auto' (CUDA if available), 'cpu', 'cuda', ...
        download (bool): Fetch a missing backbone file from torchvision's address. Default: True.

    Returns:
        float: LPIPS, 0 for identical images.
    """
    model = lpips_network(net, version, device, download)
    x, y = _pair(img, img2, input_order, crop_border, 'calculate_lpips', next(model.parameters()).device)
    with torch.no_grad():
        return float(model(x, y, normalize=True).flatten()[0])  # normalize: [0, 1] -> the net's [-1, 1]


@METRIC_REGISTRY.register()
def calculate_dists(img, img2, crop_border=0, input_order='HWC', device='auto', download=True, **kwargs):
    """DISTS distance (``piq.DISTS``) between an SR image and its ground truth; lower is better.

    Args:
        img (ndarray): SR image, range [0, 255] (uint8 from BasicSR's validation), BGR, (H, W, 3).
        img2 (ndarray): HR image, same shape and range.
        crop_border (int): Pixels shaved at each border first. Default: 0 (the whole image).
        input_order (str): 'HWC' or 'CHW'. Default: 'HWC'.
        device (str): 'auto' (CUDA if available), 'cpu', 'cuda', ...
        download (bool): Fetch missing files from their usual addresses. Default: True.

    Returns:
        float: DISTS, 0 for identical images.
    """
    model = dists_network(device, download)
    x, y = _pair(img, img2, input_order, crop_border, 'calculate_dists', model.mean.device)
    with torch.no_grad():
        return float(model(x, y).flatten()[0])
