"""SDFlowModel: SDFlow trained from unpaired real LR photos and clean HR photos.

The official release has no training code, so the objective is ours (docs/sdflow.md says why
each term is there). Per iteration, with an HR batch x and an unrelated LR batch y, both
dequantised (``2 img - 1 + U(0, 2/255)``):

    L_G = w_hr  * NLL(x | z_c) / D_x                    nll_hr_weight: -log N(u_h) - log|det J_HR, HF|
        + w_lr  * NLL(y | sg(E(y))) / D_y               nll_lr_weight: -log pi(u_d) - log|det J_deg, LR|
        + content_opt(z_c(x), bicubic_down4(x))         anchors the content space to the LR image grid
        + fidelity_opt(blur(E(y)), blur(y))             E keeps the low frequencies of the real LR photo
        + cycle_opt(E(DS_tau(x)), sg(z_c(x)))           E learns to undo the learned degradation
        + gan_opt(D(E(y)) -> real)                      E(y) distributed as z_c(x) (latent LSGAN)
    L_D = gan_opt(D(sg z_c(x)) -> real) + gan_opt(D(sg E(y)) -> fake)

NLLs are in nats per dimension (D = 3 H W), so their weights compare with the L1 terms; the log
also reports bits per dimension of the 8-bit images (``bpd_hr``, ``bpd_lr``). Every term is
optional (leave its ``*_opt`` out or set a weight of 0); the network, the discriminator and all
weights come from YAML. Precision (flows always in float32, the RRDB/encoder networks under
autocast), channels_last, the non-finite-loss policy, checked loading, atomic saving and
distributed training come from :class:`PluginModelMixin`; the sampling noise has its own
generator, saved in the training state, so a resumed run draws what the uninterrupted one would.
"""
import math
from collections import OrderedDict

import cv2
import torch
from torch.nn import functional as F

from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.img_process_util import filter2D
from basicsr.utils.registry import MODEL_REGISTRY
from d2c_utils.errors import UserError
from d2c_utils.precision_util import autocast
from .model_mixin import PluginModelMixin

LOG_BIN = math.log(127.5)  # 8-bit bins are 2/255 wide in the flows' [-1, 1] space


def bits_per_dim(nll_per_dim):
    """Bits per dimension of 8-bit images from a dequantised NLL in nats per dimension of [-1, 1] data."""
    return (nll_per_dim + LOG_BIN) / math.log(2)


@MODEL_REGISTRY.register()
class SDFlowModel(PluginModelMixin, SRModel):
    """BasicSR model of SDFlow (``network_g.type: SDFlow``), unpaired training, SR validation.

    Options beyond SRModel's (``train``):
        nll_hr_weight, nll_lr_weight (float): Weights of the two likelihoods (1.0, 1.0).
        content_opt, fidelity_opt, cycle_opt (dict): Losses from BasicSR's LOSS_REGISTRY (e.g.
            ``{type: L1Loss, loss_weight: 0.5}``) for the three terms above; absent: off.
        fidelity_sigma (float): Std of the Gaussian low-pass of the fidelity term (1.0 LR pixel).
        cycle_temperature (float): Temperature of the downscaling draw of the cycle term (0.8).
        gan_opt (dict): BasicSR ``GANLoss`` (e.g. lsgan); needs ``network_d`` and ``optim_d``.
        grad_clip (float): Max gradient norm of the generator's step (0: off).
    ``val.temperature`` (float): SR temperature of validation (0: the deterministic SR).
    """

    def __init__(self, opt):
        self.setup_plugin_options(opt)
        net_opt = opt['network_g']
        if net_opt.get('type') != 'SDFlow':
            raise UserError(f'SDFlowModel trains network_g.type SDFlow, not {net_opt.get("type")!r}')
        if opt.get('scale', 4) != 4 or net_opt.get('upscale', 4) != 4:
            raise UserError(f'SDFlowModel: scale={opt.get("scale")}, network_g.upscale={net_opt.get("upscale", 4)}; '
                            'SDFlow is x4 only: set both to 4')
        self.val_temperature = float((opt.get('val') or {}).get('temperature', 0.0))
        if opt['num_gpu'] == 0:
            # flow gradients reach float32 denormals, which x86 CPUs compute many times slower
            torch.set_flush_denormal(True)
        super().__init__(opt)

    # ------------------------------------------------------------------------ set-up
    def init_training_settings(self):
        train_opt = self.opt['train']
        net = self.get_bare_model(self.net_g)
        if not net.has_downscaler:
            raise UserError('network_g.downscaler is false: training needs the LR and degradation flows')
        logger = get_root_logger()
        self.ema_decay = train_opt.get('ema_decay', 0)
        if self.ema_decay > 0:
            self.net_g_ema = build_network(self.opt['network_g']).to(self.device)
            load_path = self.opt['path'].get('pretrain_network_g')
            if load_path is not None:
                self.load_network(self.net_g_ema, load_path, self.opt['path'].get('strict_load_g', True), 'params_ema')
            else:
                self.model_ema(0)
            self.net_g_ema.eval()
        self.nll_hr_weight = float(train_opt.get('nll_hr_weight', 1.0))
        self.nll_lr_weight = float(train_opt.get('nll_lr_weight', 1.0))
        self.cri_content = self._optional_loss('content_opt')
        self.cri_fidelity = self._optional_loss('fidelity_opt')
        self.cri_cycle = self._optional_loss('cycle_opt')
        self.cri_gan = self._optional_loss('gan_opt')
        self.cycle_temperature = float(train_opt.get('cycle_temperature', 0.8))
        self.grad_clip = float(train_opt.get('grad_clip', 0) or 0)
        sigma = float(train_opt.get('fidelity_sigma', 1.0))
        size = 2 * math.ceil(3 * sigma) + 1
        kernel = cv2.getGaussianKernel(size, sigma)
        self.lowpass_kernel = torch.from_numpy(kernel @ kernel.T).float()[None].to(self.device)
        if self.cri_gan is not None:
            if not self.opt.get('network_d'):
                raise UserError('train.gan_opt is set but network_d is missing: add a latent discriminator, e.g. '
                                'network_d: {type: UNetDiscriminatorSN, num_in_ch: 3, num_feat: 32}')
            self.net_d = self.model_to_device(build_network(self.opt['network_d']))
            load_path = self.opt['path'].get('pretrain_network_d')
            if load_path is not None:
                self.load_network(self.net_d, load_path, self.opt['path'].get('strict_load_d', True), 'params')
            self.net_d.train()
        self.net_g.train()
        seed = (self.opt.get('manual_seed') or 0) + self.opt.get('rank', 0)
        self.noise_generator = torch.Generator(device=self.device)
        self.noise_generator.manual_seed(seed)
        self.setup_optimizers()
        self.setup_schedulers()
        terms = [f'nll_hr x{self.nll_hr_weight}', f'nll_lr x{self.nll_lr_weight}'] + [
            name for name, cri in (('content', self.cri_content), ('fidelity', self.cri_fidelity),
                                   ('cycle', self.cri_cycle), ('gan', self.cri_gan)) if cri is not None
        ]
        logger.info(f'SDFlowModel: objective {" + ".join(terms)}; validation SR at temperature {self.val_temperature}')

    def _optional_loss(self, key):
        loss_opt = self.opt['train'].get(key)
        if not loss_opt or not loss_opt.get('loss_weight', 1.0):
            return None
        return build_loss(loss_opt).to(self.device)

    def setup_optimizers(self):
        train_opt = self.opt['train']
        for key in ['optim_g'] + (['optim_d'] if self.cri_gan is not None else []):
            if not isinstance(train_opt.get(key), dict) or 'type' not in train_opt[key] or 'lr' not in train_opt[key]:
                raise UserError(f'train.{key} needs type and lr, e.g. {{type: Adam, lr: 1.0e-4, betas: [0.9, 0.99]}}')
        optim_g = dict(train_opt['optim_g'])
        params = [p for p in self.net_g.parameters() if p.requires_grad]
        self.optimizer_g = self.get_optimizer(optim_g.pop('type'), params, **optim_g)
        self.optimizers.append(self.optimizer_g)
        if self.cri_gan is not None:
            optim_d = dict(train_opt['optim_d'])
            self.optimizer_d = self.get_optimizer(optim_d.pop('type'), self.net_d.parameters(), **optim_d)
            self.optimizers.append(self.optimizer_d)

    # ------------------------------------------------------------------------ training
    def _dequantise(self, img):
        """``2 img - 1 + U(0, 2/255)``: 8-bit images as continuous data in [-1, 1 + 2/255)."""
        noise = torch.rand(img.shape, device=img.device, generator=self.noise_generator)
        return img.float() * 2 - 1 + noise * (2 / 255)

    def _lowpass(self, img):
        # BasicSR's filter2D reshapes with .view, which a channels_last tensor (train.channels_last) refuses
        return filter2D(img.float().contiguous(), self.lowpass_kernel.expand(img.shape[0], -1, -1))

    def optimize_micro_batch(self, current_iter):
        hr, lq = self._dequantise(self.gt), self._dequantise(self.lq)
        net_d = self.training_forward(self.net_d) if self.cri_gan is not None else None
        with self.train_autocast():
            out = self.training_forward(self.net_g)(
                lq,
                hr=hr,
                cycle_temperature=self.cycle_temperature if self.cri_cycle is not None else None,
                generator=self.noise_generator)
        nll_hr = -out['log_p_hr'].mean() / hr[0].numel()
        nll_lr = -out['log_p_lr'].mean() / lq[0].numel()
        loss_dict = OrderedDict(l_nll_hr=self.nll_hr_weight * nll_hr, l_nll_lr=self.nll_lr_weight * nll_lr)
        if self.cri_content is not None:
            target = F.interpolate(hr, scale_factor=0.25, mode='bicubic', antialias=True, align_corners=False)
            loss_dict['l_content'] = self.cri_content(out['content_hr'], target)
        if self.cri_fidelity is not None:
            loss_dict['l_fidelity'] = self.cri_fidelity(self._lowpass(out['content_lr']), self._lowpass(lq))
        if self.cri_cycle is not None:
            loss_dict['l_cycle'] = self.cri_cycle(out['content_fake'], out['content_hr'].detach())
        if self.cri_gan is not None:
            for p in self.net_d.parameters():
                p.requires_grad = False
            with self.train_autocast():
                loss_dict['l_g_gan'] = self.cri_gan(net_d(out['content_lr']).float(), True, is_disc=False)
        if not self.loss_is_finite(loss_dict, f'iter {current_iter}'):
            return
        self.backward_and_step(sum(loss_dict.values()), [self.optimizer_g], self.grad_clip, self.net_g.parameters())

        if self.cri_gan is not None:
            for p in self.net_d.parameters():
                p.requires_grad = True
            with self.train_autocast():
                real = net_d(out['content_hr'].detach()).float()
                fake = net_d(out['content_lr'].detach()).float()
            d_losses = {
                'l_d_real': self.cri_gan(real, True, is_disc=True),
                'l_d_fake': self.cri_gan(fake, False, is_disc=True)
            }
            if self.loss_is_finite(d_losses, f'iter {current_iter} (discriminator)'):
                self.backward_and_step(d_losses['l_d_real'] + d_losses['l_d_fake'], [self.optimizer_d])
                loss_dict.update(d_losses)
        with torch.no_grad():
            loss_dict['bpd_hr'] = bits_per_dim(nll_hr.detach())
            loss_dict['bpd_lr'] = bits_per_dim(nll_lr.detach())
        self.log_dict = self.reduce_loss_dict(loss_dict)

    # ------------------------------------------------------------------------ saving and resuming
    def save(self, epoch, current_iter):
        """SRGANModel's save (net_g [+ ema], net_d, then the training state), refusing non-finite weights."""
        self.check_finite_weights(current_iter)
        if hasattr(self, 'net_g_ema'):
            self.save_network([self.net_g, self.net_g_ema], 'net_g', current_iter, param_key=['params', 'params_ema'])
        else:
            self.save_network(self.net_g, 'net_g', current_iter)
        if self.cri_gan is not None:
            self.save_network(self.net_d, 'net_d', current_iter)
        self.save_training_state(epoch, current_iter)

    def extra_training_state(self, current_iter):
        """The sampling-noise generator, so a resumed run draws the noise the uninterrupted one would."""
        return {'noise_rng': self.noise_generator.get_state()}

    def restore_extra_state(self, saved):
        if saved.get('noise_rng') is not None:
            self.noise_generator.set_state(saved['noise_rng'].cpu())

    # ------------------------------------------------------------------------ testing
    def test(self):
        """SR of ``self.lq`` at ``val.temperature`` through the bare network (only rank 0 validates)."""
        net = self.get_bare_model(self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g)
        was_training = net.training
        net.eval()
        with torch.no_grad():
            with autocast(self.device.type, self.val_amp_dtype):
                self.output = net(self.lq, temperature=self.val_temperature).float()
        net.train(was_training)
