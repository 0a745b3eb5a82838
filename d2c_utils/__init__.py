"""The ground layer of d2c-sr: what every other package uses, importing no other package of ours.

* :mod:`.errors`: ``UserError`` / ``ImageError`` and the one way a tool reports them (exit 2, one line).
* :mod:`.output_util`: atomic files (whole or not at all, never over an input), file hashes, full disks.
* :mod:`.option_check`: the one option-file reader (size and alias limits, no ``!!python`` tags) and the
  one table of option checks; YAML written in BasicSR's style.
* :mod:`.img_util`: the one image reader and writer (gray, RGB, alpha, 16-bit; no torch).
* :mod:`.precision_util`: autocast and which reduced precision a device runs natively.
* :mod:`.eval_util`: scores (Y-PSNR/SSIM through BasicSR, bicubic baseline, oracle fusion, tensor PSNR).
* :mod:`.visual_util`: pictures (heatmaps, labelled grids).
* :mod:`.summary_util`: parameters and MACs of any ``nn.Module``, part by part.
* Training support that knows no method: :mod:`.compile_util` (``torch.compile`` with its eager
  fall-back), :mod:`.accumulate_util` (micro-batches of gradient accumulation), :mod:`.data_guard`
  (checks of BasicSR's file client and LMDBs).

Importing the package is free (no torch); :mod:`d2c_compat` is applied here for interpreters
without the start-up hook, before any module imports basicsr.
"""
import d2c_compat  # noqa: F401  (before the first ``import basicsr``)
