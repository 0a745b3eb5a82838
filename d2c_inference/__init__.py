"""Inference: from a checkpoint file to output images, for every method.

* :mod:`.registry`: the method registry, one entry per method (D2CNet, DAN, SDFlow, VDSR/RDN/IMDN).
* :mod:`.export_graphs`: what each method exports (the graphs ``d2c-export`` writes).
* :mod:`.array_infer_util`: the numpy tiling, guard and output writer (no torch: the deployed path's).
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
