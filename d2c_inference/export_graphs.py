"""What each method exports: the graphs ``d2c-export`` writes to ONNX, as plain modules with example inputs.

Method knowledge in torch only (no ONNX here): :mod:`d2c_deploy.export_util` writes any list of
:class:`ExportGraph` (one ``.onnx`` file per graph, the first one the main file) and checks every
graph against its module; :mod:`d2c_deploy.runtime_util` runs them. The registry's
``Method.export_graphs`` calls :func:`d2cnet_graphs`, :func:`dan_graphs` and :func:`sdflow_graphs`.

Every image input is float32 in [0, 1] (N, C, H, W) with dynamic batch, height and width; images
come out float32, not clamped unless the method clamps (SDFlow does). Sizes in ``dynamic`` are dim
names; ``'8*name'`` says the side is a multiple of 8 (``name`` counts the blocks of 8).
"""
from copy import deepcopy
from dataclasses import dataclass, field

import torch
from torch import nn as nn
from torch.nn import functional as F

# the example the graphs are traced with (LR pixels)
TRACE_SIZE = (64, 64)


@dataclass
class ExportGraph:
    """One graph of an exported method.

    Attributes:
        name (str): The graph's name: the main file is ``<stem>.onnx``, the others ``<stem>.<name>.onnx``.
        module (nn.Module): What the graph computes; ``module(**inputs)`` returns a tensor or a tuple in
            the order of ``output_names``. In eval mode, float32, on the CPU (a copy of the network).
        example_inputs (dict[str, Tensor]): Input name -> example tensor, in the order of ``forward``'s arguments.
        dynamic (dict[str, dict[int, str]]): Input name -> {dim: size name}; one name is one size shared by the
            inputs (``'8*name'``: a multiple of 8).
        output_names (list[str]): Names of the outputs.
        metadata (dict): What the runtimes need to know about this graph (str() of each value is stored).
        make_inputs (callable | None): ``make_inputs(height, width, generator) -> dict`` of inputs for an LR size
            (height, width), for the self-check on another size than the traced one; None: ``example_inputs``.
    """
    name: str
    module: nn.Module
    example_inputs: dict
    dynamic: dict
    output_names: list
    metadata: dict = field(default_factory=dict)
    make_inputs: object = None

    def inputs_at(self, height, width, seed=0):
        """Inputs for an LR size (height, width) (the example inputs when the graph cannot say)."""
        if self.make_inputs is None:
            return self.example_inputs
        return self.make_inputs(height, width, torch.Generator().manual_seed(seed))


def smooth_image(batch, channels, height, width, generator):
    """An image-like input (N, C, H, W) in [0, 1]: random pixels on a quarter grid, bicubic-upscaled."""
    coarse = torch.rand(batch, channels, height // 4 + 2, width // 4 + 2, generator=generator)
    return F.interpolate(coarse, size=(height, width), mode='bicubic', align_corners=False).clamp(0, 1)


def _network_copy(net):
    return deepcopy(net).cpu().float().eval()


# ----------------------------------------------------------------------------------------- D2CNet


class D2CNetGraph(nn.Module):
    """D2CNet's outputs: ``sr`` (N, C, sH, sW), and with ``outputs='all'`` ``branches`` (N, P, C, sH, sW) and
    ``weights`` (N, P, sH, sW)."""

    def __init__(self, net, outputs='fused'):
        super().__init__()
        self.net = net
        self.all = outputs == 'all'

    def forward(self, lq):
        out = self.net(lq, return_branches=self.all)
        return out if isinstance(out, tuple) else (out, )


D2CNET_OUTPUTS = {'fused': ['sr'], 'all': ['sr', 'branches', 'weights']}


def d2cnet_graphs(net, outputs='fused'):
    """D2CNet: one graph ``d2cnet``, lq (N, C, H, W) -> sr (and branches, weights with ``outputs='all'``).

    SwinIR branches keep the batch at 1 (torch.export specialises it in the window partition).
    """
    if outputs not in D2CNET_OUTPUTS:
        raise ValueError(f'outputs={outputs!r}; use one of {sorted(D2CNET_OUTPUTS)}')
    module = D2CNetGraph(_network_copy(net), outputs).eval()
    channels = net.head.in_channels
    return [
        ExportGraph(
            'd2cnet',
            module, {'lq': torch.rand(1, channels, *TRACE_SIZE)}, {'lq': {
                0: 'batch',
                2: 'height',
                3: 'width'
            }},
            list(D2CNET_OUTPUTS[outputs]),
            metadata={
                'outputs': outputs,
                'num_branch': net.num_branch,
                'tree_depth': net.tree_depth,
                'tree_width': net.tree_width,
                'num_in_ch': channels,
                'branch_type': type(net.tree[0][0]).__name__,
                'size_multiple': net.size_multiple,
                'min_size': max(2, net.size_multiple),
                'fp16': True
            },
            make_inputs=lambda h, w, gen: {'lq': smooth_image(1, channels, h, w, gen)})
    ]


# -------------------------------------------------------------------------------------------- DAN


class DANEstimateGraph(nn.Module):
    """The whole DAN loop: lq (N, C, h, w) -> sr (N, C, sh, sw), kernel (N, l, l), code (N, t).

    ``sr`` is the loop's last restoration R(y, c_{T-1}) (what ``DAN.forward`` returns), ``kernel`` its
    last estimate k_T and ``code`` c_{T-1} (:meth:`DAN.estimate_code`), the code the restore graph takes.
    """

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, lq):
        code = self.net.initial_code(lq.size(0)).to(lq.dtype)
        sr = kernel = None
        for step in range(self.net.loop):
            sr = self.net.restorer(lq, code)
            kernel = self.net.estimator(sr, lq)
            if step < self.net.loop - 1:
                code = self.net.encode(kernel)
        return sr, kernel, code


class DANRestoreGraph(nn.Module):
    """DAN's Restorer with a given code: lq (N, C, h, w), code (N, t) -> sr (N, C, sh, sw)."""

    def __init__(self, net):
        super().__init__()
        self.restorer = net.restorer

    def forward(self, lq, code):
        return self.restorer(lq, code)


def dan_graphs(net):
    """DANv2: two graphs, ``dan`` (the main file) and ``restore``.

    ``dan``: lq -> (sr, kernel, code), the full alternating loop: the restored image with the estimated
    kernel as its second output, what a user of the file alone wants, and on a whole image exactly
    ``DAN.forward(lq, return_kernel=True)``. The Estimator pools over its whole input, so tiles run
    through this graph would each get a kernel of their own: tiled inference (``d2c-infer --tile``)
    runs it once per image on the central ``--kernel-crop`` window, keeps ``code`` (c_{T-1}) and
    ``kernel``, and restores every tile with ``restore``: (lq, code) -> sr, the Restorer alone. One
    graph per role rather than a graph with a switch: ONNX has no cheap data-dependent branch, and a
    restore-only graph runs each tile without the Estimator. The Restorer's weights are stored twice
    (once per file): the price of two self-contained files.
    """
    copy = _network_copy(net)
    copy.initial_code(1)  # the PCA check happens here, not inside the traced graph
    channels = copy.restorer.image_head.in_channels
    dims = {0: 'batch', 2: 'height', 3: 'width'}
    meta = {'kernel_size': net.kernel_size, 'code_length': net.code_length, 'loop': net.loop, 'exporter': 'tracer'}

    def restore_inputs(h, w, gen):
        code = copy.pca_matrix[torch.randint(net.kernel_size**2, (1, ), generator=gen)]
        return {'lq': smooth_image(1, channels, h, w, gen), 'code': code.clone()}

    return [
        ExportGraph(
            'dan',
            DANEstimateGraph(copy).eval(), {'lq': torch.rand(1, channels, *TRACE_SIZE)}, {'lq': dims},
            ['sr', 'kernel', 'code'],
            metadata=meta,
            make_inputs=lambda h, w, gen: {'lq': smooth_image(1, channels, h, w, gen)}),
        ExportGraph(
            'restore',
            DANRestoreGraph(copy).eval(),
            restore_inputs(*TRACE_SIZE,
                           torch.Generator().manual_seed(0)), {
                               'lq': dims,
                               'code': {
                                   0: 'batch'
                               }
                           }, ['sr'],
            metadata=meta,
            make_inputs=restore_inputs)
    ]


# ----------------------------------------------------------------------------------------- SDFlow


class _PrecomputedInvConv1x1(nn.Module):
    """An :class:`~d2c_arch.flow_util.InvConv1x1` with W and W^-1 computed once (ONNX has no matrix inverse).

    The same tensors ``InvConv1x1.forward`` computes on every call, so the graph equals the module.
    """

    def __init__(self, layer):
        super().__init__()
        with torch.no_grad():
            weight = layer.weight().float()
            self.register_buffer('weight', weight[:, :, None, None].clone())
            self.register_buffer('inverse', torch.linalg.inv(weight)[:, :, None, None].clone())

    def forward(self, z, logdet=None, cond=None, reverse=False):
        return F.conv2d(z, self.inverse if reverse else self.weight), logdet


def _exportable_flows(net):
    """A float32 copy of ``net`` whose invertible 1x1 convolutions hold their matrices as constants."""
    from d2c_arch.flow_util import InvConv1x1

    copy = _network_copy(net)
    for parent in list(copy.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, InvConv1x1):
                setattr(parent, name, _PrecomputedInvConv1x1(child))
    return copy


class SDFlowSRGraph(nn.Module):
    """SDFlow's SR: lq (N, 3, h, w) in [0, 1], temperature (1,), noise (N, 45, h, w) ~ N(0, I) -> sr (N, 3, 4h, 4w).

    ``SDFlow.super_resolve`` with its latent ``u_h = temperature * noise`` given: the same noise gives
    the same sample, and temperature 0 the deterministic SR of the zero latent. Clamped to [0, 1].
    """

    def __init__(self, net):
        super().__init__()
        self.hr_flow, self.lr_encoder = net.hr_flow, net.lr_encoder

    def forward(self, lq, temperature, noise):
        content = self.lr_encoder(lq * 2 - 1)
        z_h, _ = self.hr_flow.hf_flow(temperature * noise, None, content, reverse=True)
        x, _ = self.hr_flow.levels(torch.cat([content, z_h], dim=1), None, reverse=True)
        return (x.clamp(-1, 1) + 1) / 2


class SDFlowDownscaleGraph(nn.Module):
    """SDFlow's downscaler: hr (N, 3, 8a, 8b) in [0, 1], temperature (1,), component (N, 12, a, b) int64 in
    [0, K), noise (N, 12, a, b) ~ N(0, I) -> lr (N, 3, 2a, 2b) in [0, 1].

    ``SDFlow.downscale`` with the prior's draws given: ``u_d = mu[component] + exp(log_sigma[component]) *
    (temperature * noise)``. Sides must be multiples of 8; ``downscale`` reflect-pads HR sides that are
    multiples of 4 only by 4 and crops the result, and so does the runtime (outside the graph).
    """

    def __init__(self, net):
        super().__init__()
        self.hr_flow, self.lr_flow, self.deg_flow = net.hr_flow, net.lr_flow, net.deg_flow

    def forward(self, hr, temperature, component, noise):
        content = self.hr_flow.content(hr * 2 - 1)
        prior = self.deg_flow.prior
        u = prior.means[component] + torch.exp(prior.log_stds[component]) * (temperature * noise)
        z_d, _ = self.deg_flow.flow(u, None, content, reverse=True)
        lq, _ = self.lr_flow(content + z_d, None, reverse=True)
        return (lq.clamp(-1, 1) + 1) / 2


def sdflow_graphs(net):
    """SDFlow: ``sr`` (the main file) and, with a downscaler, ``downscale``; the random draws are inputs.

    The noise is drawn outside the graphs (``d2c-infer`` draws it with ``torch.Generator`` seeded from
    ``--seed``, in the order and shapes ``SDFlow.super_resolve`` / ``SDFlow.downscale`` draw it, so the
    exported path gives the PyTorch path's samples), and the temperature is an input, so one file serves
    every temperature. Metadata: the latent channels, the mixture size and its sampling mode.
    """
    copy = _exportable_flows(net)
    hf_channels = copy.hr_flow.hf_flow.latent_channels
    meta = {
        'temperature': net.temperature,
        'hf_channels': hf_channels,
        'has_downscaler': net.has_downscaler,
        'mixture_sampling': net.mixture_sampling,
        'exporter': 'tracer',
    }

    def sr_inputs(h, w, gen):
        return {
            'lq': smooth_image(1, 3, h, w, gen),
            'temperature': torch.tensor([0.8]),
            'noise': torch.randn(1, hf_channels, h, w, generator=gen)
        }

    dims = {0: 'batch', 2: 'height', 3: 'width'}
    graphs = [
        ExportGraph(
            'sr',
            SDFlowSRGraph(copy).eval(),
            sr_inputs(*TRACE_SIZE,
                      torch.Generator().manual_seed(0)), {
                          'lq': dims,
                          'noise': dims
                      }, ['sr'],
            metadata=meta,
            make_inputs=sr_inputs)
    ]
    if net.has_downscaler:
        components = copy.deg_flow.prior.means.numel()
        deg_channels = copy.deg_flow.flow.latent_channels
        meta = dict(meta, deg_channels=deg_channels, components=components)

        def downscale_inputs(h, w, gen):  # (h, w): LR size; the HR input is 4x, rounded up to multiples of 8
            blocks = (-(-h // 2), -(-w // 2))
            return {
                'hr': smooth_image(1, 3, 8 * blocks[0], 8 * blocks[1], gen),
                'temperature': torch.tensor([0.8]),
                'component': torch.randint(components, (1, deg_channels, *blocks), generator=gen),
                'noise': torch.randn(1, deg_channels, *blocks, generator=gen)
            }

        blocks = {0: 'batch', 2: 'blocks_h', 3: 'blocks_w'}
        graphs.append(
            ExportGraph(
                'downscale',
                SDFlowDownscaleGraph(copy).eval(),
                downscale_inputs(*TRACE_SIZE,
                                 torch.Generator().manual_seed(0)), {
                                     'hr': {
                                         0: 'batch',
                                         2: '8*blocks_h',
                                         3: '8*blocks_w'
                                     },
                                     'component': blocks,
                                     'noise': blocks
                                 }, ['lr'],
                metadata=meta,
                make_inputs=downscale_inputs))
    return graphs
