"""Conversion of other people's formats into d2c-sr's.

* :mod:`.convert_util`: the pipeline the three converters below share (safe reading, the check of
  the mapped keys, strict load, writing the checkpoint and option file with provenance, the report).
* :mod:`.official_util`: the D2C-SR authors' MegEngine checkpoints (``d2c-convert-official``).
* :mod:`.dan_convert_util`: the official DANv2 checkpoints (``d2c-convert-dan``).
* :mod:`.sdflow_convert_util`: the official SDFlow checkpoints (``d2c-convert-sdflow``).
* :mod:`.swap_util`: a BasicSR option file rewritten to train D2C on its backbone (``d2c-swap``).

Imports the networks and the loader (:mod:`d2c_inference.checkpoint_util`); nothing imports it but the tools.
"""
import d2c_compat  # noqa: F401  (before the first ``import basicsr``)
