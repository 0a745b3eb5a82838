"""D2C trained from HR photos alone: Real-ESRNet's on-the-fly degradations in front of D2CModel."""
import torch

from basicsr.models import realesrnet_model
from basicsr.models.realesrnet_model import RealESRNetModel
from basicsr.utils import DiffJPEG, USMSharp
from basicsr.utils.registry import MODEL_REGISTRY
from .d2c_model import D2CModel


def _filter2d_any_layout(img, kernel, _filter2d=realesrnet_model.filter2D):
    # BasicSR's filter2D calls .view() on its input; on CPU the JPEG simulator hands it a
    # non-contiguous tensor ("view size is not compatible"), so it gets a contiguous one
    return _filter2d(img.contiguous(), kernel)


realesrnet_model.filter2D = _filter2d_any_layout


@MODEL_REGISTRY.register()
class D2CRealESRNetModel(D2CModel):
    """D2CModel whose training pairs come from BasicSR's Real-ESRNet second-order degradation.

    Each training batch of HR photos (``RealESRGANDataset``: HR crops plus the blur kernels it
    samples) is degraded on the model's device exactly as BasicSR's ``RealESRNetModel`` does
    (blur, resize, Gaussian/Poisson noise, JPEG, twice; sinc filter; training-pair queue;
    optional USM sharpening of the HR target), and then both D2C phases train on those pairs.
    The degradation options are the same top-level keys as Real-ESRNet's option files
    (``resize_prob``, ``noise_range``, ``jpeg_range``, ..., ``gt_size``, ``queue_size``), so
    ``d2c-swap`` only changes ``model_type``. Validation uses paired data as usual.

    Unlike BasicSR's ``RealESRNetModel`` (which puts its JPEG simulator, sharpener and queue on
    CUDA unconditionally), everything lives on the model's device, so it trains on CPU too.
    """

    def __init__(self, opt):
        super().__init__(opt)
        self.jpeger = DiffJPEG(differentiable=False).to(self.device)  # JPEG artefacts
        self.usm_sharpener = USMSharp().to(self.device)
        self.queue_size = opt.get('queue_size', 180)

    @torch.no_grad()
    def _dequeue_and_enqueue(self):
        # the pool starts on the model's device; the rest of BasicSR's pool logic is device-agnostic
        if not hasattr(self, 'queue_lr'):
            b, c, h, w = self.lq.size()
            if self.queue_size % b:
                raise ValueError(f'D2CRealESRNetModel: queue_size={self.queue_size} must be divisible by the '
                                 f'batch size {b} (batch_size_per_gpu).')
            self.queue_lr = self.lq.new_zeros(self.queue_size, c, h, w)
            self.queue_gt = self.gt.new_zeros(self.queue_size, *self.gt.shape[1:])
            self.queue_ptr = 0
        RealESRNetModel._dequeue_and_enqueue(self)

    def feed_micro_batch(self, data):
        # BasicSR's degradation pipeline; then the mixin's memory-layout handling of self.lq
        RealESRNetModel.feed_data(self, data)
        if self.channels_last:
            self.lq = self.lq.contiguous(memory_format=torch.channels_last)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        # validation images are real pairs: no synthetic degradation (as RealESRNetModel)
        self.is_train = False
        try:
            super().nondist_validation(dataloader, current_iter, tb_logger, save_img)
        finally:
            self.is_train = True
