"""Old spelling of ``python -m d2c_tools.train``, kept so that existing commands and scripts work.

The tool lives in :mod:`d2c_tools.train`; this module only forwards to it.
"""
import sys

from d2c_tools.train import main

if __name__ == '__main__':
    sys.exit(main())
