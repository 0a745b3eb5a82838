"""Old spelling of ``python -m d2c_tools.test``, kept so that existing commands and scripts work.

The tool lives in :mod:`d2c_tools.test`; this module only forwards to it.
"""
import runpy

if __name__ == '__main__':  # run by name, not imported: models sit below the tools and never import them
    runpy.run_module('d2c_tools.test', run_name='__main__', alter_sys=True)
