"""HR images alone, as random crops: the input of models that make their own LR images (DANModel)."""
import random
from os import path as osp

from torch.utils import data as data

from basicsr.data.data_util import paths_from_lmdb
from basicsr.data.transforms import augment
from basicsr.utils import FileClient, imfrombytes, img2tensor, scandir
from basicsr.utils.registry import DATASET_REGISTRY
from d2c_utils.errors import UserError


@DATASET_REGISTRY.register()
class HRImageDataset(data.Dataset):
    """Random crops of HR images from a folder or an LMDB (BasicSR's layouts, e.g. DIV2K sub-images).

    Options (``datasets.train``):
        dataroot_gt (str): Folder of images, or an LMDB (``io_backend.type: lmdb``; its
            ``meta_info.txt`` lists the keys, as BasicSR's ``scripts/data_preparation`` writes it).
        meta_info_file (str, optional): Folder mode: a file whose first column lists the images.
        io_backend (dict): ``{type: disk}`` or ``{type: lmdb}``.
        gt_size (int | None): Side of the random crop; None: whole images (validation).
        use_hflip, use_rot (bool): Random horizontal flip; vertical flip and transpose (BasicSR's augment).
        scale (int, optional): Crops and whole images are cut to a multiple of it (mod-crop).

    Returns per item: ``{'gt': (3, gt_size, gt_size) float32 RGB in [0, 1], 'gt_path': str}``.
    """

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        self.file_client = None
        self.io_backend_opt = dict(opt['io_backend'])
        self.gt_folder = opt['dataroot_gt']
        if self.io_backend_opt['type'] == 'lmdb':
            self.io_backend_opt['db_paths'] = [self.gt_folder]
            self.io_backend_opt['client_keys'] = ['gt']
            self.paths = paths_from_lmdb(self.gt_folder)
        elif opt.get('meta_info_file'):
            with open(opt['meta_info_file'], encoding='utf-8') as f:
                self.paths = [osp.join(self.gt_folder, line.split(' ')[0].strip()) for line in f if line.strip()]
        else:
            if not osp.isdir(self.gt_folder):
                raise UserError(f'HRImageDataset {opt.get("name")}: dataroot_gt {self.gt_folder} is not a folder')
            self.paths = sorted(scandir(self.gt_folder, full_path=True))
        if not self.paths:
            raise UserError(f'HRImageDataset {opt.get("name")}: no images in {self.gt_folder}')

    def __getitem__(self, index):
        if self.file_client is None:
            backend = dict(self.io_backend_opt)
            self.file_client = FileClient(backend.pop('type'), **backend)
        path = self.paths[index]
        img = imfrombytes(self.file_client.get(path, 'gt'), float32=True)
        gt_size, scale = self.opt.get('gt_size'), self.opt.get('scale', 1)
        height, width = img.shape[:2]
        if gt_size:
            if height < gt_size or width < gt_size:
                raise UserError(f'HRImageDataset: {path} is {width}x{height}, smaller than gt_size {gt_size}')
            top, left = random.randint(0, height - gt_size), random.randint(0, width - gt_size)
            img = img[top:top + gt_size, left:left + gt_size]
        img = img[:img.shape[0] // scale * scale, :img.shape[1] // scale * scale]
        img = augment(img, self.opt.get('use_hflip', False), self.opt.get('use_rot', False))
        return {'gt': img2tensor(img, bgr2rgb=True, float32=True), 'gt_path': path}

    def __len__(self):
        return len(self.paths)
