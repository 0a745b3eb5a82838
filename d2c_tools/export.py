"""Export a trained D2C-SR, DANv2 or SDFlow checkpoint to ONNX, for ONNX Runtime, OpenVINO and other runtimes.

    d2c-export experiments/D2C_RealSR_x4/models/net_g_latest.pth -o D2C_RealSR_x4.onnx \\
        --opt options/train_D2C_RealSR_x4.yml
    d2c-export D2C_official_x4.pth -o D2C_official_x4.onnx --outputs all   (converted checkpoints carry options)
    python -m d2c_tools.export MODEL.pth -o MODEL_fp16.onnx --opt train.yml --precision fp16

The file takes ``lq``: (N, C, H, W) float32 RGB in [0, 1] with any batch, height and width
(SwinIR branches: one image at a time), and gives ``sr`` (N, C, sH, sW), plus ``branches``
(N, P, C, sH, sW) and ``weights`` (N, P, sH, sW) with --outputs all; not clamped. Its metadata
(``d2c_sr.*``) holds the scale, the tree and the network_g options, so ``d2c-infer --model
FILE.onnx`` needs nothing else.

DAN: ``MODEL.onnx`` runs the whole loop, ``lq`` -> ``sr``, ``kernel`` (N, l, l) and ``code`` (N, t);
``MODEL.restore.onnx`` restores with a given code, (``lq``, ``code``) -> ``sr`` (d2c-infer estimates the
kernel once per image and restores every tile with it). SDFlow: ``MODEL.onnx`` is SR, (``lq``,
``temperature`` (1,), ``noise`` (N, 45, H, W) ~ N(0, I)) -> ``sr`` in [0, 1], the same noise giving the same
sample; ``MODEL.downscale.onnx`` the downscaler, (``hr`` (sides multiples of 8), ``temperature``,
``component`` and ``noise`` (N, 12, H/8, W/8)) -> ``lr``. fp32 only for both.

The export checks itself: ONNX Runtime runs the file on an input of another size than the one
traced, and every output must agree with PyTorch fp32 to >= 80 dB PSNR (fp32 file; float32
reordering stays near 130 dB, a graph with a size baked in measured 60-70 dB) or >= 45 dB (fp16
file). A file that fails is not left behind. Exit status: 0 written and checked; 2 bad input or a
failed check (one line naming the file and what to do); an existing file (--force) is replaced only
by a new one that passed.
"""
import argparse
import sys
from os import path as osp

from d2c_deploy.metadata_util import CHECK_SIZE, DEFAULT_OPSET, EXPORT_PRECISIONS, OUTPUTS
from d2c_utils.errors import UserError, command_line_tool, report_user_error

# the library (torch, basicsr) is imported in main(), after the arguments are read: --help answers at once

PROG = 'd2c-export'


def parse_size(text):
    try:
        width, height = (int(v) for v in text.lower().split('x'))
        if width >= 8 and height >= 8:
            return height, width
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f'expected WIDTHxHEIGHT of at least 8x8 such as 71x45, got {text!r}')


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        'model', help='checkpoint (.pth or .safetensors): BasicSR params/params_ema, or a converted checkpoint')
    parser.add_argument('-o', '--output', required=True, help='the ONNX file to write (.onnx)')
    parser.add_argument(
        '--opt',
        default=None,
        help='training option file whose network_g is used; required unless the checkpoint carries its options')
    parser.add_argument(
        '--param-key', default=None, help='state dict in the checkpoint (default: params_ema if present, else params)')
    parser.add_argument(
        '--outputs',
        default='fused',
        choices=sorted(OUTPUTS),
        help='fused = the SR image only; all = also every branch and the weight maps (d2c-infer --save-branches, '
        '--save-weights and --reference need them) (default: %(default)s)')
    parser.add_argument(
        '--precision',
        default='fp32',
        choices=EXPORT_PRECISIONS,
        help='weights and arithmetic of the file; inputs and outputs stay float32 (default: %(default)s)')
    parser.add_argument(
        '--opset',
        type=int,
        default=DEFAULT_OPSET,
        help=
        'ONNX opset, >= 18; 18 is the lowest torch writes, read by the widest range of runtimes (default: %(default)s)')
    parser.add_argument(
        '--check-size',
        type=parse_size,
        default=CHECK_SIZE,
        metavar='WxH',
        help=f'input size of the self-check, unlike the traced 64x64 (default: {CHECK_SIZE[1]}x{CHECK_SIZE[0]})')
    parser.add_argument(
        '--no-check',
        dest='check',
        action='store_false',
        help='skip the ONNX Runtime self-check (for machines without onnxruntime; not recommended)')
    parser.add_argument('-f', '--force', action='store_true', help='overwrite an existing output file')
    args = parser.parse_args(argv)
    if not args.output.lower().endswith('.onnx'):
        parser.error(f'--output {args.output}: give the file an .onnx extension')
    return args


@command_line_tool(PROG)
def main(argv=None):
    """Entry point of ``d2c-export``; returns the exit status (0, or 2 for bad input / a failed check)."""
    args = parse_args(argv)
    import d2c_model  # noqa: F401  (registers the networks with BasicSR)
    from d2c_deploy import export_util
    from d2c_inference.checkpoint_util import load_model
    try:
        if args.model.lower().endswith('.onnx'):
            raise UserError(f'{args.model} is already an ONNX file; d2c-export takes a .pth checkpoint')
        if osp.exists(args.output) and not args.force:
            raise UserError(f'{args.output} exists; pass --force to overwrite it')
        net, info = load_model(args.model, args.opt, args.param_key, 'cpu')
        for line in info['warnings']:
            print(f'{PROG}: warning: {args.model}: {line}', file=sys.stderr)
        # every file written and checked under a temporary name, then put in place (see export_util.export_method)
        result, agreement = export_util.export_method(
            net,
            info['method'].name,
            args.output,
            outputs=args.outputs,
            precision=args.precision,
            opset=args.opset,
            net_opt=info['net_opt'],
            source=osp.basename(args.model),
            check=args.check,
            check_size=args.check_size,
            force=args.force)
    except UserError as err:
        return report_user_error(PROG, err)
    batch = 'any batch' if result['dynamic_batch'] else 'batch 1 (SwinIR windows)'
    print(f'{", ".join(result["files"].values())}: {result["summary"]}, {args.precision}, opset {result["opset"]}, '
          f'{batch}, any height and width; {result["bytes"] / 2**20:.1f} MiB, exported in {result["seconds"]:.1f} s')
    if agreement is not None:
        shown = ', '.join(f'{name} {db:.1f} dB' for name, db in agreement.items())
        height, width = args.check_size
        print(f'self-check (ONNX Runtime vs PyTorch fp32 on {width}x{height}, needs >= '
              f'{export_util.MIN_AGREEMENT_DB[args.precision]:.0f} dB): {shown}')
    else:
        print(f'{PROG}: warning: not checked (--no-check)', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
