"""DANModel: DANv2 trained end to end on HR images with blur kernels drawn every iteration.

Training (``datasets.train`` gives HR crops ``gt``, e.g. :class:`d2c_data.HRImageDataset` on
DIV2K + Flickr2K sub-images, folders or LMDB): every iteration draws one kernel per image
(``train.degradation``: setting 1 isotropic / setting 2 anisotropic, see
:mod:`d2c_data.degradations`), makes the LR batch on the model's device (blur, bicubic or
s-fold decimation, 8-bit rounding) and minimises

    L = pixel_opt(x_T, x_HR) + kernel_opt(k_T, k_gt)

on the last iteration only (the official code; the author found supervising every iteration
unstable). The stop-gradients of the loop make the Restorer learn from the first term only and
the Estimator from the second only. Restorer and Estimator have their own learning rates:
``train.optim_g.lr`` and ``train.optim_e.lr``, both required (the official option files lack the
second, which crashes at the first step). The kernel error (mean |k_i - k_gt|) of every
iteration is logged. Validation on paired LR/HR sets (Gaussian8) gives BasicSR's metrics and,
where the data set names ``dataroot_kernel`` (``<name>.npy`` per LR image), the kernel error.

Precision, channels_last, the non-finite-loss policy, checked loading and atomic saving come
from :class:`PluginModelMixin`, as for D2CModel.
"""
from os import path as osp

import numpy as np
import torch

from basicsr.losses import build_loss
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

# the module, not its names: importing degradations first imports basicsr, whose autoload imports this file
from d2c_data import degradations
from d2c_utils.errors import UserError
from d2c_utils.precision_util import autocast
from .model_mixin import PluginModelMixin


@MODEL_REGISTRY.register()
class DANModel(PluginModelMixin, SRModel):
    """BasicSR model of DANv2 (``network_g.type: DAN``).

    Options beyond SRModel's:
        train.optim_e (dict): ``lr`` of the Estimator's parameter group (the optimizer type and
            its other arguments come from ``optim_g``).
        train.kernel_opt (dict): Loss on the last kernel estimate (e.g. ``{type: L1Loss}``).
        train.degradation (dict): ``setting`` (1 | 2), ``sigma_range``, ``noise`` (setting 2),
            ``downsample`` ('bicubic' | 'decimate'); the kernel size is ``network_g.kernel_size``.
            Defaults: :func:`d2c_data.degradations.default_kernel_options` for the scale.
    """

    def __init__(self, opt):
        self.setup_plugin_options(opt)
        net_opt = opt['network_g']
        if net_opt.get('type') != 'DAN':
            raise UserError(f'DANModel trains network_g.type DAN, not {net_opt.get("type")!r}')
        self.scale = opt['scale']
        if net_opt.get('upscale', 4) != self.scale:
            raise UserError(f'network_g.upscale={net_opt.get("upscale", 4)} but scale={self.scale}; make them equal')
        if opt['is_train']:
            self.degradation = self._degradation_options(opt)
        self.rng = np.random.default_rng(opt.get('manual_seed'))
        self.kernel_errors = []
        if opt['num_gpu'] == 0:
            # the Estimator's softmax tails and their gradients reach float32 denormals, which x86 CPUs
            # compute many times slower (a CPU run slowed from 0.2 to 2 s per iteration); flush them to zero
            torch.set_flush_denormal(True)
        super().__init__(opt)

    def _degradation_options(self, opt):
        deg = dict(opt['train'].get('degradation') or {})
        defaults = degradations.default_kernel_options(deg.get('setting', 1), self.scale)
        defaults['downsample'] = 'bicubic'
        unknown = sorted(set(deg) - set(defaults) - {'noise'})
        if unknown:
            raise UserError(f'train.degradation: unknown keys {unknown}; known: {sorted(set(defaults) | {"noise"})}')
        deg = dict(defaults, **deg)
        size = opt['network_g'].get('kernel_size', 21)
        if deg['kernel_size'] != size:
            if 'kernel_size' in (opt['train'].get('degradation') or {}):
                raise UserError(f'train.degradation.kernel_size={deg["kernel_size"]} but network_g.kernel_size={size}; '
                                'the Estimator outputs kernels of the network size: make them equal')
            deg['kernel_size'] = size
        if deg['downsample'] not in degradations.DOWNSAMPLES:
            raise UserError(
                f'train.degradation.downsample={deg["downsample"]!r}; use one of {degradations.DOWNSAMPLES}')
        return deg

    # ------------------------------------------------------------------------ set-up
    def init_training_settings(self):
        train_opt = self.opt['train']
        if not train_opt.get('kernel_opt'):
            raise UserError('train.kernel_opt is missing: DANModel needs a loss on the estimated kernel, '
                            'e.g. kernel_opt: {type: L1Loss, loss_weight: 1.0}')
        self.cri_kernel = build_loss(train_opt['kernel_opt']).to(self.device)
        super().init_training_settings()
        logger = get_root_logger()
        deg = self.degradation
        logger.info(f'DANModel: setting {deg["setting"]} kernels of side {deg["kernel_size"]}, sigma in '
                    f'{deg["sigma_range"]}, {deg["downsample"]} x{self.scale}; lr Restorer '
                    f'{train_opt["optim_g"]["lr"]}, Estimator {train_opt["optim_e"]["lr"]}')

    def setup_optimizers(self):
        """One optimizer, two parameter groups: the Restorer at ``optim_g.lr``, the Estimator at ``optim_e.lr``."""
        train_opt = self.opt['train']
        optim_g = dict(train_opt.get('optim_g') or {})
        optim_e = train_opt.get('optim_e')
        if not isinstance(optim_e, dict) or 'lr' not in optim_e:
            raise UserError('train.optim_e.lr is missing: DAN trains its Estimator with a learning rate of its own '
                            '(train.optim_e: {lr: 4.0e-4}); the official option files leave it out, which fails at '
                            'the first step')
        if 'lr' not in optim_g or 'type' not in optim_g:
            raise UserError('train.optim_g needs type and lr (the Restorer\'s), e.g. {type: Adam, lr: 4.0e-4}')
        net = self.get_bare_model(self.net_g)
        groups = [{
            'params': [p for p in net.restorer.parameters() if p.requires_grad],
            'lr': optim_g['lr']
        }, {
            'params': [p for p in net.estimator.parameters() if p.requires_grad],
            'lr': optim_e['lr']
        }]
        optim_type, lr = optim_g.pop('type'), optim_g.pop('lr')
        self.optimizer_g = self.get_optimizer(optim_type, groups, lr, **optim_g)
        self.optimizers.append(self.optimizer_g)

    # ------------------------------------------------------------------------ data
    def feed_micro_batch(self, data):
        """Paired data (validation) as given; HR-only data: draw kernels and make the LR batch here."""
        if 'lq' in data:
            super().feed_micro_batch(data)
            self.kernel_gt = None
            self.lq_path = data.get('lq_path')
            return
        self.gt = data['gt'].to(self.device)
        deg = self.degradation
        kernels, _ = degradations.sample_kernels(
            self.gt.size(0),
            deg['setting'],
            deg['kernel_size'],
            deg['sigma_range'],
            deg.get('noise', 0.25),
            rng=self.rng)
        self.kernel_gt = torch.from_numpy(kernels).to(self.device)
        with torch.no_grad():
            self.lq = degradations.degrade(self.gt, self.kernel_gt, self.scale, deg['downsample'])
        if self.channels_last:
            self.lq = self.lq.contiguous(memory_format=torch.channels_last)

    # ------------------------------------------------------------------------ training
    def optimize_micro_batch(self, current_iter):
        with self.train_autocast():
            srs, kernels = self.training_forward(self.net_g)(self.lq, return_all=True)
        sr, kernel = srs[-1].float(), kernels[-1].float()
        loss_dict = {'l_pix': self.cri_pix(sr, self.gt), 'l_kernel': self.cri_kernel(kernel, self.kernel_gt)}
        if not self.loss_is_finite(loss_dict, f'iter {current_iter}'):
            return
        self.backward_and_step(loss_dict['l_pix'] + loss_dict['l_kernel'], [self.optimizer_g])
        with torch.no_grad():  # the kernel error of every iteration: does the loop converge?
            for i, estimate in enumerate(kernels):
                loss_dict[f'kernel_err_{i + 1}'] = (estimate.float() - self.kernel_gt).abs().mean()
        self.log_dict = self.reduce_loss_dict(loss_dict)

    # ------------------------------------------------------------------------ resuming
    def extra_training_state(self, current_iter):
        """The kernel sampler's state, so a resumed run draws the kernels the uninterrupted one would."""
        return {'kernel_rng': self.rng.bit_generator.state}

    def restore_extra_state(self, saved):
        if saved.get('kernel_rng'):
            self.rng.bit_generator.state = saved['kernel_rng']

    # ------------------------------------------------------------------------ testing
    def test(self):
        # the bare network: only rank 0 validates, and a DDP forward would wait for the other ranks
        # (it broadcasts buffers such as pca_matrix)
        net = self.get_bare_model(self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g)
        net.eval()
        with torch.no_grad():
            with autocast(self.device.type, self.val_amp_dtype):
                sr, kernel = net(self.lq, return_kernel=True)
        self.output, self.kernel_estimate = sr.float(), kernel.float()
        self._record_kernel_error()
        if not hasattr(self, 'net_g_ema'):
            self.net_g.train()

    def _record_kernel_error(self):
        """Kernel error against ``dataroot_kernel/<name>.npy`` when the validation set ships kernels."""
        kernel_dir = getattr(self, '_val_kernel_dir', None)
        if not kernel_dir or not getattr(self, 'lq_path', None):
            return
        stem = osp.splitext(osp.basename(self.lq_path[0]))[0]
        path = osp.join(kernel_dir, f'{stem}.npy')
        if not osp.isfile(path):
            return
        truth = torch.from_numpy(np.load(path).astype(np.float32))
        if truth.shape != self.kernel_estimate.shape[-2:]:
            raise UserError(f'{path}: kernel {tuple(truth.shape)}, the network estimates '
                            f'{tuple(self.kernel_estimate.shape[-2:])}; use a test set made for network_g.kernel_size')
        self.kernel_errors.append(float((self.kernel_estimate[0].cpu() - truth).abs().mean()))

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        self._val_kernel_dir = dataloader.dataset.opt.get('dataroot_kernel')
        self.kernel_errors = []
        super().nondist_validation(dataloader, current_iter, tb_logger, save_img)
        if self.kernel_errors:
            mean = float(np.mean(self.kernel_errors))
            name = dataloader.dataset.opt['name']
            get_root_logger().info(f'\t # kernel_err (mean |k - k_gt|, {len(self.kernel_errors)} images) of {name}: '
                                   f'{mean:.3e}')
            if tb_logger:
                tb_logger.add_scalar(f'metrics/{name}/kernel_err', mean, current_iter)
            self.last_kernel_error = mean
