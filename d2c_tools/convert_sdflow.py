"""Convert the released official SDFlow weights (github.com/sunwj/sdflow) into one BasicSR checkpoint for SDFlow.

    d2c-convert-sdflow --hrnet hrnet.pth --lrencoder lrencoder.pth -o SDFlow_SR.pth            (SR only)
    d2c-convert-sdflow --hrnet hrnet.pth --lrencoder lrencoder.pth \\
        --contentnet contentnet.pth --degnet degnet.pth -o SDFlow.pth [--opt-out test.yml]   (SR and downscaling)
    python -m d2c_tools.convert_sdflow ...              (the same)

The files are read with ``torch.load(weights_only=True)``: no code from them runs. See
:mod:`d2c_convert.sdflow_convert_util` for what the conversion does.
"""
import argparse
import sys

from d2c_utils.errors import UserError, command_line_tool, report_user_error

# the library (torch, basicsr) is imported in main(), after the arguments are read: --help answers at once
PROG = 'd2c-convert-sdflow'


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description='Convert the official SDFlow weights (github.com/sunwj/sdflow: hrnet.pth, lrencoder.pth and, '
        'for downscaling, contentnet.pth with degnet.pth) into one BasicSR checkpoint {"params", "network_g"} for '
        'this project\'s SDFlow. Every key is mapped by rule or dropped after a check; the network options are '
        'read from the shapes. Read with torch.load(weights_only=True): no code from the files runs.',
        epilog='Then: d2c-test -opt <the --opt-out file> (after pointing its data set at real pairs), or any option '
        'file with path.pretrain_network_g set to OUT.pth and network_g as printed.')
    parser.add_argument('--hrnet', metavar='hrnet.pth', required=True, help='the HR flow (official HRFlow)')
    parser.add_argument(
        '--lrencoder', metavar='lrencoder.pth', required=True, help='the LR content encoder (LRImageEncoderFM)')
    parser.add_argument(
        '--contentnet',
        metavar='contentnet.pth',
        help='the LR flow (ContentFlow); with --degnet adds the downscaler (without both: SR only)')
    parser.add_argument('--degnet', metavar='degnet.pth', help='the degradation flow (DegFlow); with --contentnet')
    parser.add_argument('-o', '--output', metavar='OUT.pth', required=True, help='the BasicSR checkpoint to write')
    parser.add_argument(
        '--opt-out',
        metavar='FILE.yml',
        help='also write a small BasicSR test option file (SDFlowModel, network_g, the weights, a placeholder data '
        'set under datasets/)')
    parser.add_argument('--force', action='store_true', help='overwrite OUT.pth / --opt-out if they exist')
    return parser


@command_line_tool(PROG)
def main(argv=None):
    """Console entry point (``d2c-convert-sdflow``); returns the exit status.

    0 on success, 2 on bad input (one line on stderr saying what and how to fix it).
    """
    args = build_parser().parse_args(argv)
    from d2c_convert.sdflow_convert_util import convert_files
    try:
        lines = convert_files(args.hrnet, args.lrencoder, args.output, args.contentnet, args.degnet, args.opt_out,
                              args.force)
    except (UserError, OSError) as err:
        return report_user_error(PROG, ' '.join(str(err).split()))
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
