"""Super-resolve real photos with a trained D2C-SR model.

    d2c-infer -i photo.png --model net_g_latest.pth --opt options/train_D2C_RealSR_x4.yml
    python -m d2c_tools.infer -i photos/ -o results/infer --model ... --opt ... --tile 128
    d2c-infer -i photos/ --model D2C_x4.onnx --backend onnxruntime      (a file written by d2c-export)
    d2c-infer -i photos/ --model DANv2_x4.pth --save-kernel              (DAN: blind SR, kernel pictures)
    d2c-infer -i photos/ --model SDFlow_x4.pth --samples 8 --temperature 0.8   (SDFlow: 8 SR samples + mean/spread)
    d2c-infer -i hr_photos/ --model SDFlow_x4.pth --downscale --samples 4      (SDFlow: 4 realistic LR images each)

Backends: torch (PyTorch), onnxruntime, openvino (pip install "d2c-sr[onnx]" / "d2c-sr[openvino]").
The default, auto, takes the fastest one installed as measured for this project (OpenVINO on a
CPU, then PyTorch; PyTorch on CUDA) and says which; a .pth checkpoint is exported to ONNX once
and kept in --cache-dir. Tiling, image kinds, outputs and metrics are the same on every backend.

Writes ``<name>_<suffix>.<ext>`` for every input image (an image or a folder of images) and,
on request, every branch's prediction, the weight maps as heatmaps, a grid picture and
Y-PSNR/SSIM against ground truth. Gray, RGB, RGBA and 16-bit images come out in the same kind.

Model files are untrusted input: they are read with ``torch.load(weights_only=True)``, which
refuses pickled Python objects (that could run code) and loads only tensors and plain
containers; ``.safetensors`` files (``logger.save_format: safetensors``) hold no code at all and
carry their network options. Outputs are written whole or not at all (a temporary file renamed into
place), never over an input of the run; an input folder that is also the output folder skips the
outputs of earlier runs. Exit status: 0 all images written; 1 some inputs were skipped (listed); 2
usage, model or option errors, or a full disk (one line naming the file and what to do); 130 Ctrl-C.
"""
import argparse
import os
import sys

from tqdm import tqdm

from d2c_utils.errors import ImageError, UserError, command_line_tool, report_user_error
from d2c_utils.img_util import DEFAULT_MAX_PIXELS

# the library is imported in main(), after the arguments are read: --help and usage errors answer at once
PROG = 'd2c-infer'
# what runs the network (d2c_deploy.runtime_util checks the choice); the perceptual metrics of --perceptual
BACKENDS = ('auto', 'torch', 'onnxruntime', 'openvino')
PERCEPTUAL_METRICS = ('lpips', 'dists')
# documented default context around a tile, in LR pixels (see docs/inference.md, tiling)
DEFAULT_TILE_PAD = 32


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group('input and output')
    io.add_argument('-i', '--input', required=True, help='an image or a folder of images')
    io.add_argument('-o', '--output', default='results/infer', help='output folder (default: %(default)s)')
    io.add_argument(
        '-s',
        '--outscale',
        type=float,
        default=None,
        help='final scale: the network output is resized with cv2 LANCZOS4 when this differs from '
        "the network's scale (default: the network's scale)")
    io.add_argument(
        '--suffix', default='out', help='outputs are <name>_<suffix>.<ext>; empty: <name>.<ext> (default: %(default)s)')
    io.add_argument(
        '--ext',
        default='auto',
        choices=['auto', 'png', 'jpg'],
        help="output format; auto = the input's (PNG where the format cannot hold alpha or 16 bits)")
    model = parser.add_argument_group('model')
    model.add_argument(
        '-m',
        '--model',
        required=True,
        help='checkpoint written by training (.pth or .safetensors), or an ONNX file from d2c-export')
    model.add_argument(
        '--opt',
        default=None,
        help='training option file whose network_g is used; required unless the checkpoint '
        'carries its options (training checkpoints do not)')
    model.add_argument(
        '--param-key', default=None, help='state dict in the checkpoint (default: params_ema if present, else params)')
    run = parser.add_argument_group('running')
    run.add_argument(
        '--backend',
        default='auto',
        choices=BACKENDS,
        help='what runs the network: auto = the fastest installed as measured per method (on a CPU: OpenVINO for '
        'D2CNet and DAN, ONNX Runtime for SDFlow, then PyTorch; PyTorch on CUDA), or torch, onnxruntime, openvino '
        '(default: %(default)s)')
    run.add_argument(
        '--cache-dir',
        default=None,
        help='where a .pth checkpoint exported for ONNX Runtime / OpenVINO is kept, so later runs skip the export; '
        f'"" = no cache (default: ${{{"D2C_SR_CACHE"}}}, else ~/.cache/d2c-sr)')
    run.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'], help='default: %(default)s')
    run.add_argument(
        '--precision',
        default='auto',
        choices=['auto', 'fp32', 'bf16', 'fp16'],
        help='arithmetic of the forward pass (autocast): auto = bf16 on a CPU with native bf16 '
        '(AVX512-BF16/AMX), fp16 on CUDA, fp32 otherwise; fp16 needs CUDA. OpenVINO: auto = its '
        "CPU default (the same rule); ONNX Runtime: the file's precision. A reduced precision "
        'that gives non-finite or broken output falls back to fp32 with a warning (default: '
        '%(default)s)')
    run.add_argument(
        '--no-channels-last',
        dest='channels_last',
        action='store_false',
        help='keep the NCHW memory layout instead of channels_last (NHWC), which is faster for '
        'these convolutions on CPUs and tensor-core GPUs')
    run.add_argument(
        '--compile',
        action='store_true',
        help='run D2CNet through torch.compile (PyTorch backend; --backend auto then means torch): the first '
        'image of every new size (or tile size) compiles, which takes tens of seconds on a CPU, later ones run '
        'faster; pays off for many images or tiles of one size. Falls back to eager with a warning where '
        'torch.compile cannot compile')
    run.add_argument(
        '--fp16', action='store_true', help='old spelling of --precision fp16 (on a CPU: a warning, and fp32)')
    run.add_argument(
        '-t',
        '--tile',
        type=int,
        default=0,
        help='tile side in input pixels; 0 = whole image at once (default: %(default)s)')
    run.add_argument(
        '--tile-pad',
        type=int,
        default=DEFAULT_TILE_PAD,
        help='context around each tile in input pixels (default: %(default)s)')
    run.add_argument(
        '--pre-pad',
        type=int,
        default=0,
        help='reflection padding at the bottom/right of the input, removed afterwards (default: 0)')
    dan = parser.add_argument_group('DAN (blind SR) checkpoints')
    dan.add_argument(
        '--kernel-crop',
        type=int,
        default=256,
        help='the blur kernel is estimated once per image on its central KERNEL_CROP x KERNEL_CROP LR pixels '
        '(the whole image when smaller; 0 = always the whole image) and every tile is restored with it, so tiles '
        'share one kernel (default: %(default)s)')
    dan.add_argument(
        '--save-kernel', action='store_true', help="also write each image's estimated kernel <name>_kernel.png/.npy")
    flow = parser.add_argument_group('SDFlow (unpaired SR and downscaling) checkpoints')
    flow.add_argument(
        '--temperature',
        type=float,
        default=None,
        help="sampling temperature of the latents: 0 = the deterministic SR of the zero latent; default: the "
        "checkpoint's (0.8, the paper's)")
    flow.add_argument(
        '--samples',
        type=int,
        default=1,
        help='images drawn per input: <name>_sample<i> (or _lr<i>), and with more than one their per-pixel mean '
        '<name>_mean and spread heatmap <name>_spread.png (default: %(default)s)')
    flow.add_argument('--seed', type=int, default=0, help='seed of the first sample (default: %(default)s)')
    flow.add_argument(
        '--downscale',
        action='store_true',
        help='the inputs are HR photos (sides multiples of 4): write realistic x4 LR images of them')
    extra = parser.add_argument_group('pictures and metrics')
    extra.add_argument(
        '--save-branches', action='store_true', help="also write each branch's prediction <name>_branch<i>.<ext>")
    extra.add_argument(
        '--save-weights',
        action='store_true',
        help='also write the weight maps as heatmaps <name>_weight<i>.png and <name>_grid.png '
        '(input, branches, weights, fused)')
    extra.add_argument(
        '--grid-size',
        type=int,
        default=512,
        help='longest side of a cell of the grid picture; larger outputs are shrunk, 0 = full size '
        '(default: %(default)s)')
    extra.add_argument(
        '--reference',
        metavar='HR_DIR',
        default=None,
        help='ground-truth folder (same file names): print Y-PSNR/SSIM of bicubic, each branch, '
        'fused and the oracle fusion and write <output>/metrics.csv')
    extra.add_argument(
        '--perceptual',
        nargs='+',
        default=[],
        choices=PERCEPTUAL_METRICS,
        metavar='METRIC',
        help='with --reference: also LPIPS (alex, v0.1: the D2C-SR paper\'s Table 2) and/or DISTS of every image, '
        f'lower is better ({", ".join(PERCEPTUAL_METRICS)}; pip install "d2c-sr[perceptual]"; the backbone weights '
        'come from the torch hub cache)')
    io.add_argument(
        '--max-pixels',
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help='inputs whose header claims more pixels are skipped before decoding (damaged files, decompression '
        'bombs); 0 = no limit (default: %(default)s = 16384 x 16384)')
    parser.add_argument('-q', '--quiet', action='store_true', help='no progress bar')
    args = parser.parse_args(argv)
    for name in ('tile', 'tile_pad', 'pre_pad', 'grid_size', 'kernel_crop', 'max_pixels'):
        if getattr(args, name) < 0:
            parser.error(f'--{name.replace("_", "-")} must be >= 0')
    if args.samples < 1:
        parser.error('--samples must be >= 1')
    if args.temperature is not None and args.temperature < 0:
        parser.error('--temperature must be >= 0')
    if args.outscale is not None and args.outscale <= 0:
        parser.error('--outscale must be positive')
    if args.reference and not os.path.isdir(args.reference):
        parser.error(f'--reference: folder not found: {args.reference}')
    if args.perceptual and not args.reference:
        parser.error('--perceptual needs --reference HR_DIR (the images to compare with)')
    # what the user set: a method refuses the flags it cannot honour (registry.Method.refused)
    args.given = {dest for dest, value in vars(args).items() if value != parser.get_default(dest)}
    return args


def warn(message):
    tqdm.write(f'{PROG}: warning: {message}', file=sys.stderr)


def choose_backend(args, method, device):
    """The backend that runs ``method`` and why; methods without an export run on PyTorch."""
    from d2c_deploy.runtime_util import deployable, select_backend, select_method_backend

    if not deployable(method):
        if args.backend not in ('auto', 'torch'):
            raise UserError(f'--backend {args.backend}: {method.name} checkpoints run with --backend torch (or auto); '
                            'd2c-export does not export them yet')
        return 'torch', 'requested' if args.backend == 'torch' else f'auto: {method.name} runs on PyTorch'
    if args.compile:  # select_backend refuses an .onnx file for torch
        backend, why = select_backend('torch', args.model, device)
        return backend, why if args.backend == 'torch' else 'auto: --compile runs PyTorch'
    return select_method_backend(args.backend, args.model, device, method.name)


def open_model(args, backend, device, loaded):
    """The network to run (a PyTorch module or an exported model), its description and the autocast dtype.

    ``loaded``: ``(net, info)`` from the one loader (on the CPU), or None for an ONNX file.
    """
    from d2c_inference.infer_util import select_precision

    if backend == 'torch':
        net, info = loaded
        dtype = select_precision(args.precision, device, warn)
        net = info['method'].prepare(net.to(device), args, warn)
    else:
        from d2c_deploy.runtime_util import default_cache_dir, load_method_runtime_model

        need_branches = args.save_branches or args.save_weights or args.reference is not None
        net, info = loaded if loaded is not None else (None, {'opt_source': f'{args.model} (exported)', 'warnings': []})
        info['requested_param_key'] = args.param_key  # keys the export cache (found later without torch)
        cache = default_cache_dir() if args.cache_dir is None else args.cache_dir
        log = lambda message: print(f'{PROG}: {message}', file=sys.stderr)  # noqa: E731
        model = load_method_runtime_model(
            args.model,
            backend,
            device,
            'all' if need_branches else 'fused',
            net,
            info,
            cache,
            log=log,
            precision=args.precision)
        if need_branches and not model.has_branches:
            raise UserError(f'{args.model} has only the fused output; --save-branches, --save-weights and --reference '
                            'need a file exported with d2c-export --outputs all')
        dtype = runtime_precision(args.precision, model, device)
        net = model
        info['prepared'] = f'{model.meta["precision"]} file'
    for line in info['warnings']:
        warn(f'{args.model}: {line}')
    return net, info, dtype


def runtime_precision(precision, model, device):
    """The autocast-style dtype an exported model runs in for ``--precision`` (None: fp32), as the torch-free path."""
    import torch

    from d2c_deploy.exported_infer_util import exported_precision
    return {None: None, 'bf16': torch.bfloat16}[exported_precision(precision, model, warn)]


def select_inputs(args):
    """The input files; refuse a run whose every output would replace its input, drop earlier runs' outputs."""
    from d2c_inference.array_infer_util import earlier_outputs
    from d2c_utils.img_util import list_inputs

    inputs = list_inputs(args.input)
    in_folder = args.input if os.path.isdir(args.input) else os.path.dirname(args.input) or '.'
    if os.path.isdir(args.output) and os.path.samefile(in_folder, args.output):
        if not args.suffix and args.samples == 1:
            raise UserError(f'-o {args.output} is the input folder and --suffix is empty: every output would replace '
                            'its input; pass another -o or a --suffix')
        if os.path.isdir(args.input):
            skipped = earlier_outputs(inputs, args.suffix)
            if skipped:
                warn(f'{len(skipped)} file(s) of {args.input} are outputs of an earlier run and are not '
                     f'processed again ({os.path.basename(skipped[0])}, ...)')
                inputs = [p for p in inputs if p not in set(skipped)]
    return inputs


@command_line_tool(PROG)
def main(argv=None):
    """Entry point of ``d2c-infer``; returns the exit status (0, 1 some inputs skipped, 2 errors, 130 Ctrl-C)."""
    args = parse_args(argv)
    # an exported model on ONNX Runtime / OpenVINO runs without torch (None: this run needs the path below)
    from d2c_deploy.exported_infer_util import run_exported
    status = run_exported(args, PROG, warn, select_inputs)
    if status is not None:
        return status
    from d2c_inference.checkpoint_util import load_model
    from d2c_inference.infer_util import (
        OutputOptions,
        nonfinite_weights,
        prepare_perceptual,
        select_device,
        write_metrics,
    )
    from d2c_inference.registry import method_named
    from d2c_inference.tile_util import GuardedForward
    from d2c_utils.precision_util import precision_name

    try:
        # OpenVINO runs on the CPU: 'auto' must not pick a CUDA device for it
        device = select_device('cpu' if args.backend == 'openvino' and args.device == 'auto' else args.device)
        if args.fp16 and device.type != 'cuda':
            warn(f'--fp16 needs CUDA; running in float32 on the {device.type}')
            args.precision = 'fp32'
        elif args.fp16:
            args.precision = 'fp16'
        if args.model.lower().endswith('.onnx'):  # written by d2c-export: its metadata names the method
            from d2c_deploy.runtime_util import onnx_method
            loaded, method = None, method_named(onnx_method(args.model))
        else:
            loaded = load_model(args.model, args.opt, args.param_key, 'cpu')
            method = loaded[1]['method']
        method.refuse(args.given, args.model)
        if args.compile and not method.compiles:
            raise UserError(f'--compile compiles D2CNet models; {args.model} holds a {method.name}: drop --compile')
        if args.compile and args.backend not in ('auto', 'torch'):
            raise UserError(f'--compile runs PyTorch\'s torch.compile; --backend {args.backend} runs an exported '
                            'model: use --backend torch (or auto), or drop --compile')
        backend, why = choose_backend(args, method, device)
        inputs = select_inputs(args)
        net, info, dtype = open_model(args, backend, device, loaded)
        broken = nonfinite_weights(net)
        if broken:
            raise UserError(f'{args.model}: the weights hold NaN/inf values ({broken}); the checkpoint is broken '
                            '(training diverged?): use an earlier checkpoint')
        prepare_perceptual(args.perceptual, device)  # a missing weight file stops here, before any image
        try:
            os.makedirs(args.output, exist_ok=True)
        except OSError as err:
            raise UserError(f'cannot create the output folder {args.output}: {err.strerror or err}') from None
    except UserError as err:
        return report_user_error(PROG, err)
    tiling = f'tile {args.tile}, pad {args.tile_pad}' if args.tile else 'no tiling'
    weights = args.model + (f' [{info["param_key"]}]' if info.get('param_key') else '')
    layout = ('channels_last' if args.channels_last else 'NCHW') if backend == 'torch' else info['prepared']
    if args.compile:
        layout += ', torch.compile'
    print(f'{method.describe(net, args)}; weights {weights}; options {info["opt_source"]}; backend {backend} ({why}); '
          f'{device.type}, {precision_name(dtype)}, {layout}; {tiling}; {len(inputs)} input(s) -> {args.output}')
    if args.downscale and args.tile:
        warn('--tile is ignored when downscaling (whole images)')
    if args.reference and dtype is not None:
        print(
            f'{PROG}: note: metrics of a {precision_name(dtype)} run can be a few hundredths of a dB below fp32\'s '
            '(8-bit rounding of slightly different outputs); use --precision fp32 for numbers you report',
            file=sys.stderr)
    forward = GuardedForward(dtype, args.channels_last, warn=warn)
    options = OutputOptions.from_namespace(args, inputs)

    failed, rows = [], []
    for index, path in enumerate(tqdm(inputs, unit='img', disable=args.quiet, file=sys.stderr)):
        try:
            metrics = method.process_image(path, net, options, device, forward, PROG)
        except UserError as err:  # a full disk: the next images would fail the same way
            print(f'{index - len(failed)} of {len(inputs)} image(s) written to {args.output} before', file=sys.stderr)
            return report_user_error(PROG, err)
        except (ImageError, OSError) as err:  # OSError: e.g. the output folder became unwritable
            failed.append(path)
            tqdm.write(f'{PROG}: skipped {path}: {err}', file=sys.stderr)
            continue
        if metrics is not None:
            rows.append((os.path.basename(path), metrics))
    if rows:
        write_metrics(args.output, rows, args.perceptual)
    print(f'{len(inputs) - len(failed)} of {len(inputs)} image(s) written to {args.output}')
    if failed:
        print(f'{PROG}: {len(failed)} input(s) skipped: {", ".join(failed)}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
