"""Test a trained D2C-SR (or any BasicSR) model with BasicSR's test pipeline.

    python -m d2c_tools.test -opt options/test_D2C_RealSR_x4.yml
    d2c-test -opt ...             (the same, as a console script)

Results go to ``results/<name>`` under the current directory.
"""
import sys

from d2c_tools.pipeline_args import answer_help_early


def main(argv=None):
    answer_help_early(list(sys.argv[1:] if argv is None else argv), 'd2c-test', __doc__)
    import d2c_model  # noqa: F401  (registers D2CNet, the losses and D2CModel)
    from basicsr.test import test_pipeline
    from d2c_tools.pipeline_util import normalise_argv, run_pipeline, use_plugin_dist_init

    normalise_argv(argv, 'd2c-test')
    use_plugin_dist_init()  # gloo on CPU-only machines, nccl with CUDA
    run_pipeline(test_pipeline, 'd2c-test')


if __name__ == '__main__':
    sys.exit(main())
