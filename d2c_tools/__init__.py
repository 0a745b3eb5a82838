"""d2c-sr's command-line tools; each module is argparse plus calls into the library packages.

=========================  ===============================  =========================================
console script             module                           what it does
=========================  ===============================  =========================================
``d2c-train``              :mod:`d2c_tools.train`           BasicSR's training pipeline
``d2c-test``               :mod:`d2c_tools.test`            BasicSR's test pipeline
``d2c-infer``              :mod:`d2c_tools.infer`           super-resolve image files
``d2c-summary``            :mod:`d2c_tools.summary`         parameters and MACs, part by part
``d2c-convert-official``   :mod:`d2c_tools.convert_official`  the authors' MegEngine checkpoint -> .pth
=========================  ===============================  =========================================

``python -m d2c_tools.<module>`` works as well; the older ``python -m d2c_model.<module>`` spellings
are kept as forwarding modules.
"""
import d2c_compat  # noqa: F401  (before the first ``import basicsr``)
