"""BasicSR's command line (``basicsr/utils/options.py``, ``parse_options``) for ``d2c-train`` / ``d2c-test --help``.

BasicSR parses its arguments inside the pipeline, after torch and basicsr are imported (seconds).
``--help`` and a missing ``-opt`` are answered here first, with the same arguments, before
anything heavy is imported; every other command line goes to BasicSR's own parser unchanged.
"""
import argparse


def basicsr_parser(prog, description):
    """The arguments BasicSR 1.4.2's ``parse_options`` takes, for help and usage errors only."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('-opt', type=str, required=True, help='Path to option YAML file.')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none', help='job launcher')
    parser.add_argument('--auto_resume', action='store_true')
    parser.add_argument('--debug', action='store_true')
    parser.add_argument('--local_rank', type=int, default=0)
    parser.add_argument(
        '--force_yml', nargs='+', default=None, help='Force to update yml files. Examples: train:ema_decay=0.999')
    return parser


def answer_help_early(argv, prog, description):
    """Print the help (exit 0) or the usage error (exit 2) when ``argv`` asks for help or lacks ``-opt``.

    ``argv`` is the command line without the program name; anything else returns and the caller goes on.
    """
    if any(arg in ('-h', '--help') for arg in argv) or '-opt' not in argv:
        basicsr_parser(prog, description).parse_args(argv)  # exits: help, or "the following arguments are required"
