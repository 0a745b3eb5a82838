"""Prove the plugin's CUDA paths in one bounded run and print a table a closing note can carry.

    make gpu-check                                        (this script with its defaults)
    python benchmarks/gpu_check.py --budget-s 480 --json results/gpu_check.json

Every step runs in its own process with a time limit (a hang or a crash fails that row, not the
check), reports pass / FAIL / skipped with its number, and the check goes on to the next step.
The rows:

* tiny trainings of a few iterations on data made here: D2C across the divergence -> convergence
  phase switch (fp32, bf16; on CUDA also fp16 with the GradScaler), D2C on an RRDB branch, DAN and
  SDFlow, channels_last on; the loss and the weights finite, checkpoints written;
* ``torch.distributed.run`` with one process per GPU (nccl on CUDA, gloo on a CPU), SIGKILL after
  the first checkpoint, ``--auto_resume`` to the end;
* d2c-infer's path: tiled vs untiled agreement in dB, reduced precision vs fp32 in dB, and the
  fall-back to fp32 exercised by an injected non-finite output;
* ONNX Runtime: the CPU provider always, the CUDA provider where ``onnxruntime-gpu`` is installed;
* CUDA only: speed of the paper's D2CNet x4, DANv2 x4 and SDFlow x4 at 256x256 (plain fp32 vs our
  defaults, autocast + channels_last; ratios in one run), peak GPU memory, the largest tile of a 4K
  input that fits.

On a machine without CUDA the CUDA rows are marked skipped and the CPU rows still run (about a
minute on 2 cores), so the check stays working between GPU sessions (tests/test_scripts/test_gpu_check.py).
It installs nothing. A fresh GPU machine needs the README's two set-up commands and, for the ONNX
Runtime CUDA row, one more: ``.venv/bin/pip install onnxruntime-gpu`` (docs/development.md).
Exit status: 0 every step passed or was skipped; 1 some step failed; 2 usage errors.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_MARK = 'GPU_CHECK_RESULT '


# ------------------------------------------------------------------------------------------- helpers
def result(status, value='', **extra):
    """Report a step's result to the parent process (last line of the child's stdout)."""
    print(RESULT_MARK + json.dumps(dict(status=status, value=value, **extra)), flush=True)


def tiny_builders():
    """The test suite's tiny option builders, so the check trains exactly what the tests train."""
    sys.path.insert(0, os.path.join(REPO, 'tests'))
    import conftest  # noqa: PLC0415
    import test_dan  # noqa: PLC0415
    import test_sdflow  # noqa: PLC0415
    return conftest, test_dan, test_sdflow


def run_tool(args, cwd, timeout):
    return subprocess.run([sys.executable, '-m'] + args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def last_error(proc):
    lines = (proc.stderr or proc.stdout or '').strip().splitlines()
    return lines[-1][:200] if lines else f'exit {proc.returncode}'


def weights_finite(path):
    import torch  # noqa: PLC0415

    from d2c_inference.checkpoint_util import load_checkpoint  # noqa: PLC0415
    ckpt = load_checkpoint(path)
    params = ckpt.get('params', ckpt)
    return all(torch.isfinite(v).all() for v in params.values() if torch.is_tensor(v) and v.is_floating_point())


def device_opt(opt, device, precision, channels_last=True):
    opt['num_gpu'] = 1 if device == 'cuda' else 0
    opt['train']['precision'] = precision
    opt['train']['channels_last'] = channels_last
    return opt


def train_and_check(opt, work, name, expect_models=('net_g_latest.pth', )):
    """Train ``opt`` with d2c-train in ``work``; a result with the last logged loss line."""
    conftest = tiny_builders()[0]
    yml = conftest.write_yaml(os.path.join(work, f'{name}.yml'), opt)
    start = time.time()
    proc = run_tool(['d2c_tools.train', '-opt', yml], work, timeout=600)
    seconds = time.time() - start
    if proc.returncode != 0:
        return result('fail', last_error(proc))
    exp = os.path.join(work, 'experiments', opt['name'])
    log = conftest.read_log(exp)
    if 'nan' in log.lower().replace('nonfinite', '') or 'inf ' in log:
        return result('fail', 'non-finite value in the log')
    for model in expect_models:
        path = os.path.join(exp, 'models', model)
        if not os.path.isfile(path):
            return result('fail', f'{model} not written')
        if not weights_finite(path):
            return result('fail', f'{model} has non-finite weights')
    return result('pass', f'{opt["train"]["total_iter"]} iters in {seconds:.1f} s, finite, checkpoints written')


# ------------------------------------------------------------------------------------------- steps
def paired_data(work):
    """Tiny HR/LR pairs for D2C under ``work/data/{train,val}``; returns that folder."""
    conftest = tiny_builders()[0]
    data = os.path.join(work, 'data')
    conftest.make_pairs(os.path.join(data, 'train'), seed=0)
    conftest.make_pairs(os.path.join(data, 'val'), seed=1)
    return data


def step_train_d2c(work, device, precision):
    opt = tiny_builders()[0].tiny_train_opt(paired_data(work), name=f'd2c_{device}_{precision}')
    train_and_check(device_opt(opt, device, precision), work, 'd2c')


def step_train_rrdb(work, device, precision):
    opt = tiny_builders()[0].tiny_train_opt(paired_data(work), name=f'rrdb_{device}_{precision}')
    opt['network_g'].update(branch_type='RRDBBranch', branch_opt={'num_grow_ch': 8}, upsampler='nearest+conv')
    train_and_check(device_opt(opt, device, precision), work, 'rrdb')


def step_train_dan(work, device, precision):
    test_dan = tiny_builders()[1]
    root, pca = test_dan.make_dan_data(work)
    opt = test_dan.dan_train_opt(root, pca, name=f'dan_{device}_{precision}')
    train_and_check(device_opt(opt, device, precision), work, 'dan')


def step_train_sdflow(work, device, precision):
    conftest, _, test_sdflow = tiny_builders()
    root = os.path.join(work, 'data')
    conftest.make_pairs(os.path.join(root, 'lr_src'), num=4, hr_size=64, seed=0)
    conftest.make_pairs(os.path.join(root, 'hr_src'), num=4, hr_size=64, seed=1)
    conftest.make_pairs(os.path.join(root, 'val'), num=2, hr_size=32, seed=2)
    opt = test_sdflow.sdflow_train_opt(root, name=f'sdflow_{device}_{precision}', iters=4)
    opt['val']['val_freq'] = 4
    opt['logger']['save_checkpoint_freq'] = 4
    train_and_check(device_opt(opt, device, precision), work, 'sdflow', ('net_g_latest.pth', 'net_d_latest.pth'))


def step_dist_resume(work, device, precision):
    """torch.distributed.run with one process per GPU, SIGKILL after the first checkpoint, auto-resume."""
    import torch  # noqa: PLC0415
    conftest = tiny_builders()[0]
    data = paired_data(work)
    nproc = torch.cuda.device_count() if device == 'cuda' else 1
    opt = conftest.tiny_train_opt(data, name='dist', phases=(('divergence', 40), ('convergence', 20)))
    opt = device_opt(opt, device, precision)
    opt['num_gpu'] = nproc if device == 'cuda' else 0
    opt['dist_params'] = {'backend': 'nccl' if device == 'cuda' else 'gloo'}
    opt['logger']['save_checkpoint_freq'] = 5
    opt['val']['val_freq'] = 1000
    yml = conftest.write_yaml(os.path.join(work, 'dist.yml'), opt)
    cmd = [
        sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_port=29517', '-m',
        'd2c_tools.train', '-opt', yml, '--launcher', 'pytorch', '--auto_resume'
    ]
    states = os.path.join(work, 'experiments', 'dist', 'training_states')
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (os.path.isdir(states) and os.listdir(states)):
        time.sleep(0.2)
    if proc.poll() is not None:
        return result('fail', f'ended before the first checkpoint: {proc.stdout.read().decode()[-200:]}')
    time.sleep(0.5)  # let the state file be renamed into place
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(int(f.split('.')[0]) for f in os.listdir(states) if f.endswith('.state'))
    resumed = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300)
    if resumed.returncode != 0:
        return result('fail', f'resume: {last_error(resumed)}')
    log = conftest.read_log(os.path.join(work, 'experiments', 'dist'))
    if 'Resuming training from epoch' not in log:
        return result('fail', 'the second run did not resume')
    final = os.path.join(work, 'experiments', 'dist', 'models', 'net_g_60.pth')
    if not os.path.isfile(final):
        return result('fail', 'no checkpoint of the last iteration after resuming')
    backend = opt['dist_params']['backend']
    return result('pass', f'{nproc} process(es), {backend}; killed after iter {killed_at}, resumed to 60')


def _tiny_d2c(device):
    import torch  # noqa: PLC0415

    from d2c_arch import D2CNet  # noqa: PLC0415
    torch.manual_seed(0)
    return D2CNet(num_feat=16, num_group=1, num_block=2, reduction=4, upscale=4).to(device).eval()


def step_infer_agreement(work, device, precision):
    """Tiled vs untiled and reduced precision vs fp32 on d2c-infer's forward path (PSNR in dB)."""
    import torch  # noqa: PLC0415

    from d2c_inference.tile_util import GuardedForward, prepare_network, super_resolve  # noqa: PLC0415
    from d2c_utils.precision_util import resolve_precision  # noqa: PLC0415
    net = prepare_network(_tiny_d2c(device), True)
    torch.manual_seed(1)
    img = torch.rand(1, 3, 96, 80)

    def psnr(a, b):
        mse = torch.mean((a.float().clamp(0, 1) - b.float().clamp(0, 1))**2).item()
        return float('inf') if mse == 0 else 10 * torch.log10(torch.tensor(1 / mse)).item()

    fp32 = GuardedForward(None, True)
    whole = super_resolve(net, img, 4, device=torch.device(device), forward=fp32)[0]
    tiled = super_resolve(net, img, 4, tile=32, tile_pad=16, device=torch.device(device), forward=fp32)[0]
    tile_db = psnr(whole, tiled)
    dtype = resolve_precision(precision, device, purpose='infer')
    reduced = super_resolve(net, img, 4, device=torch.device(device), forward=GuardedForward(dtype, True))[0]
    prec_db = psnr(whole, reduced)
    ok = tile_db >= 60 and prec_db >= 35
    result('pass' if ok else 'fail', f'tiled vs whole {tile_db:.1f} dB; {precision} vs fp32 {prec_db:.1f} dB')


def step_infer_fallback(work, device, precision):
    """An injected non-finite reduced-precision output must fall back to fp32 with one warning."""
    import torch  # noqa: PLC0415

    from d2c_inference.tile_util import GuardedForward  # noqa: PLC0415
    from d2c_utils.precision_util import resolve_precision  # noqa: PLC0415
    net = _tiny_d2c(device)

    class OverflowsWhenReduced(torch.nn.Module):
        """The network, but its output overflows to inf whenever autocast is on (as fp16 can)."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.upscale = inner, inner.upscale

        def forward(self, x, *args, **kwargs):
            out = self.inner(x, *args, **kwargs)
            if torch.is_autocast_enabled(x.device.type):
                out = out * float('inf')
            return out

    warnings = []
    dtype = resolve_precision(precision, device, purpose='infer')
    guard = GuardedForward(dtype, False, warn=warnings.append)
    lq = torch.rand(1, 3, 24, 24, device=device)
    out = guard(OverflowsWhenReduced(net), lq)
    ok = bool(torch.isfinite(out).all()) and guard.dtype is None and len(warnings) == 1
    result('pass' if ok else 'fail', f'fell back to fp32: {ok}; warning: {warnings[0][:60] if warnings else None}')


def step_onnxruntime(work, device, precision):
    """Export a tiny D2CNet and run it on ONNX Runtime's provider for ``device``; agreement with PyTorch."""
    import importlib.util  # noqa: PLC0415
    if importlib.util.find_spec('onnxruntime') is None:
        return result('skipped', 'onnxruntime not installed (pip install "d2c-sr[onnx]")')
    import onnxruntime as ort  # noqa: PLC0415
    provider = 'CUDAExecutionProvider' if device == 'cuda' else 'CPUExecutionProvider'
    if provider not in ort.get_available_providers():
        return result('skipped', f'{provider} not available (.venv/bin/pip install onnxruntime-gpu)')
    import torch  # noqa: PLC0415

    from d2c_deploy.export_util import export_onnx  # noqa: PLC0415
    net = _tiny_d2c('cpu')
    path = os.path.join(work, 'tiny.onnx')
    net_opt = {'type': 'D2CNet', 'num_feat': 16, 'num_group': 1, 'num_block': 2, 'reduction': 4, 'upscale': 4}
    export_onnx(net, path, net_opt=net_opt, source='gpu-check')
    session = ort.InferenceSession(path, providers=[provider])
    lq = torch.rand(1, 3, 40, 36)
    with torch.no_grad():
        ref = net(lq).clamp(0, 1)
    out = torch.from_numpy(session.run(None, {'lq': lq.numpy()})[0]).clamp(0, 1)
    mse = torch.mean((out - ref)**2).item()
    db = float('inf') if mse == 0 else -10 * torch.log10(torch.tensor(mse)).item()
    result('pass' if db >= 80 else 'fail', f'{provider}: {db:.1f} dB vs PyTorch fp32')


def paper_network(method, device):
    """The paper-setting network of ``method`` from the project's option files, with random weights."""
    import torch  # noqa: PLC0415
    import yaml  # noqa: PLC0415

    from basicsr.utils.registry import ARCH_REGISTRY  # noqa: PLC0415
    files = {
        'D2CNet x4': 'options/train_D2C_RealSR_x4.yml',
        'DANv2 x4': 'options/dan/train_DANv2_setting2_x4.yml',
        'SDFlow x4': 'options/sdflow/train_SDFlow_x4.yml'
    }
    with open(os.path.join(REPO, files[method]), encoding='utf-8') as f:
        net_opt = dict(yaml.safe_load(f)['network_g'])
    net_opt.pop('pca_matrix', None)
    net = ARCH_REGISTRY.get(net_opt.pop('type'))(**net_opt)
    if hasattr(net, 'pca_matrix'):
        size = net.pca_matrix.shape
        net.pca_matrix.copy_(torch.linalg.qr(torch.randn(size[0], size[1]))[0])
    return net.to(device)


def step_speed(work, device, precision):
    """Training step and inference at 256x256 (LR), plain fp32 vs our defaults; peak memory; 4K tile."""
    import torch  # noqa: PLC0415

    import d2c_model  # noqa: F401, PLC0415  (registers the archs)
    from d2c_utils.precision_util import autocast, resolve_precision  # noqa: PLC0415
    dtype = resolve_precision(precision, device, purpose='infer')
    rows = {}
    for method in ('D2CNet x4', 'DANv2 x4', 'SDFlow x4'):
        net = paper_network(method, device)
        lq = torch.rand(1, 3, 256, 256, device=device)
        timings = {}
        for label, amp, layout in (('fp32', None, torch.contiguous_format), ('ours', dtype, torch.channels_last)):
            net = net.to(memory_format=layout).eval()
            x = lq.contiguous(memory_format=layout)
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad(), autocast(device, amp):
                for _ in range(2):
                    net(x)
                torch.cuda.synchronize()
                start = time.time()
                for _ in range(5):
                    net(x)
                torch.cuda.synchronize()
            timings[label] = 5 / (time.time() - start)
            timings[f'{label}_mem'] = torch.cuda.max_memory_allocated() / 2**20
        if method != 'SDFlow x4':  # SDFlow's objective needs SDFlowModel: its training is the tiny rows'
            net.train()
            optim = torch.optim.Adam(net.parameters(), 1e-5)
            patch = torch.rand(4, 3, 64, 64, device=device)
            target = torch.rand(4, 3, 256, 256, device=device)
            scaler = torch.amp.GradScaler('cuda') if dtype == torch.float16 else None
            for label, amp in (('train_fp32', None), ('train_ours', dtype)):
                for i in range(5):
                    if i == 2:
                        torch.cuda.synchronize()
                        start = time.time()
                    with autocast(device, amp):
                        out = net(patch)
                        out = out[0] if isinstance(out, (tuple, list)) else out
                        loss = torch.nn.functional.l1_loss(out.float(), target)
                    optim.zero_grad()
                    if scaler is not None and amp is not None:
                        scaler.scale(loss).backward()
                        scaler.step(optim)
                        scaler.update()
                    else:
                        loss.backward()
                        optim.step()
                torch.cuda.synchronize()
                timings[label] = 3 / (time.time() - start)
        rows[method] = timings
        del net
        torch.cuda.empty_cache()
    parts = []
    for method, t in rows.items():
        text = (f'{method}: infer {t["fp32"]:.1f} -> {t["ours"]:.1f} img/s ({t["ours"] / t["fp32"]:.2f}x), '
                f'peak {t["fp32_mem"]:.0f} -> {t["ours_mem"]:.0f} MiB')
        if 'train_fp32' in t:
            text += f', train {t["train_fp32"]:.2f} -> {t["train_ours"]:.2f} steps/s ' \
                    f'({t["train_ours"] / t["train_fp32"]:.2f}x)'
        parts.append(text)
    result('pass', '; '.join(parts), rows=rows)


def step_largest_tile(work, device, precision):
    """The largest square tile of a 3840x2160 input the paper's D2CNet x4 runs at our default precision."""
    import torch  # noqa: PLC0415

    import d2c_model  # noqa: F401, PLC0415
    from d2c_utils.precision_util import autocast, resolve_precision  # noqa: PLC0415
    dtype = resolve_precision(precision, device, purpose='infer')
    net = paper_network('D2CNet x4', device).eval().to(memory_format=torch.channels_last)
    best = 0
    for tile in (128, 256, 384, 512, 768, 1024, 1536, 2160):
        try:
            x = torch.rand(1, 3, tile, min(tile, 3840), device=device).contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), autocast(device, dtype):
                net(x)
            torch.cuda.synchronize()
            best = tile
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    result('pass' if best else 'fail',
           f'tile {best} (LR pixels) fits; peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB')


STEP_FUNCTIONS = {
    'train D2C (phase switch)': step_train_d2c,
    'train D2C on RRDB': step_train_rrdb,
    'train DAN': step_train_dan,
    'train SDFlow': step_train_sdflow,
    'distributed + SIGKILL + resume': step_dist_resume,
    'infer tiled / precision': step_infer_agreement,
    'infer fp32 fall-back': step_infer_fallback,
    'ONNX Runtime': step_onnxruntime,
    'speed 256x256': step_speed,
    'largest 4K tile': step_largest_tile,
}


def plan(cuda_available):
    """(step, device, precision, time limit in s) for every row; CUDA rows come whether or not CUDA is there."""
    rows = [
        ('train D2C (phase switch)', 'cpu', 'fp32', 120),
        ('train D2C (phase switch)', 'cpu', 'bf16', 120),
        ('train D2C on RRDB', 'cpu', 'bf16', 120),
        ('train DAN', 'cpu', 'fp32', 120),
        ('train SDFlow', 'cpu', 'fp32', 120),
        ('distributed + SIGKILL + resume', 'cpu', 'fp32', 240),
        ('infer tiled / precision', 'cpu', 'bf16', 60),
        ('infer fp32 fall-back', 'cpu', 'bf16', 60),
        ('ONNX Runtime', 'cpu', 'fp32', 90),
    ]
    for precision in ('fp32', 'fp16', 'bf16'):
        rows.append(('train D2C (phase switch)', 'cuda', precision, 120))
    rows += [
        ('train D2C on RRDB', 'cuda', 'bf16', 120),
        ('train DAN', 'cuda', 'fp16', 120),
        ('train DAN', 'cuda', 'bf16', 120),
        ('train SDFlow', 'cuda', 'bf16', 120),
        ('distributed + SIGKILL + resume', 'cuda', 'fp32', 240),
        ('infer tiled / precision', 'cuda', 'fp16', 60),
        ('infer tiled / precision', 'cuda', 'bf16', 60),
        ('infer fp32 fall-back', 'cuda', 'fp16', 60),
        ('ONNX Runtime', 'cuda', 'fp32', 120),
        ('speed 256x256', 'cuda', 'fp16', 240),
        ('largest 4K tile', 'cuda', 'fp16', 120),
    ]
    return rows


def run_step(name, device, precision, limit, keep):
    """Run one row in a child process within ``limit`` seconds; (status, value, seconds, extra)."""
    work = tempfile.mkdtemp(prefix='gpu-check-')
    cmd = [
        sys.executable,
        os.path.abspath(__file__), '--run-step', name, '--device', device, '--precision', precision, '--work', work
    ]
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=work, start_new_session=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
        if lines:
            found = json.loads(lines[-1][len(RESULT_MARK):])
            status, value = found.pop('status'), found.pop('value')
        else:
            status, value, found = 'fail', last_error(proc), {}
    except subprocess.TimeoutExpired:
        status, value, found = 'fail', f'timed out after {limit} s', {}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return status, value, time.time() - start, found


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog='gpu_check.py', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        '--budget-s',
        type=float,
        default=480,
        help='wall-clock budget of the whole check; rows that no longer fit are marked skipped (default: %(default)s)')
    parser.add_argument('--json', default=None, help='also write the rows to this JSON file')
    parser.add_argument('--only', default=None, help='run only the rows whose step name contains this text')
    parser.add_argument('--keep', action='store_true', help='keep each step\'s work folder (for debugging)')
    parser.add_argument('--run-step', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--device', default='cpu', help=argparse.SUPPRESS)
    parser.add_argument('--precision', default='fp32', help=argparse.SUPPRESS)
    parser.add_argument('--work', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error('--budget-s must be positive')
    if args.run_step is not None and args.run_step not in STEP_FUNCTIONS:
        parser.error(f'--run-step: unknown step {args.run_step!r}')
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.run_step:  # a child: one step
        os.environ.setdefault('PYTHONWARNINGS', 'ignore')
        sys.path.insert(0, REPO)
        try:
            STEP_FUNCTIONS[args.run_step](args.work, args.device, args.precision)
        except Exception as err:  # noqa: BLE001  (any failure is this row's result)
            result('fail', f'{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ""}')
        return 0
    import torch  # noqa: PLC0415
    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    host = f'torch {torch.__version__}, {os.cpu_count()} CPU threads; GPUs: {", ".join(gpus) or "none"}'
    print(f'gpu-check: {host}; budget {args.budget_s:.0f} s', flush=True)
    start = time.time()
    rows = []
    for name, device, precision, limit in plan(cuda):
        if args.only and args.only not in name:
            continue
        left = args.budget_s - (time.time() - start)
        if device == 'cuda' and not cuda:
            status, value, seconds, extra = 'skipped', 'no CUDA device', 0.0, {}
        elif left < 10:
            status, value, seconds, extra = 'skipped', 'budget spent', 0.0, {}
        else:
            status, value, seconds, extra = run_step(name, device, precision, min(limit, left), args.keep)
        row = dict(step=name, device=device, precision=precision, status=status, value=value, seconds=round(seconds, 1))
        row.update(extra)
        rows.append(row)
        print(f'  {status:7s} {device:4s} {precision:4s} {name} ({seconds:.0f} s): {value}', flush=True)
    print(f'\n{host}; {time.time() - start:.0f} s in all\n')
    print('| step | device | precision | result | s | value |')
    print('|---|---|---|---|---|---|')
    for row in rows:
        print(f'| {row["step"]} | {row["device"]} | {row["precision"]} | {row["status"]} | {row["seconds"]} | '
              f'{row["value"]} |')
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump({'host': host, 'rows': rows}, f, indent=1)
    failed = [row for row in rows if row['status'] == 'fail']
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
