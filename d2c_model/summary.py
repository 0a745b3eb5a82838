"""Parameters and multiply-accumulates of a D2C-SR network, part by part.

    d2c-summary --opt options/train_D2C_RealSR_x4.yml
    d2c-summary --model experiments/<name>/models/net_g_latest.pth     (shape inferred from the keys)
    python -m d2c_model.summary --model net.pth --opt train.yml           (checks that they agree)

Prints the parameters of the divergence network (shallow conv, every tree node, every leaf's
residual convs and tail) and of the convergence network, and their multiply-accumulates (MACs)
per megapixel of *output*.

MACs are counted with forward hooks on every ``nn.Conv2d`` while the network runs on a small
random input: a conv producing an (N, C_out, h, w) output costs ``N*C_out*h*w * C_in/groups *
k_h*k_w`` MACs (bias additions, activations, pixel shuffle, the channel-attention sigmoid, the
softmax and the weighted sum are not counted; they are a small fraction). The count is divided
by the output pixels: every conv runs at the LR or the SR resolution with 'same' padding, so
its cost per output pixel does not depend on the image size. The exceptions are the 1x1 convs
of RCAN's channel attention, which act on pooled (1x1) features: a fixed cost per image, listed
separately and left out of the per-pixel figures.
"""
import argparse
import sys
from collections import OrderedDict

import d2c_model  # noqa: F401  (registers D2CNet; applies the compat shim before basicsr)
import torch
from torch import nn as nn

from d2c_model.infer import (InferError, build_network, compare_state_dicts, infer_network_opt, load_checkpoint,
                             network_options, select_state_dict)

PROG = 'd2c-summary'


def module_groups(net):
    """Parts of D2CNet to report, in order: (label, state-dict prefix, part).

    ``part`` is 'divergence' or 'convergence'; tree nodes are numbered 1-based per level, leaves
    1-based depth-first (the order of the branches elsewhere).
    """
    groups = [('head (shallow conv)', 'head.', 'divergence')]
    for level in range(net.tree_depth):
        for node in range(net.tree_width**(level + 1)):
            groups.append((f'tree level {level + 1} node {node + 1}', f'tree.{level}.{node}.', 'divergence'))
    for leaf in range(net.num_branch):
        groups.append((f'residual convs, leaf {leaf + 1}', f'res_convs.{leaf}.', 'divergence'))
    for leaf in range(net.num_branch):
        groups.append((f'tail (upsampler + conv), leaf {leaf + 1}', f'tails.{leaf}.', 'divergence'))
    groups.append(('convergence network', 'convergence.', 'convergence'))
    return groups


def count_params(net):
    """Parameters per state-dict prefix of :func:`module_groups`: dict prefix -> count."""
    counts = {prefix: 0 for _, prefix, _ in module_groups(net)}
    for name, param in net.named_parameters():
        for prefix in counts:
            if name.startswith(prefix):
                counts[prefix] += param.numel()
                break
    return counts


@torch.no_grad()
def count_macs(net, lr_size=16):
    """Conv MACs per output pixel, per prefix, counted with forward hooks.

    Args:
        net (D2CNet): the network (any device; run on the CPU here).
        lr_size (int): side of the random LR input (>= 2, so that pooled 1x1 features are
            distinguishable from spatial ones).

    Returns:
        tuple[dict, dict]: prefix -> MACs per output pixel (spatial convs), and prefix -> MACs
        per image (the channel-attention convs on pooled features).
    """
    groups = [prefix for _, prefix, _ in module_groups(net)]
    per_pixel = {prefix: 0 for prefix in groups}
    per_image = {prefix: 0 for prefix in groups}
    handles = []

    def hook_for(name, conv):
        prefix = next(p for p in groups if (name + '.').startswith(p))

        def hook(module, inputs, output):
            n, c_out, h, w = output.shape
            macs = n * c_out * h * w * (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]
            if h * w == 1:
                per_image[prefix] += macs // n
            else:
                per_pixel[prefix] += macs / (n * out_pixels)

        return hook

    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(hook_for(name, module)))
    out_pixels = (lr_size * net.upscale)**2
    was_training = net.training
    try:
        net.eval()
        device = next(net.parameters()).device
        net(torch.rand(1, net.head.in_channels, lr_size, lr_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
    return per_pixel, per_image


def describe(net_opt, net):
    opt = dict(net_opt)
    parts = [f'x{net.upscale}', f'L={net.tree_depth}, C={net.tree_width} -> P={net.num_branch} branches',
             f'F={net.head.out_channels}']
    branch = opt.get('branch_type', 'RCANBranch')
    parts.append(f'{branch} G={opt.get("num_group", 2)}, B={opt.get("num_block", 4)}'
                 + (f', reduction {opt.get("reduction", 16)}' if branch == 'RCANBranch' else ''))
    parts.append(f'fusion features {net.convergence[0].out_channels}')
    return ', '.join(parts)


def summarize(net, lr_size=16, image_size=(256, 256)):
    """The report as text (see the module docstring)."""
    params = count_params(net)
    per_pixel, per_image = count_macs(net, lr_size)
    rows = []
    totals = OrderedDict((part, [0, 0.]) for part in ('divergence', 'convergence'))
    for label, prefix, part in module_groups(net):
        rows.append((f'  {label} ({prefix}*)', params[prefix], per_pixel[prefix]))
        totals[part][0] += params[prefix]
        totals[part][1] += per_pixel[prefix]
    total_params = sum(t[0] for t in totals.values())
    total_mac = sum(t[1] for t in totals.values())
    ca_per_image = sum(per_image.values())

    # one prediction's own path: what a single-branch network of the same depth would cost
    leaf = net.num_branch - 1
    path = ['head.'] + [f'tree.{level}.{leaf // net.tree_width**(net.tree_depth - level - 1)}.'
                        for level in range(net.tree_depth)] + [f'res_convs.{leaf}.', f'tails.{leaf}.']

    def line(label, count, mac):
        return f'{label:52s} {count:>12,d} {mac * 1e6 / 1e9:>12.2f}'

    out = [f'{"part":52s} {"params":>12s} {"GMAC/MP out":>12s}']
    div_rows = [r for r in rows if not r[0].startswith('  convergence')]
    out.append(line('divergence network', *totals['divergence']))
    out += [line(*r) for r in div_rows]
    out.append(line('convergence network (convergence.*)', *totals['convergence']))
    out.append(line('total', total_params, total_mac))
    out.append(line('one branch\'s own path (head, L nodes, res convs, tail)', sum(params[p] for p in path),
                    sum(per_pixel[p] for p in path)))
    h, w = image_size
    s = net.upscale
    whole = total_mac * h * w * s * s + ca_per_image
    out.append('')
    out.append(f'Parameters: {total_params:,d} ({total_params * 4 / 2**20:.1f} MiB as float32); divergence '
               f'{totals["divergence"][0]:,d}, convergence {totals["convergence"][0]:,d}.')
    out.append(f'MACs per output megapixel: {total_mac * 1e6 / 1e9:.2f} G ({total_mac:,.0f} per output pixel, '
               f'{total_mac * s * s:,.0f} per input pixel); counted with forward hooks on every Conv2d on a '
               f'{lr_size}x{lr_size} input and divided by its {lr_size * s}x{lr_size * s} output pixels.')
    out.append(f'Channel attention (1x1 convs on pooled features): {ca_per_image:,d} MACs per image, independent of '
               'its size; not in the per-pixel figures.')
    out.append(f'A {w}x{h} input (output {w * s}x{h * s}): {whole / 1e9:.1f} GMAC. Not counted: biases, activations, '
               'pixel shuffle, sigmoid, softmax and the weighted sum.')
    return '\n'.join(out)


def parse_size(text):
    try:
        w, h = (int(v) for v in text.lower().split('x'))
        if w > 0 and h > 0:
            return h, w
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f'expected WIDTHxHEIGHT such as 256x256, got {text!r}')


def main(argv=None):
    """Entry point of ``d2c-summary``; returns the exit status (0, or 2 for bad input files)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--opt', help='option file with a network_g block (D2CNet)')
    parser.add_argument('-m', '--model', help='checkpoint (.pth); alone, the tree shape is inferred from its keys')
    parser.add_argument('--param-key', default=None,
                        help='state dict in the checkpoint (default: params_ema if present, else params)')
    parser.add_argument('--image-size', type=parse_size, default=(256, 256), metavar='WxH',
                        help='also give the total MACs for an input of this size (default: 256x256)')
    parser.add_argument('--count-size', type=int, default=16,
                        help='side of the random LR input MACs are counted on (default: %(default)s)')
    args = parser.parse_args(argv)
    if not args.opt and not args.model:
        parser.error('pass --opt <option file> and/or --model <checkpoint>')
    if args.count_size < 2:
        parser.error('--count-size must be >= 2')
    try:
        if args.model:
            ckpt = load_checkpoint(args.model)
            state, key = select_state_dict(ckpt, args.model, args.param_key)
            model_desc = f'{args.model}' + (f' [{key}]' if key else '')
            try:
                net_opt, source = network_options(ckpt, args.opt, args.model)
            except InferError:
                if args.opt:
                    raise
                net_opt = {k: v for k, v in infer_network_opt(state).items() if k != 'num_branch'}
                source = f'{model_desc} (shape inferred from the keys)'
            net = build_network(net_opt, source)
            problem = compare_state_dicts(net, state, net_opt, source, f'checkpoint {model_desc}')
            if problem:
                raise InferError(problem)
            net.load_state_dict(state, strict=True)
        else:
            net_opt, source = network_options(None, args.opt, None)
            net = build_network(net_opt, source)
    except InferError as err:
        print(f'{PROG}: error: {err}', file=sys.stderr)
        return 2
    print(f'D2CNet from {source}: {describe(net_opt, net)}\n')
    print(summarize(net, args.count_size, args.image_size))
    return 0


if __name__ == '__main__':
    sys.exit(main())
