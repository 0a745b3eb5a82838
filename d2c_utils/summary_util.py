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
    """Parts of a network to report, in order: (label, state-dict prefix, part).

    The network's own ``summary_groups()`` where it has one (D2CNet: head, every tree node,
    every leaf's residual convs and tail in the divergence part, the convergence network), else
    one group per top-level module that has parameters, all in the part 'network'.
    """
    if hasattr(net, 'summary_groups'):
        return net.summary_groups()
    return [(name, f'{name}.', 'network') for name, module in net.named_children()
            if any(True for _ in module.parameters())]


def count_params(net, groups=None):
    """Parameters per state-dict prefix of :func:`module_groups`: dict prefix -> count."""
    counts = {prefix: 0 for _, prefix, _ in (groups or module_groups(net))}
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
            # D2CNet's head tells its channels; DAN and SDFlow take RGB (SDFlow's first conv is inside a flow)
            channels = net.head.in_channels if isinstance(getattr(net, 'head', None), nn.Conv2d) else 3
            net(torch.rand(1, channels, lr_size, lr_size, device=device))
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


def count_macs(net, lr_size=16, groups=None):
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
    groups = [prefix for _, prefix, _ in (groups or module_groups(net))]
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


def summarize(net, lr_size=16, image_size=(256, 256)):
    """The report as text (see the module docstring)."""
    groups = module_groups(net)
    params = count_params(net, groups)
    per_pixel, per_image = count_macs(net, lr_size, groups)
    totals = OrderedDict()
    for _, prefix, part in groups:
        total = totals.setdefault(part, [0, 0.])
        total[0] += params[prefix]
        total[1] += per_pixel[prefix]
    total_params = sum(t[0] for t in totals.values())
    total_mac = sum(t[1] for t in totals.values())
    ca_per_image = sum(per_image.values())

    def line(label, count, mac):
        return f'{label:52s} {count:>12,d} {mac * 1e6 / 1e9:>12.2f}'

    out = [f'{"part":52s} {"params":>12s} {"GMAC/MP out":>12s}']
    for part, total in totals.items():
        rows = [(f'  {label} ({prefix}*)', params[prefix], per_pixel[prefix]) for label, prefix, p in groups
                if p == part]
        if len(rows) == 1 and part != 'network':  # a part of one module: one line, named by the part
            out.append(line(f'{part} network ({groups[[p for _, _, p in groups].index(part)][1]}*)', *total))
            continue
        if part != 'network':
            out.append(line(f'{part} network', *total))
        out += [line(*row) for row in rows]
    out.append(line('total', total_params, total_mac))
    if hasattr(net, 'summary_path'):  # one prediction's own path: what a single-branch network would cost
        path = net.summary_path()
        out.append(
            line('one branch\'s own path (head, L nodes, res convs, tail)', sum(params[p] for p in path),
                 sum(per_pixel[p] for p in path)))
    h, w = image_size
    s = net.upscale
    whole = total_mac * h * w * s * s + ca_per_image
    out.append('')
    parts = '; ' + ', '.join(f'{part} {t[0]:,d}' for part, t in totals.items()) if len(totals) > 1 else ''
    out.append(f'Parameters: {total_params:,d} ({total_params * 4 / 2**20:.1f} MiB as float32){parts}.')
    out.append(f'MACs per output megapixel: {total_mac * 1e6 / 1e9:.2f} G ({total_mac:,.0f} per output pixel, '
               f'{total_mac * s * s:,.0f} per input pixel); counted with torch\'s FlopCounterMode on every Conv2d on '
               f'{lr_size}x{lr_size} and {2 * lr_size}x{2 * lr_size} inputs, per output pixel.')
    out.append(f'Convs on pooled features (e.g. channel attention): {ca_per_image:,d} MACs per image, independent of '
               'its size; not in the per-pixel figures.')
    out.append(f'A {w}x{h} input (output {w * s}x{h * s}): {whole / 1e9:.1f} GMAC. Not counted: biases, activations, '
               'pixel shuffle, sigmoid, softmax and the weighted sum.')
    return '\n'.join(out)
