"""Train D2C-SR with BasicSR's training loop.

    python -m d2c_tools.train -opt options/train_D2C_RealSR_x4.yml [--auto_resume] [--debug]
        [--launcher none|pytorch|slurm] [--force_yml train:total_iter=1000 ...]
    d2c-train -opt ...            (the same, as a console script)

Experiments, logs and checkpoints go to ``experiments/<name>`` under the current directory.
"""
import sys

from d2c_tools.pipeline_args import answer_help_early


def main(argv=None):
    answer_help_early(list(sys.argv[1:] if argv is None else argv), 'd2c-train', __doc__)
    import d2c_model  # noqa: F401  (registers D2CNet, the losses and D2CModel)
    from basicsr import train as basicsr_train
    from d2c_tools.pipeline_util import load_resume_state, normalise_argv, run_pipeline, use_plugin_dist_init
    from d2c_utils.accumulate_util import use_accumulating_loader

    normalise_argv(argv, 'd2c-train')
    use_plugin_dist_init()  # gloo on CPU-only machines, nccl with CUDA
    # BasicSR's own resume needs a GPU; ours maps states onto the run's device
    basicsr_train.load_resume_state = load_resume_state
    # train.accumulate: N: every iteration draws N micro-batches (one optimiser step)
    use_accumulating_loader(basicsr_train)
    run_pipeline(basicsr_train.train_pipeline, 'd2c-train')


if __name__ == '__main__':
    sys.exit(main())
