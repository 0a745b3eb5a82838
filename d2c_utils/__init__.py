"""The library shared by d2c-sr's models and command-line tools.

Checkpoint loading (:mod:`.checkpoint_util`), image reading and writing (:mod:`.img_util`),
forward passes with tiling and reduced precision (:mod:`.tile_util`, :mod:`.precision_util`),
scores (:mod:`.eval_util`), pictures (:mod:`.visual_util`), inference of image files
(:mod:`.infer_util`), network summaries (:mod:`.summary_util`), the authors' checkpoint format
(:mod:`.official_util`), the one output writer (:mod:`.output_util`: atomic, fsynced, never over
an input), option files loaded with limits and checked by one table (:mod:`.option_check`), the
checks of BasicSR's file client and LMDBs (:mod:`.data_guard`) and the patches around BasicSR's
train/test pipelines (:mod:`.entry_util`). The command-line tools themselves live in :mod:`d2c_tools`.

Importing the package is free: the modules that import basicsr apply :mod:`d2c_compat` first
themselves, and :mod:`.img_util` needs neither basicsr nor torch, so that data preparation
(``scripts/prepare_data.py``) reads images through it and still starts in a fraction of a second.
"""
