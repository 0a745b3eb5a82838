"""Convert a released official DANv2 checkpoint (github.com/greatlog/DAN) into a BasicSR checkpoint for DAN.

The library behind ``d2c-convert-dan`` (:mod:`d2c_tools.convert_dan`)::

    d2c-convert-dan danv2_x4_setting1.pth DANv2_official_x4.pth [--pca pca_matrix.pth] [--opt-out test.yml]

The official code (MMSR style) saves ``torch.save(net.state_dict())``: a bare state dict of
tensors. It is read with ``torch.load(weights_only=True)``
(:func:`d2c_inference.checkpoint_util.load_checkpoint`), so no code from the file runs.

What the conversion does
------------------------
* Every official key maps to exactly one key of :class:`d2c_arch.dan_arch.DAN` by an explicit
  rule (:func:`dan_key`; the table is ``RULES``); anything left over on either side, or any shape
  mismatch, is an error that names the keys.
* The Restorer's upsampler is one ``nn.Sequential`` officially (convs and pixel shuffles
  interleaved); here BasicSR's ``Upsample`` holds the convs before each pixel shuffle and
  ``conv_last`` the output conv: x4 ``upscale.0`` / ``.2`` / ``.4`` -> ``upsample.0`` / ``.2`` /
  ``conv_last``; x2, x3 ``upscale.0`` / ``.2`` -> ``upsample.0`` / ``conv_last``.
* The network options (widths, depths, scale, code length t, kernel side l) are read from the
  shapes (:func:`d2c_arch.infer_dan_options`). ``loop`` (T) is not in the weights (they are shared
  across iterations): 4 as in every official option file, or ``--loop``. ``group_skip`` is
  'double', what the official code computes (danv2-facts pitfall 2) and so what the weights need.
* The PCA matrix P (l*l, t) comes from the buffer ``encoder`` (1, l*l, t). Checkpoints saved
  before the authors made it a buffer lack it (and ``init_kernel`` / ``init_ker_map``; facts
  pitfall 12): then it must be given (``--pca``, e.g. the repository's ``pca_matrix/DANv2/pca_matrix.pth``).
* ``init_ker_map``, the official starting code, must be ``vec(delta) P`` (row l*l // 2 of P): DAN
  computes its starting code from P, so a checkpoint whose buffer differs would start elsewhere;
  the converter warns (``init_kernel`` likewise must be the centred delta).

Refused, with what was found: files that are not DANv2 checkpoints (D2CNet checkpoints, already
converted ones, anything else), DANv1 checkpoints (not supported yet), x1 checkpoints, PCA
matrices of the wrong shape, NaN / inf weights.
"""
import re
from collections import OrderedDict
from collections.abc import Mapping

import torch

from d2c_arch import infer_dan_options
from d2c_convert.convert_util import (
    check_mapping,
    check_outputs,
    load_strictly,
    options_lines,
    read_state_dict,
    short_list,
    source_record,
    target_shapes,
    write_converted,
)
from d2c_inference.checkpoint_util import load_checkpoint, test_option_dict
from d2c_utils.errors import UserError
from d2c_utils.option_check import dump_option_yaml

PROG = 'd2c-convert-dan'
DEFAULT_LOOP = 4  # every official option file (the class default, 8, is never used)
GROUP_SKIP = 'double'  # the official DPCG's in-place list update doubles the chain output
BUFFERS = ('encoder', 'init_kernel', 'init_ker_map')  # official buffers; consumed, not mapped
DELTA_ATOL = 1e-6  # the file stores float32; vec(delta) P is one row of P, so it matches to rounding
REPO_URL = 'https://github.com/greatlog/DAN'
# the PCA files of the official repository (pca_matrix/DANv2/), by shape, for hints
OFFICIAL_PCA_FILES = {
    (441, 10): 'pca_matrix/DANv2/pca_matrix.pth for setting 1, kernel 21',
    (121, 10): 'pca_matrix/DANv2/pca_aniso_matrix_x2.pth for setting 2 x2, kernel 11',
    (961, 15): 'pca_matrix/DANv2/pca_aniso_matrix_x4.pth for setting 2 x4, kernel 31',
}

# Official key (after ``module.`` is removed) -> DAN key. Official modules: Restorer.head1 (3x3 on
# the image), head2 (1x1 on the code), body.<g> = DPCG with body.<b> = DPCB (body1: image path,
# body2: condition path, each conv-LReLU-conv at indices 0 and 2), fusion, upscale (see above);
# Estimator.head_LR.0 / head_HR.0 (one conv in a Sequential), body = one DPCG, tail.0 / tail.2
# (conv, pool, conv, softmax).
_P = r'(weight|bias)'
RULES = (
    (rf'Restorer\.head1\.{_P}', 'restorer.image_head.{0}'),
    (rf'Restorer\.head2\.{_P}', 'restorer.code_head.{0}'),
    (rf'Restorer\.body\.(\d+)\.body\.(\d+)\.body1\.([02])\.{_P}', 'restorer.groups.{0}.blocks.{1}.image_body.{2}.{3}'),
    (rf'Restorer\.body\.(\d+)\.body\.(\d+)\.body2\.([02])\.{_P}', 'restorer.groups.{0}.blocks.{1}.cond_body.{2}.{3}'),
    (rf'Restorer\.fusion\.{_P}', 'restorer.fusion.{0}'),
    (rf'Estimator\.head_LR\.0\.{_P}', 'estimator.lr_head.{0}'),
    (rf'Estimator\.head_HR\.0\.{_P}', 'estimator.sr_head.{0}'),
    (rf'Estimator\.body\.body\.(\d+)\.body1\.([02])\.{_P}', 'estimator.group.blocks.{0}.image_body.{1}.{2}'),
    (rf'Estimator\.body\.body\.(\d+)\.body2\.([02])\.{_P}', 'estimator.group.blocks.{0}.cond_body.{1}.{2}'),
    (rf'Estimator\.tail\.([02])\.{_P}', 'estimator.tail.{0}.{1}'),
)
UPSCALE_RULE = rf'Restorer\.upscale\.(\d+)\.{_P}'
# official upscale conv index -> DAN module, by the set of conv indices the checkpoint has:
# x4 (conv, shuffle, conv, shuffle, conv) and x2 / x3 (conv, shuffle, conv)
UPSCALE_TABLES = {
    (0, 2, 4): dict(zip((0, 2, 4), ('restorer.upsample.0', 'restorer.upsample.2', 'restorer.conv_last'))),
    (0, 2): dict(zip((0, 2), ('restorer.upsample.0', 'restorer.conv_last'))),
}

# ----------------------------------------------------------------------------------------------
# Reading and recognising the file
# ----------------------------------------------------------------------------------------------
EXPECTS = f'expected the official DANv2 checkpoint (a dict of tensors saved by {REPO_URL}, e.g. danv2_x4_setting1.pth)'


def check_is_danv2(state, path):
    """Refuse anything but an official DANv2 state dict, saying what it is instead.

    Raises:
        UserError: a DANv1, D2CNet, already converted DAN, x1 or unrelated checkpoint.
    """
    keys = list(state)
    if 'Restorer.head1.weight' in state and 'Estimator.head_LR.0.weight' in state:
        if 'Restorer.upscale.weight' in state:
            raise UserError(f'{path}: an x1 DANv2 checkpoint (Restorer.upscale is a single conv); DAN here supports '
                            'x2, x3 and x4')
        return
    if 'Restorer.head.weight' in state or 'Estimator.out.weight' in state or 'Estimator.head_LR.weight' in state:
        raise UserError(f'{path}: a DANv1 checkpoint (Restorer.head and CRB blocks Restorer.body.<b>.body.* on the '
                        'image features concatenated with the tiled code; Estimator.out regressing the code). DANv1 '
                        'is not supported yet; use a DANv2 checkpoint (Restorer.head1 / head2 and DPCB blocks with '
                        'body1 / body2), e.g. danv2_x4_setting1.pth')
    if 'restorer.image_head.weight' in state:
        raise UserError(f'{path}: already in this project\'s DAN layout (restorer.image_head, ...); it needs no '
                        'conversion: set path.pretrain_network_g to it')
    if 'head.weight' in state and any(k.startswith('tails.') for k in keys):
        raise UserError(f'{path}: a D2CNet checkpoint (head, tree, tails), not DAN; this tool converts the '
                        f'official DANv2 checkpoints of {REPO_URL}')
    raise UserError(f'{path}: not a DANv2 checkpoint: found {len(keys)} keys such as '
                    f'{short_list(keys, 4)}; expected Restorer.head1.weight, Estimator.head_LR.0.weight, ... '
                    f'as saved by {REPO_URL} (codes/config/DANv2)')


# ----------------------------------------------------------------------------------------------
# The mapping
# ----------------------------------------------------------------------------------------------
def upscale_table(state):
    """The official upscale conv index -> DAN module for this checkpoint (from the indices it has)."""
    indices = sorted({int(m[1]) for m in (re.fullmatch(UPSCALE_RULE, k) for k in state) if m})
    table = UPSCALE_TABLES.get(tuple(indices))
    if table is None:
        raise UserError(f'Restorer.upscale has convs at indices {indices}; DANv2 has them at 0, 2 (x2, x3: conv, '
                        'pixel shuffle, output conv) or 0, 2, 4 (x4: two conv + pixel shuffle steps, output conv)')
    return table


def dan_key(key, table):
    """The DAN key of one official key, or None if no rule matches.

    Args:
        key (str): Official key without ``module.``, e.g. ``Restorer.body.0.body.3.body1.2.weight``.
        table (dict): From :func:`upscale_table`.
    """
    for pattern, target in RULES:
        match = re.fullmatch(pattern, key)
        if match:
            return target.format(*match.groups())
    match = re.fullmatch(UPSCALE_RULE, key)
    if match and int(match[1]) in table:
        return f'{table[int(match[1])]}.{match[2]}'
    return None


def _pca_hint(shape, prefix=' (', suffix=')'):
    """Which official PCA file has this shape, as text for messages ('' if none)."""
    known = OFFICIAL_PCA_FILES.get(tuple(shape))
    return f'{prefix}the official {known}{suffix}' if known else ''


def _pca_from_encoder(encoder, want, path):
    """The checkpoint's ``encoder`` buffer (1, l*l, t) as P (l*l, t); UserError naming both shapes."""
    matrix = encoder[0] if encoder.dim() == 3 and encoder.shape[0] == 1 else encoder
    if tuple(matrix.shape) != want:
        raise UserError(
            f'{path}: the buffer encoder has shape {tuple(encoder.shape)}, but the weights need a PCA matrix '
            f'(kernel_size**2, code_length) = {want}; the checkpoint is inconsistent')
    return matrix.float().contiguous()


def _pca_from_file(pca_path, want, kernel_size, code_length, has_encoder=False):
    """P from ``--pca``: the official files (a bare tensor) or scripts/make_dan_pca.py's dict."""
    from d2c_arch.dan_arch import load_pca_matrix
    loaded = load_checkpoint(pca_path, '--pca <the PCA matrix .pth>')
    if isinstance(loaded, Mapping):
        loaded = loaded.get('pca_matrix', loaded.get('encoder'))
    if not torch.is_tensor(loaded):
        raise UserError(f'--pca {pca_path}: holds no PCA matrix (a tensor (l*l, t), or a dict with "pca_matrix")')
    shape = tuple(loaded.shape[1:]) if loaded.dim() == 3 and loaded.shape[0] == 1 else tuple(loaded.shape)
    if shape != want:
        fix = ('drop --pca: the checkpoint carries its own matrix (buffer encoder)'
               if has_encoder else f'pass the matrix the model was trained with{_pca_hint(want, ", e.g. ", "")}')
        raise UserError(f'--pca {pca_path} has shape {tuple(loaded.shape)}{_pca_hint(shape)}, but the checkpoint '
                        f'needs (kernel_size**2, code_length) = {want} (kernel_size {kernel_size} from '
                        f'Estimator.tail.2, code_length {code_length} from Restorer.head2); {fix}')
    return load_pca_matrix(loaded, kernel_size, code_length, what=f'--pca {pca_path}')


def _check_buffers(state, matrix, kernel_size):
    """Warnings for ``init_kernel`` / ``init_ker_map`` that are not the delta kernel and its code."""
    warnings = []
    if 'init_kernel' in state:
        delta = torch.zeros(kernel_size, kernel_size)
        delta[kernel_size // 2, kernel_size // 2] = 1
        kernel = state['init_kernel'].float()
        if kernel.numel() != delta.numel() or not torch.equal(kernel.reshape(delta.shape), delta):
            warnings.append(f'init_kernel {tuple(kernel.shape)} is not the centred {kernel_size}x{kernel_size} delta '
                            'the official code makes; DAN starts from the delta (its code is row l*l // 2 of P)')
    if 'init_ker_map' in state:
        have = state['init_ker_map'].float().reshape(-1)
        want = matrix[kernel_size**2 // 2]
        if have.numel() != want.numel():
            warnings.append(f'init_ker_map has shape {tuple(state["init_ker_map"].shape)}, not (1, {want.numel()}); '
                            'ignored: DAN starts from the code of the delta kernel, vec(delta) P')
        elif not torch.allclose(have, want, rtol=0, atol=DELTA_ATOL):
            diff = (have - want).abs().max().item()
            warnings.append(f'init_ker_map differs from the delta kernel\'s code vec(delta) P by up to {diff:.3g}; '
                            'DAN computes its starting code from P, so the first iteration (and so the output) will '
                            'differ from the official network\'s')
    return warnings


def convert_state_dict(state, pca=None, loop=DEFAULT_LOOP, path='checkpoint', pca_path=None):
    """An official DANv2 state dict -> a DAN state dict and its ``network_g`` options.

    Args:
        state (dict[str, Tensor]): Official keys, ``module.`` already removed
            (:func:`d2c_convert.convert_util.unwrap_state_dict`).
        pca (Tensor | None): P (l*l, t) given separately (``--pca``), for checkpoints without ``encoder``.
            If the checkpoint has ``encoder``, they must agree.
        loop (int): Iterations T for ``network_g``.
        path (str): The file, for messages.
        pca_path (str | None): Where ``pca`` came from, for messages (default: 'the given matrix').

    Returns:
        tuple[OrderedDict, OrderedDict, dict]: ``{DAN key: float32 Tensor}`` (with the buffer
        ``pca_matrix``), the ``network_g`` options (``type: DAN``), and notes: ``pca`` ('encoder' or
        'given'), ``warnings`` (list of str), ``missing_buffers`` (official buffers not in the file).

    Raises:
        UserError: not DANv2, keys left over on either side, shape mismatches, no / wrong PCA matrix.
    """
    if not isinstance(loop, int) or loop < 1:
        raise UserError(f'--loop {loop!r}: the number of iterations must be an integer >= 1 (the official files use 4)')
    check_is_danv2(state, path)
    table = upscale_table(state)

    converted, leftover, origins = OrderedDict(), [], {}
    for key, value in state.items():
        if key in BUFFERS:
            continue
        target = dan_key(key, table)
        if target is None:
            leftover.append(key)
            continue
        converted[target], origins[target] = value, (None, key)
    if leftover:
        raise UserError(f'{path}: {len(leftover)} key(s) match no DANv2 module: {short_list(leftover)}; the file is '
                        'not a checkpoint of the released DANv2 code (or a modified one)')
    try:
        options = infer_dan_options(converted)
    except (KeyError, ValueError, IndexError) as err:
        raise UserError(f'{path}: the DANv2 keys are incomplete ({type(err).__name__}: {err})') from None
    net_opt = OrderedDict(type='DAN')
    net_opt.update(options)
    net_opt.update(loop=loop, group_skip=GROUP_SKIP)
    kernel_size, code_length = options['kernel_size'], options['code_length']
    if kernel_size**2 != converted['estimator.tail.2.weight'].shape[0] or kernel_size % 2 != 1:
        raise UserError(f'{path}: Estimator.tail.2 gives {converted["estimator.tail.2.weight"].shape[0]} kernel taps, '
                        'not the square of an odd kernel side')
    if options['upscale'] not in (2, 3, 4):
        raise UserError(f'{path}: Estimator.head_HR.0 has a {converted["estimator.sr_head.weight"].shape[-1]}-wide '
                        f'kernel, i.e. scale x{options["upscale"]}; DAN supports x2, x3 and x4')

    # P: the file's own matrix wins; a separately given one must then agree (the weights were trained with it)
    want = (kernel_size**2, code_length)
    given_name = pca_path or 'the given matrix'
    if 'encoder' in state:
        matrix, source = _pca_from_encoder(state['encoder'], want, path), 'encoder'
        if pca is not None:
            if tuple(pca.shape) != want:
                raise UserError(f'--pca {given_name} has shape {tuple(pca.shape)}, the checkpoint needs {want}')
            if not torch.allclose(pca.float(), matrix, rtol=0, atol=DELTA_ATOL):
                diff = (pca.float() - matrix).abs().max().item()
                raise UserError(f'{path} carries its own PCA matrix (buffer encoder), which differs from --pca '
                                f'{given_name} by up to {diff:.3g}; the weights were trained with the checkpoint\'s: '
                                'drop --pca')
    elif pca is None:
        raise UserError(f'{path} has no PCA matrix (buffer encoder): checkpoints saved before the official code made '
                        'it a buffer lack it. Pass the matrix the model was trained with: --pca PCA.pth, for a '
                        f'kernel_size {kernel_size}, code_length {code_length} network a {want} matrix'
                        f'{_pca_hint(want, ", e.g. ", "")}')
    else:
        if tuple(pca.shape) != want:
            raise UserError(f'--pca {given_name} has shape {tuple(pca.shape)}, but the checkpoint needs '
                            f'(kernel_size**2, code_length) = {want}{_pca_hint(want, ", e.g. ", "")}')
        matrix, source = pca.float().contiguous(), 'given'
    converted['pca_matrix'] = matrix
    origins['pca_matrix'] = (None, 'encoder' if source == 'encoder' else f'--pca {given_name}')

    targets = target_shapes(net_opt)
    check_mapping(converted, targets, origins, 'DAN', layout_text(net_opt), path=path)
    state_dict = OrderedDict((k, converted[k].detach().to(torch.float32).contiguous()) for k in targets)
    notes = {
        'pca': source,
        'warnings': _check_buffers(state, matrix, kernel_size),
        'missing_buffers': [b for b in BUFFERS if b not in state],
    }
    return state_dict, net_opt, notes


def layout_text(net_opt):
    """One line describing a DAN layout, e.g. for messages."""
    return (f'x{net_opt["upscale"]}, restorer {net_opt["num_feat"]} wide, {net_opt["num_group"]} groups x '
            f'{net_opt["num_block"]} blocks, estimator {net_opt["estimator_feat"]} wide, '
            f'{net_opt["estimator_blocks"]} blocks, kernel {net_opt["kernel_size"]}, code length '
            f'{net_opt["code_length"]}')


# ----------------------------------------------------------------------------------------------
# Files and the command line
# ----------------------------------------------------------------------------------------------
def option_file_text(net_opt, weights_path):
    """A small BasicSR test option file for the converted weights (DANModel, a placeholder data set).

    Setting-1 layouts (kernel 21, code length 10) get a Gaussian8 Set5 placeholder, others (setting
    2: kernel 11 / 31) a DIV2KRK one; both under ``datasets/`` where scripts/make_blur_testset.py
    writes them (Gaussian8: all 8 widths in ``LR`` with their HR in ``HR_all``).
    """
    scale = net_opt['upscale']
    setting1 = (net_opt['kernel_size'], net_opt['code_length']) == (21, 10)
    if setting1:
        data_name, root, gt = f'Set5_gaussian8_x{scale}', f'datasets/Set5_gaussian8_x{scale}', 'HR_all'
        how = f'scripts/make_blur_testset.py gaussian8 --input datasets/Set5/GTmod12 --scale {scale} --output {root}'
    else:
        data_name, root, gt = f'DIV2KRK_x{scale}', f'datasets/DIV2KRK_x{scale}', 'HR'
        how = f'scripts/make_blur_testset.py div2krk ... --scale {scale} --output {root}, or the real DIV2KRK pairs'
    dataset = {
        'name': data_name,
        'type': 'PairedImageDataset',
        'dataroot_gt': f'{root}/{gt}',
        'dataroot_lq': f'{root}/LR',
        'io_backend': {
            'type': 'disk'
        },
    }
    opt = test_option_dict(weights_path, 'DANModel', scale, net_opt, dataset)
    header = (f'# Made by {PROG}: test the converted official DANv2 weights ({layout_text(net_opt)}).\n'
              '#   d2c-test -opt <this file>\n'
              f'# datasets.test_1 is a placeholder; make it with: python {how}\n'
              '# PSNR / SSIM on Y with `scale` pixels shaved, as the DAN papers report.\n')
    return header + dump_option_yaml(opt)


def convert_checkpoint_file(checkpoint, output, pca=None, opt_out=None, loop=DEFAULT_LOOP, force=False):
    """Convert an official DANv2 checkpoint file (what ``d2c-convert-dan`` does).

    Args:
        checkpoint (str): The official ``.pth`` (e.g. ``danv2_x4_setting1.pth``).
        output (str): The BasicSR checkpoint to write, atomically: ``{'params', 'network_g',
            'converted_from'}``; nothing is written if anything fails.
        pca (str | None): PCA matrix file for checkpoints without the buffer ``encoder``.
        opt_out (str | None): Also write a small test option file here (:func:`option_file_text`).
        loop (int): Iterations T for ``network_g``.
        force (bool): Overwrite existing output files.

    Returns:
        list[str]: lines to print for the user.
    """
    check_outputs({'OUT.pth': output, '--opt-out': opt_out}, {'OFFICIAL.pth': checkpoint, '--pca': pca}, force)
    state, wrapper = read_state_dict(checkpoint, 'OFFICIAL.pth (the official DANv2 checkpoint)', EXPECTS)
    matrix = None
    if pca is not None:
        # the sizes to check against come from the weights; read them first so the message can name them
        check_is_danv2(state, checkpoint)
        options = _options_for_pca(state, checkpoint)
        matrix = _pca_from_file(pca, (options['kernel_size']**2, options['code_length']), options['kernel_size'],
                                options['code_length'], 'encoder' in state)
    state_dict, net_opt, notes = convert_state_dict(state, matrix, loop, checkpoint, pca)

    num_params = sum(p.numel() for p in load_strictly(net_opt, state_dict).parameters())

    lines = [f'read {checkpoint}: {len(state)} tensors' + (f' (under {wrapper!r})' if wrapper else '')]
    lines.append(f'layout: {layout_text(net_opt)}; loop {loop} (not in the weights), group_skip {GROUP_SKIP!r} '
                 '(what the official code computes)')
    if notes['pca'] == 'encoder':
        lines.append(f'PCA matrix: the checkpoint\'s buffer encoder {tuple(state_dict["pca_matrix"].shape)}')
    else:
        lines.append(f'PCA matrix: {pca} {tuple(state_dict["pca_matrix"].shape)} (the checkpoint has no encoder '
                     f'buffer; missing: {", ".join(notes["missing_buffers"])})')
    lines.extend(f'warning: {w}' for w in notes['warnings'])

    opt_text = option_file_text(net_opt, output) if opt_out else None
    pca_record = source_record(pca) if pca is not None else {'file': 'encoder', 'sha256': None}
    converted_from = dict(
        source_record(checkpoint),
        format='official DANv2 state dict' + (f' under {wrapper!r}' if wrapper else ''),
        pca='encoder' if notes['pca'] == 'encoder' else pca_record['file'],
        pca_sha256=pca_record['sha256'],
        warnings=list(notes['warnings']),
        tool=PROG)
    lines += write_converted(output, state_dict, net_opt, converted_from, num_params, opt_out, opt_text)
    if opt_out:
        lines.append(f'wrote {opt_out} (a test option file; its data set is a placeholder)')
    return lines + options_lines(net_opt)


def _options_for_pca(state, path):
    """kernel_size and code_length read from the official keys (before the full conversion)."""
    try:
        return {
            'kernel_size': int(round(state['Estimator.tail.2.weight'].shape[0]**0.5)),
            'code_length': state['Restorer.head2.weight'].shape[1],
        }
    except (KeyError, IndexError) as err:
        raise UserError(f'{path}: the DANv2 keys are incomplete (no {err}); cannot check --pca') from None
