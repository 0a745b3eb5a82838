"""Inference: from a checkpoint file to output images, for every method.

* :mod:`.checkpoint_util`: the one checkpoint loader and writer (``.pth`` / ``.safetensors``), the
  precedence of network options (option file, options carried in the checkpoint, options read from
  the weights) and the one mismatch message.
* :mod:`.tile_util`: tiling and the guarded reduced-precision forward pass.
* :mod:`.infer_util`: image files through a network and the outputs (D2CNet: branches, weight maps,
  metrics); :mod:`.dan_infer_util` (DAN: one kernel per image) and :mod:`.sdflow_infer_util`
  (SDFlow: samples, mean, spread, downscaling).

Sits above the networks (:mod:`d2c_arch`) and below the models, conversion and deployment, which
import it; it imports none of them.
"""
import d2c_compat  # noqa: F401  (before the first ``import basicsr``)
