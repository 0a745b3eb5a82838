"""Parameters and multiply-accumulates of a D2C-SR, DANv2 or SDFlow network, part by part.

    d2c-summary --opt options/train_D2C_RealSR_x4.yml
    d2c-summary --model experiments/<name>/models/net_g_latest.pth     (shape inferred from the keys)
    python -m d2c_tools.summary --model net.pth --opt train.yml         (checks that they agree)

Prints the parameters of the divergence network (shallow conv, every tree node, every leaf's
residual convs and tail) and of the convergence network, and their multiply-accumulates (MACs)
per megapixel of *output*, counted with torch's FlopCounterMode on every Conv2d (see
:mod:`d2c_utils.summary_util` for what is and is not counted).
"""
import argparse
import sys

from d2c_utils.errors import UserError, command_line_tool, report_user_error

# the library is imported in main(), after the arguments are read: --help and usage errors answer at once

PROG = 'd2c-summary'


def parse_size(text):
    try:
        w, h = (int(v) for v in text.lower().split('x'))
        if w > 0 and h > 0:
            return h, w
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f'expected WIDTHxHEIGHT such as 256x256, got {text!r}')


@command_line_tool(PROG)
def main(argv=None):
    """Entry point of ``d2c-summary``; returns the exit status (0, or 2 for bad input files)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--opt', help='option file with a network_g block (D2CNet, DAN or SDFlow)')
    parser.add_argument(
        '-m', '--model', help='checkpoint (.pth or .safetensors); alone, the tree shape is inferred from its keys')
    parser.add_argument(
        '--param-key', default=None, help='state dict in the checkpoint (default: params_ema if present, else params)')
    parser.add_argument(
        '--image-size',
        type=parse_size,
        default=(256, 256),
        metavar='WxH',
        help='also give the total MACs for an input of this size (default: 256x256)')
    parser.add_argument(
        '--count-size',
        type=int,
        default=16,
        help='side of the smaller random LR input MACs are counted on (default: %(default)s)')
    args = parser.parse_args(argv)
    if not args.opt and not args.model:
        parser.error('pass --opt <option file> and/or --model <checkpoint>')
    if args.count_size < 2:
        parser.error('--count-size must be >= 2')
    from d2c_inference.checkpoint_util import load_model, network_options
    from d2c_utils.summary_util import summarize
    try:
        if args.model:
            net, info = load_model(args.model, args.opt, args.param_key, infer_missing=True)
            net_opt, source, method = info['net_opt'], info['opt_source'], info['method']
        else:
            net_opt, source, method, _ = network_options(None, args.opt, None)
            net = method.build(net_opt, source)
    except UserError as err:
        return report_user_error(PROG, err)
    print(f'{method.name} from {source}: {method.summary_line(net_opt, net)}\n')
    print(summarize(net, args.count_size, args.image_size))
    return 0


if __name__ == '__main__':
    sys.exit(main())
