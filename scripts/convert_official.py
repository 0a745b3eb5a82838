#!/usr/bin/env python
"""Convert the authors' released D2C-SR checkpoint (MegEngine pickle) into a BasicSR checkpoint.

    python scripts/convert_official.py <authors' checkpoint.pkl> <out.pth> [--opt-out net.yml] [--help]

A thin wrapper around :func:`d2c_model.convert_official.main` (also installed as the console
script ``d2c-convert-official``); see that module for what the conversion does.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too
from d2c_model.convert_official import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
