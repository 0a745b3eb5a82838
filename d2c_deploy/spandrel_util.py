"""D2C-SR checkpoints in spandrel, the model loader of chaiNNer and ComfyUI.

`spandrel <https://github.com/chaiNNer-org/spandrel>`_ recognises a model from the keys of its
state dict and builds it from the shapes. :func:`install` adds an ``Architecture`` for D2CNet
to spandrel's ``MAIN_REGISTRY``, after which ``spandrel.ModelLoader().load_from_file(path)``
returns an ``ImageModelDescriptor`` whose ``model`` is a :class:`d2c_arch.D2CNet` for a
checkpoint written by d2c-sr (BasicSR's ``{'params': ..., 'params_ema': ...}``; spandrel itself
unwraps it and prefers ``params_ema``, as d2c-sr's own tools do). ``descriptor(image)`` maps an
(N, C, H, W) image in [0, 1] to the fused SR image (N, C, sH, sW), clamped to [0, 1];
``descriptor.model(image)`` is D2CNet's forward pass itself (fused output, not clamped).

Once d2c-sr is pip-installed, :mod:`d2c_autoload` calls :func:`install` as soon as a program
imports spandrel, so chaiNNer and ComfyUI need no change.

What the weights tell (``d2c_arch.infer_options``): channels, ``num_feat``, the tree (L, C),
branch type and its options, tail (``upsampler``) and scale, the convergence width. What they
cannot tell (``d2c_arch.d2cnet_arch.NOT_INFERABLE``) is **assumed** to be D2CNet's default, the
paper's D2C-SR: ``rgb_mean`` = DIV2K's mean (zeros for a network that is not RGB, as D2CNet's
default has three values), ``img_range`` = 1, ``fusion_logit_relu`` = True, ``input_skip`` =
None. Every loaded model names these in its tags (``assumed: rgb_mean=DIV2K``, ...). A network
trained with other values (the ``d2c-swap`` counterparts of options/table3 use a zero mean, an
image-level input skip, or EDSR's ``img_range`` 255; converted official weights may need another
``rgb_mean``) loads, but its output is off: run it with ``d2c-infer --opt <its option file>``.
The scale is never assumed: tails that do not carry it (``interpolate``; a one-step
``nearest+conv``, the same at x2 and x3) are refused with a message.
"""
import warnings
from collections.abc import Mapping

from d2c_inference.registry import METHODS, method_named
from d2c_utils.errors import UserError

ARCH_ID = 'D2C-SR'
ARCH_NAME = 'D2C-SR'
INSTALL_HINT = 'pip install "d2c-sr[spandrel]"'
# the top-level modules of D2CNet; a state dict with anything else is not a D2CNet's
D2C_PARTS = ('head', 'tree', 'res_convs', 'tails', 'convergence')
# the keys every D2CNet has, whatever its branch type and tail: head conv, first residual conv of
# the first leaf, first fusion conv (bias-free)
D2C_REQUIRED_KEYS = ('head.weight', 'res_convs.0.0.weight', 'convergence.0.weight')
# BasicSR's RSTB computes the attention mask of any size but the training patch in float32, which
# a whole-model bfloat16 cast cannot multiply with its bfloat16 attention (seen with torch 2.14)
BF16_UNSAFE_BRANCHES = ('SwinIRBranch', )
# the paper's branch module: D2CNet's defaults are its settings; other branch types usually are not
PAPER_BRANCH = 'RCANBranch'

_CACHE = {}  # 'spandrel', 'error', 'architecture': made once, on first use

# BasicSR's state dict keys, in the order a loader prefers them (params_ema: the EMA weights)
PARAM_KEYS = ('params_ema', 'params')


def unwrap_flat_checkpoint(state_dict):
    """The network's state dict of a d2c-sr ``.safetensors`` file as spandrel reads it (flat names).

    ``logger.save_format: safetensors`` stores BasicSR's ``{'params': ..., 'params_ema': ...}`` as
    tensors named ``params.<key>`` / ``params_ema.<key>`` (see
    :func:`d2c_inference.checkpoint_util.save_checkpoint`); spandrel unwraps nested dicts but not
    these, so the ``params_ema`` (else ``params``) tensors are taken here, without the prefix.
    Anything else is returned as it is.
    """
    if not isinstance(state_dict, Mapping) or not state_dict:
        return state_dict
    if not all(isinstance(key, str) and '.' in key for key in state_dict):
        return state_dict
    prefixes = {key.split('.', 1)[0] for key in state_dict}
    if prefixes <= set(PARAM_KEYS):
        chosen = next(key for key in PARAM_KEYS if key in prefixes)
        return {key[len(chosen) + 1:]: value for key, value in state_dict.items() if key.startswith(chosen + '.')}
    return state_dict


def is_d2c_state_dict(state_dict):
    """True if ``state_dict`` (spandrel's canonical form: unwrapped, ``module.`` removed) is D2CNet's.

    The registry's test (:meth:`d2c_inference.registry.D2CNetMethod.detect`): every key belongs to one
    of D2CNet's parts (head, tree, res_convs, tails, convergence), and the head, the first tree node,
    the first leaf's residual conv and tail and the convergence network are there (a d2c-sr
    ``.safetensors`` file's ``params.`` prefixes are removed first, see :func:`unwrap_flat_checkpoint`).
    Reads only the keys; never raises, whatever the file held, because spandrel calls every
    architecture's ``detect`` on every model it loads.
    """
    return method_named('D2CNet').detect(unwrap_flat_checkpoint(state_dict))


def _spandrel():
    """The spandrel module, imported on first use; UserError naming the install command if missing."""
    if 'spandrel' not in _CACHE:
        try:
            import spandrel
        except ImportError as err:
            raise UserError(f'spandrel is not installed ({err}); D2C-SR models load through spandrel (chaiNNer, '
                            f'ComfyUI) once it is: {INSTALL_HINT}') from None
        _CACHE['spandrel'] = spandrel
    return _CACHE['spandrel']


def load_error_class():
    """The exception :func:`load_descriptor` raises: a :class:`UserError` and spandrel's ``UnsupportedModelError``.

    Both, so that d2c-sr's tools report it as a user error and programs that catch spandrel's
    "not supported" (to try another loader, or to show a message) catch it too.
    """
    if 'error' not in _CACHE:

        class D2CSpandrelError(UserError, _spandrel().UnsupportedModelError):
            """A D2C-SR checkpoint that spandrel cannot load; the message says why and what to do."""
            __qualname__ = 'D2CSpandrelError'  # tracebacks name the module's class, not the factory's local

        _CACHE['error'] = D2CSpandrelError
    return _CACHE['error']


def _fail(message):
    return load_error_class()(f'D2C-SR checkpoint: {message}')


def _import_d2c_arch():
    """``d2c_arch`` (imports basicsr and torch) on the first D2C load, not when spandrel starts."""
    try:
        import d2c_arch
        from d2c_arch import d2cnet_arch as d2c_arch_module
    except ImportError as err:
        raise _fail(f'd2c-sr cannot build D2CNet here ({type(err).__name__}: {err}). It needs BasicSR in this '
                    'Python: pip install --no-build-isolation basicsr==1.4.2') from None
    return d2c_arch, d2c_arch_module


def _show(value, div2k_mean):
    if isinstance(value, (list, tuple)):
        if [round(float(v), 4) for v in value] == [round(v, 4) for v in div2k_mean]:
            return 'DIV2K'
        if not any(value):
            return '0'
        return '[' + ','.join(f'{float(v):g}' for v in value) + ']'
    return str(value)


def network_options(state_dict):
    """D2CNet options for a state dict: read from the weights, the rest assumed.

    Args:
        state_dict (dict[str, Tensor]): D2CNet weights (``module.`` prefixes removed).

    Returns:
        tuple[dict, dict]: the D2CNet keyword arguments (what the weights tell, plus the
        assumptions), and the assumptions alone (``NOT_INFERABLE`` keys and their values).

    Raises:
        D2CSpandrelError (see :func:`load_error_class`): the branch type is unknown, or the
        tails do not tell the scale.
    """
    import torch  # spandrel has imported it already

    d2c_arch, d2c_arch_module = _import_d2c_arch()
    from d2c_arch.branch_util import DIV2K_MEAN
    not_tensors = [key for key, value in state_dict.items() if not torch.is_tensor(value)]
    if not_tensors:
        raise _fail(f'{len(not_tensors)} entries are not tensors (first: {not_tensors[:3]}); the file is damaged or '
                    'was written by another program.')
    try:
        inferred = d2c_arch.infer_options(state_dict)
    except Exception as err:  # a damaged state dict can fail anywhere in the shape reading
        raise _fail(f'its weights cannot be read as D2CNet ({type(err).__name__}: {err}); the file is damaged or '
                    'was written by another program.') from None
    if 'branch_type' not in inferred:
        node_keys = sorted(k for k in state_dict if k.startswith('tree.0.0.'))[:3]
        raise _fail(f'the tree nodes (keys {node_keys}, ...) match no branch type this d2c-sr knows '
                    f'({sorted(d2c_arch.BRANCH_REGISTRY.keys())}); update d2c-sr to the version that wrote it.')
    if 'upscale' not in inferred:
        raise _fail(f"its tails ('{inferred.get('upsampler')}' upsampler) do not tell the scale: an 'interpolate' "
                    "tail is one conv at the output size, and a one-step 'nearest+conv' tail is the same at x2 and "
                    'x3. spandrel has no way to be told it; run this model with d2c-infer --model <file> --opt '
                    '<the option file it was trained with>.')
    defaults = d2c_arch.default_options()
    assumed = {key: defaults[key] for key in d2c_arch_module.NOT_INFERABLE}
    if len(assumed['rgb_mean']) != inferred['num_in_ch']:
        # D2CNet's default mean has three values; a network of other channels has no DIV2K mean to assume
        assumed['rgb_mean'] = [0.] * inferred['num_in_ch']
    options = {key: value for key, value in inferred.items() if key != 'num_branch'}  # num_branch: not an option
    options.update(assumed)
    return options, {key: _show(value, DIV2K_MEAN) for key, value in assumed.items()}


def _tags(options, assumed, size_multiple):
    """spandrel tags: what the network is, then every assumed option (chaiNNer shows them)."""
    tags = [options['branch_type'], f"{options['num_feat']}nf", f"tree {options['tree_depth']}x{options['tree_width']}"]
    tags += [f'{options[key]}{short}' for key, short in (('num_group', 'ng'), ('num_block', 'nb')) if key in options]
    tags += [options['upsampler']] + ([f'window {size_multiple}'] if size_multiple > 1 else [])
    return tags + [f'assumed: {key}={value}' for key, value in assumed.items()]


def load_descriptor(architecture, state_dict):
    """spandrel's ``Architecture.load`` for D2CNet: build it, check the weights fit, describe it.

    Args:
        architecture: The spandrel ``Architecture`` (:func:`architecture`).
        state_dict (dict[str, Tensor]): D2CNet weights, as spandrel passes them.

    Returns:
        spandrel.ImageModelDescriptor: ``model`` the D2CNet with the weights (strictly loaded,
        eval mode); purpose 'SR'; ``scale``, ``input_channels``, ``output_channels`` from the
        weights; no size requirements: D2CNet takes any size and pads to its ``size_multiple``
        itself (SwinIR branches: the window, shown as a tag ``window <n>``); ``supports_half``
        False, ``supports_bfloat16`` True except for SwinIR branches. ``descriptor(image)``: an
        (N, C, H, W) image in [0, 1] -> the fused SR image (N, C, sH, sW), clamped to [0, 1].

    Raises:
        D2CSpandrelError (see :func:`load_error_class`): what cannot be loaded, and why.
    """
    spandrel = _spandrel()
    state_dict = unwrap_flat_checkpoint(state_dict)
    options, assumed = network_options(state_dict)
    d2c_arch, _ = _import_d2c_arch()
    from d2c_inference.checkpoint_util import mismatch_message
    try:
        net = d2c_arch.D2CNet(**options)
    except (TypeError, ValueError) as err:
        raise _fail(f'the options read from its weights do not build D2CNet: {err}') from None
    problem = mismatch_message(
        net, state_dict, options, 'the D2CNet options read from its shapes', 'the state dict',
        'the file is incomplete or damaged (or was edited): save the weights again from the training run.')
    if problem:
        raise _fail(problem)
    if options['branch_type'] != PAPER_BRANCH:
        warnings.warn(
            f"d2c-sr: a D2C-SR model with {options['branch_type']} loaded through spandrel with D2CNet's default "
            f"{', '.join(f'{k}={v}' for k, v in assumed.items())} (the paper's D2C-SR settings; the weights do not "
            'store them). d2c-swap counterparts (options/table3) may use other values (a zero mean, an input skip, '
            "EDSR's img_range 255): if the output looks wrong, run it with d2c-infer --opt <its option file>.",
            RuntimeWarning)
    descriptor = spandrel.ImageModelDescriptor(
        net,
        state_dict,
        architecture=architecture,
        purpose='SR',
        tags=_tags(options, assumed, net.size_multiple),
        # trained D2C-SR features are not checked to stay within fp16's range (d2c-infer falls back to fp32
        # when an fp16 output is broken; spandrel callers cannot); bfloat16 keeps fp32's range
        supports_half=False,
        supports_bfloat16=options['branch_type'] not in BF16_UNSAFE_BRANCHES,
        scale=options['upscale'],
        input_channels=options['num_in_ch'],
        output_channels=options['num_out_ch'],
        # none declared, although SwinIR branches work on multiples of their window: spandrel would pad the
        # image and crop the fused output, whereas D2CNet pads itself and crops the predictions *before* the
        # convergence convs, so the last rows and columns would differ from D2CNet's (and d2c-infer's) output
        size_requirements=spandrel.SizeRequirements(),
        tiling=spandrel.ModelTiling.SUPPORTED)
    return descriptor.eval()


def architecture():
    """The spandrel ``Architecture`` of D2CNet (id ``D2C-SR``; one instance per process)."""
    if 'architecture' not in _CACHE:
        spandrel = _spandrel()

        class D2CArch(spandrel.Architecture):
            """D2CNet in spandrel: ``detect`` is :func:`is_d2c_state_dict`, ``load`` :func:`load_descriptor`."""
            __qualname__ = 'D2CArch'

            def __init__(self):
                super().__init__(id=ARCH_ID, name=ARCH_NAME, detect=is_d2c_state_dict)

            def load(self, state_dict):
                return load_descriptor(self, state_dict)

        _CACHE['architecture'] = D2CArch()
    return _CACHE['architecture']


def load_method_descriptor(architecture, method, state_dict):
    """spandrel's ``Architecture.load`` for a registered method other than D2CNet (DAN, SDFlow).

    The options are read from the weights (:meth:`~d2c_inference.registry.Method.options_from_weights`),
    what they cannot tell is assumed and named in the tags (``assumed: loop=4``, ...); the weights are
    loaded strictly after the one mismatch check. ``descriptor(image)``: an (N, C, H, W) image in
    [0, 1] -> the network's forward pass (DAN: the SR image of its last iteration; SDFlow: one SR
    sample at the checkpoint's temperature), clamped to [0, 1].
    """
    spandrel = _spandrel()
    state_dict = unwrap_flat_checkpoint(state_dict)
    fail = lambda message: load_error_class()(f'{method.name} checkpoint: {message}')  # noqa: E731
    try:
        options = method.options_from_weights(state_dict)
        net = method.build(options, f'the {method.name} options read from its shapes')
    except Exception as err:  # a damaged state dict can fail anywhere in the shape reading
        raise fail(f'its weights cannot be read as {method.name} ({type(err).__name__}: {err}); the file is damaged '
                   'or was written by another program.') from None
    from d2c_inference.checkpoint_util import mismatch_message
    problem = mismatch_message(
        net, state_dict, options, f'the {method.name} options read from its shapes', 'the state dict',
        'the file is incomplete or damaged (or was edited): save the weights again from the training run.')
    if problem:
        raise fail(problem)
    net.load_state_dict(state_dict, strict=True)
    try:
        method.check_loaded(net, None, options, 'the state dict')
    except UserError as err:
        raise fail(str(err)) from None
    channels = options.get('num_in_ch', 3)
    descriptor = spandrel.ImageModelDescriptor(
        net,
        state_dict,
        architecture=architecture,
        purpose='SR',
        tags=[f'{key}={value}' for key, value in options.items() if key in ('num_feat', 'kernel_size', 'code_length')] +
        [f'assumed: {key}={value}' for key, value in method.assumed.items()],
        supports_half=False,  # fp16's range is not checked for these networks; bfloat16 keeps fp32's
        supports_bfloat16=True,
        scale=net.upscale,
        input_channels=channels,
        output_channels=channels,
        size_requirements=spandrel.SizeRequirements(multiple_of=getattr(net, 'size_multiple', 1)),
        tiling=spandrel.ModelTiling.SUPPORTED)
    return descriptor.eval()


def method_architecture(method):
    """The spandrel ``Architecture`` of a registered method other than D2CNet (id: the method's name)."""
    key = f'architecture:{method.name}'
    if key not in _CACHE:
        spandrel = _spandrel()

        class MethodArch(spandrel.Architecture):
            """A d2c-sr method in spandrel: ``detect`` and ``load`` from its registry entry."""
            __qualname__ = f'{method.name}Arch'

            def __init__(self):
                super().__init__(
                    id=method.spandrel_id,
                    name=f'{method.name} (d2c-sr)',
                    detect=lambda state: method.detect(unwrap_flat_checkpoint(state)))

            def load(self, state_dict):
                return load_method_descriptor(self, method, state_dict)

        _CACHE[key] = MethodArch()
    return _CACHE[key]


def architectures():
    """spandrel ``Architecture`` objects of every registered method, in the registry's order.

    D2CNet has its own (:func:`architecture`: its tags, scale checks and assumptions), the others the
    one made from their registry entry (:func:`method_architecture`).
    """
    own = {ARCH_ID: architecture}
    return [own[m.spandrel_id]() if m.spandrel_id in own else method_architecture(m) for m in METHODS]


def install(registry=None):
    """Add every registered method (D2CNet, DAN, SDFlow) to spandrel's ``MAIN_REGISTRY`` (or ``registry``).

    A second call does nothing.

    D2C-SR is detected before every architecture already in the registry. None of spandrel's
    (0.4.2) claims a D2CNet state dict, but ours is the stricter test (every key in one of
    D2CNet's parts), so going first keeps a later architecture with a looser test from taking
    D2C checkpoints, and takes nothing from the others.

    Args:
        registry (spandrel.ArchRegistry | None): Default: ``spandrel.MAIN_REGISTRY``, which every
            ``ModelLoader()`` without its own registry uses.

    Returns:
        spandrel.ArchRegistry: the registry.

    Raises:
        UserError: spandrel is not installed (the message names the install command).
    """
    spandrel = _spandrel()
    registry = spandrel.MAIN_REGISTRY if registry is None else registry
    ours = architectures()
    others = tuple(support.architecture.id for support in registry
                   if support.architecture.id not in {arch.id
                                                      for arch in ours})
    for index, arch in enumerate(ours):  # before every other architecture; among ours the registry's order
        if arch.id not in registry:
            later = tuple(a.id for a in ours[index + 1:])
            registry.add(spandrel.ArchSupport(arch, arch.detect, before=others + later))
    return registry
