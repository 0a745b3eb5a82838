"""Parameters and multiply-accumulates of a D2C-SR network, part by part (what ``d2c-summary`` prints).

Prints the parameters of the divergence network (shallow conv, every tree node, every leaf's
residual convs and tail) and of the convergence network, and their multiply-accumulates (MACs)
per megapixel of *output*.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per MAC) on every
``nn.Conv2d`` while the network runs on small random inputs: a conv producing an
(N, C_out, h, w) output costs ``N*C_out*h*w * C_in/groups * k_h*k_w`` MACs (bias additions,
activations, pixel shuffle, the channel-attention sigmoid, the softmax and the weighted sum are
not counted; they are a small fraction). The count is divided by the output pixels: every conv
runs at the LR or the SR resolution with 'same' padding, so its cost per output pixel does not
depend on the image size. The exceptions are the 1x1 convs of RCAN's channel attention, which
act on pooled (1x1) features: a fixed cost per image, listed separately and left out of the
per-pixel figures.
"""
from collections import OrderedDict

import torch
from torch import nn as nn
from torch.utils.flop_counter import FlopCounterMode


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


def _conv_macs(net, lr_size):
    """MACs of every Conv2d of ``net`` (by state-dict prefix of the conv) on a random (1, C, s, s) input."""
    was_training = net.training
    try:
        net.eval()
        device = next(net.parameters()).device
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(torch.rand(1, net.head.in_channels, lr_size, lr_size, device=device))
    finally:
        net.train(was_training)
    counts = counter.get_flop_counts()
    root = type(net).__name__
    macs = {}
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            # FlopCounterMode counts a convolution as 2 FLOPs per multiply-accumulate
            macs[name] = sum(counts.get(f'{root}.{name}', {}).values()) // 2
    return macs


def count_macs(net, lr_size=16):
    """Conv MACs per output pixel, per prefix, counted with ``torch.utils.flop_counter.FlopCounterMode``.

    The network runs on random inputs of side ``lr_size`` and ``2 * lr_size``; a conv's count
    grows linearly with the pixels, so two sizes separate the per-pixel cost from a fixed cost
    per image (the channel-attention convs on pooled 1x1 features).

    Args:
        net (D2CNet): the network (any device).
        lr_size (int): side of the smaller random LR input (>= 2).

    Returns:
        tuple[dict, dict]: prefix -> MACs per output pixel (spatial convs), and prefix -> MACs
        per image (the channel-attention convs on pooled features).
    """
    groups = [prefix for _, prefix, _ in module_groups(net)]
    per_pixel = {prefix: 0 for prefix in groups}
    per_image = {prefix: 0 for prefix in groups}
    sizes = (lr_size, 2 * lr_size)
    small, large = (_conv_macs(net, size) for size in sizes)
    pixels = [(size * net.upscale)**2 for size in sizes]
    for name in small:
        prefix = next(p for p in groups if (name + '.').startswith(p))
        if small[name] == large[name]:  # does not grow with the image: a conv on pooled features
            per_image[prefix] += small[name]
        else:
            per_pixel[prefix] += (large[name] - small[name]) / (pixels[1] - pixels[0])
    return per_pixel, per_image


def describe(net_opt, net):
    opt = dict(net_opt)
    parts = [
        f'x{net.upscale}', f'L={net.tree_depth}, C={net.tree_width} -> P={net.num_branch} branches',
        f'F={net.head.out_channels}'
    ]
    branch = opt.get('branch_type', 'RCANBranch')
    parts.append(f'{branch} G={opt.get("num_group", 2)}, B={opt.get("num_block", 4)}' +
                 (f', reduction {opt.get("reduction", 16)}' if branch == 'RCANBranch' else ''))
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
    path = ['head.'] + [
        f'tree.{level}.{leaf // net.tree_width**(net.tree_depth - level - 1)}.' for level in range(net.tree_depth)
    ] + [f'res_convs.{leaf}.', f'tails.{leaf}.']

    def line(label, count, mac):
        return f'{label:52s} {count:>12,d} {mac * 1e6 / 1e9:>12.2f}'

    out = [f'{"part":52s} {"params":>12s} {"GMAC/MP out":>12s}']
    div_rows = [r for r in rows if not r[0].startswith('  convergence')]
    out.append(line('divergence network', *totals['divergence']))
    out += [line(*r) for r in div_rows]
    out.append(line('convergence network (convergence.*)', *totals['convergence']))
    out.append(line('total', total_params, total_mac))
    out.append(
        line('one branch\'s own path (head, L nodes, res convs, tail)', sum(params[p] for p in path),
             sum(per_pixel[p] for p in path)))
    h, w = image_size
    s = net.upscale
    whole = total_mac * h * w * s * s + ca_per_image
    out.append('')
    out.append(f'Parameters: {total_params:,d} ({total_params * 4 / 2**20:.1f} MiB as float32); divergence '
               f'{totals["divergence"][0]:,d}, convergence {totals["convergence"][0]:,d}.')
    out.append(f'MACs per output megapixel: {total_mac * 1e6 / 1e9:.2f} G ({total_mac:,.0f} per output pixel, '
               f'{total_mac * s * s:,.0f} per input pixel); counted with torch\'s FlopCounterMode on every Conv2d on '
               f'{lr_size}x{lr_size} and {2 * lr_size}x{2 * lr_size} inputs, per output pixel.')
    out.append(f'Channel attention (1x1 convs on pooled features): {ca_per_image:,d} MACs per image, independent of '
               'its size; not in the per-pixel figures.')
    out.append(f'A {w}x{h} input (output {w * s}x{h * s}): {whole / 1e9:.1f} GMAC. Not counted: biases, activations, '
               'pixel shuffle, sigmoid, softmax and the weighted sum.')
    return '\n'.join(out)
