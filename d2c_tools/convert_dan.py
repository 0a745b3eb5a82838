"""Convert a released official DANv2 checkpoint (github.com/greatlog/DAN) into a BasicSR checkpoint for DAN.

    d2c-convert-dan danv2_x4_setting1.pth DANv2_official_x4.pth [--pca PCA.pth] [--opt-out test.yml]
    python -m d2c_tools.convert_dan ...              (the same)

The file is read with ``torch.load(weights_only=True)``: no code from it runs. See
:mod:`d2c_convert.dan_convert_util` for what the conversion does.
"""
import argparse
import sys

from d2c_utils.errors import UserError, command_line_tool, report_user_error

# the library (torch, basicsr) is imported in main(), after the arguments are read: --help answers at once
PROG = 'd2c-convert-dan'


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description='Convert an official DANv2 checkpoint (github.com/greatlog/DAN, e.g. danv2_x4_setting1.pth: '
        'keys Restorer.* / Estimator.*, buffer encoder) into a BasicSR checkpoint {"params", "network_g"} for '
        'this project\'s DAN. Every key is mapped by rule; the network options are read from the shapes. '
        'Read with torch.load(weights_only=True): no code from the file runs. DANv1 checkpoints are not '
        'supported yet.',
        epilog='Then: d2c-test -opt <the --opt-out file> (after pointing its data set at real pairs), or any '
        'option file with path.pretrain_network_g set to OUTPUT and network_g as printed.')
    parser.add_argument('checkpoint', metavar='OFFICIAL.pth', help='the official DANv2 checkpoint')
    parser.add_argument('output', metavar='OUT.pth', help='the BasicSR checkpoint to write')
    parser.add_argument(
        '--pca',
        metavar='PCA.pth',
        help='PCA matrix (kernel_size**2, code_length) for old checkpoints without the buffer "encoder", e.g. '
        'the official pca_matrix/DANv2/pca_matrix.pth (setting 1); with a checkpoint that has one, it must agree')
    parser.add_argument(
        '--opt-out',
        metavar='FILE.yml',
        help='also write a small BasicSR test option file (DANModel, network_g, the weights, a placeholder data '
        'set under datasets/)')
    parser.add_argument(
        '--loop',
        type=int,
        default=None,
        help='iterations T written to network_g (not stored in the weights; default 4, as in every official '
        'option file)')
    parser.add_argument('--force', action='store_true', help='overwrite OUT.pth / --opt-out if they exist')
    return parser


@command_line_tool(PROG)
def main(argv=None):
    """Console entry point (``d2c-convert-dan``); returns the exit status.

    0 on success, 2 on bad input (one line on stderr saying what and how to fix it).
    """
    args = build_parser().parse_args(argv)
    from d2c_convert.dan_convert_util import DEFAULT_LOOP, convert_checkpoint_file
    loop = DEFAULT_LOOP if args.loop is None else args.loop
    try:
        lines = convert_checkpoint_file(args.checkpoint, args.output, args.pca, args.opt_out, loop, args.force)
    except (UserError, OSError) as err:
        return report_user_error(PROG, ' '.join(str(err).split()))
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
