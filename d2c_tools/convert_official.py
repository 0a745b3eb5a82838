"""Convert the authors' released D2C-SR checkpoint (MegEngine pickle) into a BasicSR checkpoint.

    d2c-convert-official checkpoint.pkl D2C_official_x4.pth [--opt-out official_x4.yml]
    python -m d2c_tools.convert_official ...         (the same)

The file is read without MegEngine and without running code from it; see
:mod:`d2c_convert.official_util` for what the conversion does.
"""
import argparse
import sys

from d2c_utils.errors import UserError, command_line_tool, report_user_error

# the library (torch, basicsr) is imported in main(), after the arguments are read: --help answers at once
PROG = 'd2c-convert-official'
CHANNEL_ORDERS = ('rgb', 'bgr')  # d2c_convert.official_util checks the same two


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description='Convert the authors\' released D2C-SR checkpoint (MegEngine pickle with state_dict_D and '
        'state_dict_C) into a BasicSR checkpoint {"params": ...} for D2CNet. The file is read without MegEngine '
        'and without running code from it (only numpy-array pickles are accepted).',
        epilog='Then: d2c-test -opt <the --opt-out file>, or any test option file with '
        'path.pretrain_network_g set to OUTPUT and network_g as printed (note rgb_mean).')
    parser.add_argument('checkpoint', help="the authors' checkpoint (.pkl)")
    parser.add_argument('output', help='the BasicSR checkpoint to write (.pth)')
    parser.add_argument(
        '--opt-out',
        metavar='FILE.yml',
        help='also write the network_g options these weights need to FILE.yml; with --template, a '
        'whole test option file')
    parser.add_argument(
        '--template',
        metavar='TEST.yml',
        help='test option file to copy for --opt-out (network_g, path.pretrain_network_g and name '
        'replaced), e.g. options/test_D2C_RealSR_x4.yml')
    parser.add_argument(
        '--channel-order',
        choices=CHANNEL_ORDERS,
        default='rgb',
        help='colour order the converted network takes and gives: rgb (default; what BasicSR '
        'feeds) or bgr (what the authors\' code feeds: it reads images with cv2 and never converts)')
    mean_shift = parser.add_mutually_exclusive_group()
    mean_shift.add_argument(
        '--strict-mean-shift',
        action='store_true',
        help='refuse a checkpoint whose sub_mean/add_mean are not the fixed DIV2K mean shift, instead of folding '
        'them exactly into the head and output convs (the default: the release trains those layers)')
    mean_shift.add_argument(
        '--fold-mean-shift', action='store_true', help='the default now; kept so that existing commands work')
    parser.add_argument(
        '--scale',
        type=int,
        choices=(2, 3, 4, 8),
        help='the scale the checkpoint must have (it is read from the tail shapes; this only checks)')
    parser.add_argument('--force', action='store_true', help='overwrite OUTPUT / --opt-out if they exist')
    return parser


@command_line_tool(PROG)
def main(argv=None):
    """Console entry point (``d2c-convert-official``); returns the exit status.

    0 on success, 2 on bad input (one line on stderr saying what and how to fix it).
    """
    args = build_parser().parse_args(argv)
    from d2c_convert.official_util import convert_checkpoint_file
    try:
        lines = convert_checkpoint_file(args.checkpoint, args.output, args.opt_out, args.template, args.channel_order,
                                        not args.strict_mean_shift, args.scale, args.force)
    except (UserError, OSError) as err:
        return report_user_error(PROG, err)
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
