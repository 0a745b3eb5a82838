"""Unpaired LR and HR images, drawn independently: the training data of SDFlow."""
import random
from os import path as osp

import cv2
import numpy as np
from torch.utils import data as data

from basicsr.data.data_util import paths_from_lmdb
from basicsr.data.transforms import augment
from basicsr.utils import FileClient, img2tensor, scandir
from basicsr.utils.registry import DATASET_REGISTRY
from d2c_utils.errors import UserError

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')


def list_images(folder, what):
    """Sorted image paths of a folder (recursively; files without an image suffix are left out)."""
    if not osp.isdir(folder):
        raise UserError(f'{what} {folder} is not a folder')
    paths = sorted(p for p in scandir(folder, recursive=True, full_path=True) if p.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise UserError(f'{what} {folder} holds no images ({", ".join(IMAGE_SUFFIXES)})')
    return paths


def decode_image(content, path):
    """BGR float32 (H, W, 3) in [0, 1] from encoded bytes; UserError naming ``path`` if they are not an image."""
    img = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f'{path} is not a readable image; remove it from the data set or re-encode it as PNG')
    return img.astype(np.float32) / 255.0


@DATASET_REGISTRY.register()
class UnpairedImageDataset(data.Dataset):
    """LR crops and HR crops from two unrelated sources (folders or LMDBs), drawn independently.

    Item ``i`` is HR image ``i`` (the epoch runs over the HR source) and an LR image drawn
    uniformly at random, each cropped and augmented on its own: no pixel correspondence is assumed
    or wanted. Both sources may be folders (``io_backend.type: disk``) or LMDBs made by BasicSR's
    ``scripts/data_preparation/create_lmdb.py`` (``io_backend.type: lmdb``; existing DF2K / RealSR
    LMDBs work as they are).

    Options (``datasets.train``):
        dataroot_lq (str): LR source (real low-quality photos).
        dataroot_gt (str): HR source (clean high-resolution photos).
        io_backend (dict): ``{type: disk}`` or ``{type: lmdb}`` (both sources).
        gt_size (int): HR crop side; a multiple of 8 for SDFlow (its degradation flow squeezes the
            H/4 content once more).
        lq_size (int, optional): LR crop side; default ``gt_size // scale``.
        scale (int): 4.
        use_hflip, use_rot (bool): BasicSR's augmentation, drawn separately for LR and HR.

    Returns per item: ``{'lq': (3, lq_size, lq_size), 'gt': (3, gt_size, gt_size)}`` float32 RGB in
    [0, 1], plus ``lq_path`` and ``gt_path``.
    """

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        self.file_client = None
        self.io_backend_opt = dict(opt['io_backend'])
        name = opt.get('name', 'UnpairedImageDataset')
        for key in ('dataroot_lq', 'dataroot_gt', 'gt_size'):
            if not opt.get(key):
                raise UserError(f'datasets {name}: {key} is missing (UnpairedImageDataset needs dataroot_lq, '
                                'dataroot_gt and gt_size)')
        self.scale = opt.get('scale', 4)
        self.gt_size = opt['gt_size']
        self.lq_size = opt.get('lq_size') or self.gt_size // self.scale
        if self.gt_size % (2 * self.scale):
            raise UserError(f'datasets {name}: gt_size={self.gt_size} must be a multiple of {2 * self.scale} '
                            '(SDFlow squeezes the content of the crop once more)')
        if self.lq_size % 2:
            raise UserError(f'datasets {name}: lq_size={self.lq_size} must be even')
        if self.io_backend_opt['type'] == 'lmdb':
            self.io_backend_opt['db_paths'] = [opt['dataroot_lq'], opt['dataroot_gt']]
            self.io_backend_opt['client_keys'] = ['lq', 'gt']
            self.lq_paths = paths_from_lmdb(opt['dataroot_lq'])
            self.gt_paths = paths_from_lmdb(opt['dataroot_gt'])
        else:
            self.lq_paths = list_images(opt['dataroot_lq'], f'datasets {name}: dataroot_lq')
            self.gt_paths = list_images(opt['dataroot_gt'], f'datasets {name}: dataroot_gt')

    def _crop(self, key, path, size):
        img = decode_image(self.file_client.get(path, key), path)
        height, width = img.shape[:2]
        if height < size or width < size:
            raise UserError(f'{path} is {width}x{height}, smaller than the {size}x{size} crop; '
                            f'lower {"gt_size" if key == "gt" else "lq_size"} or remove the image')
        top, left = random.randint(0, height - size), random.randint(0, width - size)
        img = augment(img[top:top + size, left:left + size], self.opt.get('use_hflip', False),
                      self.opt.get('use_rot', False))
        return img2tensor(img, bgr2rgb=True, float32=True)

    def __getitem__(self, index):
        if self.file_client is None:
            backend = dict(self.io_backend_opt)
            self.file_client = FileClient(backend.pop('type'), **backend)
        gt_path = self.gt_paths[index % len(self.gt_paths)]
        lq_path = self.lq_paths[random.randrange(len(self.lq_paths))]
        return {
            'lq': self._crop('lq', lq_path, self.lq_size),
            'gt': self._crop('gt', gt_path, self.gt_size),
            'lq_path': lq_path,
            'gt_path': gt_path
        }

    def __len__(self):
        return len(self.gt_paths)
