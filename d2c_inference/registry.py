"""The methods d2c-sr runs, one entry each, in one ordered list (as spandrel keeps one ``Architecture`` per network).

An entry says everything the tools need to know about a method:

* how to recognise its checkpoint from the keys alone (:meth:`Method.detect`; cheap, never raises,
  imports nothing heavy: spandrel calls it on every model it loads);
* how to read its options from the weights, and which options cannot be read (``assumed``: the
  values used then, named in a warning);
* how to build it (the class in BasicSR's ``ARCH_REGISTRY``) and what must hold after loading;
* how to run it on an image file (:meth:`Method.process_image`) and what it writes besides the SR
  image (``extra_outputs``); which ``d2c-infer`` flags it refuses and why (``refused``);
* what it exports to (:meth:`Method.export_graphs`, the graphs ``d2c-export`` writes).

The loader (:mod:`.checkpoint_util`), ``d2c-infer``, ``d2c-export``, ``d2c-summary`` and spandrel
(:mod:`d2c_deploy.spandrel_util`) ask :data:`METHODS`; nothing outside this module branches on a
method's name or class. A fourth method is its arch, its model and one entry here.

Importing this module imports neither torch nor basicsr: what needs them is imported inside the
methods that use it.
"""
from d2c_utils.errors import UserError

# the flags of SDFlow's sampling and downscaling, refused by the other methods
SDFLOW_ONLY = (('downscale', 'samples', 'temperature'),
               '--downscale, --samples and --temperature are for SDFlow checkpoints')


class Method:
    """One method. Subclasses set the class attributes and override what differs.

    Attributes:
        name (str): ``network_g.type`` and ``ARCH_REGISTRY`` name; also the ``d2c_sr.method`` of an export.
        summary (str): One line for help texts.
        required_keys (tuple[str]): Keys every state dict of the method has (after ``module.`` removal).
        parts (tuple[str] | None): The top-level modules of the network; a state dict with another
            part is not the method's (None: not checked).
        assumed (dict): Options the weights cannot tell, and the value used when reading them from the weights.
        fixed (dict): Constructor options set whatever the option source says (e.g. buffers the checkpoint fills).
        runs_without_options (bool): ``d2c-infer`` may run a checkpoint that carries no options, with the
            options read from the weights and ``assumed`` (a warning names them). False where the assumed
            options change the output too much to guess (D2CNet's mean and range): then ``--opt`` is required.
        refused (tuple[tuple[tuple[str], str]]): ``d2c-infer`` arguments (argparse dests) the method refuses,
            with the message saying what to do instead.
        extra_outputs (tuple[str]): What ``d2c-infer`` can write besides the SR image.
        deployable (bool): ``d2c-export`` writes it and ONNX Runtime / OpenVINO run it.
        compiles (bool): ``d2c-infer --compile`` runs it through ``torch.compile``.
        channels_last (bool): Its convolutions run in the channels_last layout (``--no-channels-last`` to not).
        spandrel_id (str): Its ``Architecture`` id in spandrel (the method's name unless set).
    """
    name = ''
    summary = ''
    required_keys = ()
    parts = None
    assumed = {}
    fixed = {}
    runs_without_options = True
    refused = ()
    extra_outputs = ()
    deployable = False
    compiles = False
    channels_last = True

    @property
    def spandrel_id(self):
        return self.name

    # --- recognising and reading a checkpoint (keys and shapes only) ---

    def detect(self, state):
        """True if ``state`` (a state dict, ``module.`` removed) is this method's. Reads only the keys; never raises."""
        try:
            keys = list(state)
        except Exception:  # spandrel passes whatever a file held
            return False
        if not keys or not all(isinstance(key, str) for key in keys) or not all(k in state for k in self.required_keys):
            return False
        return self.parts is None or all(key.split('.', 1)[0] in self.parts for key in keys)

    def read_options(self, state):
        """``network_g`` options the weights determine (without ``type`` and ``assumed``); ValueError if unreadable."""
        raise NotImplementedError

    def options_from_weights(self, state):
        """Options read from ``state`` plus ``assumed``, with ``type``; ValueError if the weights cannot be read."""
        return dict(self.read_options(state), **self.assumed, type=self.name)

    def assumed_note(self):
        """The warning given when a checkpoint ran with options read from its weights."""
        shown = [f'{key}={value}' for key, value in self.assumed.items()]
        shown = ' and '.join([', '.join(shown[:-1]), shown[-1]] if len(shown) > 1 else shown)
        return (f'no options: {shown} assumed (the weights cannot tell them); pass --opt <the training option '
                'file> if they differ')

    # --- building and loading ---

    def arch(self):
        """The network class (imports d2c_arch, and with it torch and basicsr)."""
        import d2c_arch  # noqa: F401  (registers the plugin's networks)
        from basicsr.utils.registry import ARCH_REGISTRY
        return ARCH_REGISTRY.get(self.name)

    def build(self, net_opt, source):
        """The network from ``network_g`` options (``type`` ignored); UserError naming ``source`` if they are bad."""
        from d2c_arch.arch_util import accepted_options

        arch = self.arch()
        kwargs = dict({k: v for k, v in net_opt.items() if k != 'type'}, **self.fixed)
        unknown = sorted(set(kwargs) - set(accepted_options(arch)))
        if unknown:
            raise UserError(f'{source}: network_g has options {self.name} does not know: {unknown}')
        try:
            return arch(**kwargs)
        except (TypeError, ValueError) as err:
            raise UserError(f'{source}: network_g is not valid: {err}') from None

    def check_loaded(self, net, ckpt, net_opt, model_path):
        """Problems a strict load cannot see: raise UserError, or return warning lines."""
        return []

    # --- running ---

    def refuse(self, given, model_path):
        """UserError for a ``d2c-infer`` argument this method cannot honour.

        Args:
            given (set[str]): The argparse dests the user set (values other than the defaults).
            model_path (str): The checkpoint, for the message.
        """
        for flags, message in self.refused:
            if given & set(flags):
                raise UserError(f'{model_path} holds a {self.name}: {message}')

    def prepare(self, net, args, warn):
        """The network ready to run as ``d2c-infer``'s ``args`` ask (layout, compile); ``net`` is on its device."""
        from .tile_util import prepare_network
        return prepare_network(net, args.channels_last and self.channels_last)

    def summary_line(self, net_opt, net):
        """What ``d2c-summary`` says about the network before its table."""
        shown = ', '.join(f'{k}={v}' for k, v in net_opt.items() if k not in ('type', 'pca_matrix'))
        return f'x{net.upscale}, {shown}'

    def describe(self, net, args):
        """The network part of ``d2c-infer``'s first line."""
        return f'{self.name} x{net.upscale}'

    def process_image(self, path, net, options, device, forward, prog):
        """Super-resolve one file and write its outputs; the metrics dict, or None (see infer_util.process_image)."""
        from .infer_util import process_image
        return process_image(path, net, options, device, forward, prog)

    def export_graphs(self, net, outputs='fused'):
        """The graphs ``d2c-export`` writes for ``net``; UserError where the method cannot be exported."""
        raise UserError(f'{self.name} models cannot be exported yet')


class D2CNetMethod(Method):
    name = 'D2CNet'
    summary = 'D2C-SR: a divergence tree of branches fused by learned weight maps (any backbone)'
    # head conv, first residual conv of the first leaf, first fusion conv; every branch type and tail has them
    required_keys = ('head.weight', 'res_convs.0.0.weight', 'convergence.0.weight')
    parts = ('head', 'tree', 'res_convs', 'tails', 'convergence')
    runs_without_options = False  # the mean and range change every output pixel: never guessed for inference
    refused = (SDFLOW_ONLY, )
    extra_outputs = ('branches', 'weights', 'grid', 'metrics')
    deployable = True
    compiles = True
    spandrel_id = 'D2C-SR'  # the id chaiNNer and ComfyUI have known it by since d2c-sr first registered it

    @property
    def assumed(self):
        from d2c_arch.d2cnet_arch import NOT_INFERABLE, default_options
        defaults = default_options()
        return {key: defaults[key] for key in NOT_INFERABLE}

    def detect(self, state):
        if not super().detect(state):
            return False
        keys = list(state)
        return any(k.startswith('tree.0.0.') for k in keys) and any(k.startswith('tails.0.') for k in keys)

    def read_options(self, state):
        from d2c_arch import infer_options
        return {k: v for k, v in infer_options(state).items() if k != 'num_branch'}

    def options_from_weights(self, state):
        options = super().options_from_weights(state)
        if len(options['rgb_mean']) != options.get('num_in_ch', 3):  # no DIV2K mean for a network that is not RGB
            options['rgb_mean'] = [0.] * options['num_in_ch']
        return options

    def check_loaded(self, net, ckpt, net_opt, model_path):
        from .checkpoint_util import constants_mismatch
        return constants_mismatch(ckpt, net_opt)

    def prepare(self, net, args, warn):
        net = super().prepare(net, args, warn)
        if args.compile:  # the instance's forward: the network keeps its class, attributes and state dict
            from d2c_utils.compile_util import CompiledCall, compile_options
            net.forward = CompiledCall(net.forward, compile_options(True, '--compile'), warn, name='D2CNet')
        return net

    def summary_line(self, net_opt, net):
        branch = net_opt.get('branch_type', 'RCANBranch')
        return ', '.join([
            f'x{net.upscale}', f'L={net.tree_depth}, C={net.tree_width} -> P={net.num_branch} branches',
            f'F={net.head.out_channels}', f'{branch} G={net_opt.get("num_group", 2)}, B={net_opt.get("num_block", 4)}' +
            (f', reduction {net_opt.get("reduction", 16)}' if branch == 'RCANBranch' else ''),
            f'fusion features {net.convergence[0].out_channels}'
        ])

    def describe(self, net, args):
        return f'D2CNet x{net.upscale}, {net.num_branch} branches (L={net.tree_depth}, C={net.tree_width})'

    def export_graphs(self, net, outputs='fused'):
        from .export_graphs import d2cnet_graphs
        return d2cnet_graphs(net, outputs)


class DANMethod(Method):
    name = 'DAN'
    summary = 'DANv2: blind SR, the blur kernel estimated and the image restored in alternation'
    required_keys = ('restorer.image_head.weight', )
    parts = ('restorer', 'estimator', 'pca_matrix')
    assumed = {'loop': 4, 'group_skip': 'double'}  # every official option file (the class default loop is 8)
    fixed = {'pca_matrix': None}  # the checkpoint's buffer is loaded; no PCA file needed to run
    refused = (SDFLOW_ONLY,
               (('save_branches', 'save_weights'),
                'DAN has no branches or weight maps: drop --save-branches / --save-weights (--save-kernel writes its '
                'kernel estimate)'))
    extra_outputs = ('kernel', 'metrics')
    deployable = True

    def read_options(self, state):
        from d2c_arch import infer_dan_options
        return infer_dan_options(state)

    def check_loaded(self, net, ckpt, net_opt, model_path):
        if not bool(net.pca_matrix.any()):  # found here, not at the first image
            raise UserError(f'{model_path}: its PCA matrix (the buffer pca_matrix) is all zeros, so DAN cannot encode '
                            'kernels; convert the official weights with d2c-convert-dan --pca <pca_matrix.pth>, or use '
                            'a checkpoint written by training with network_g.pca_matrix set')
        return []

    def describe(self, net, args):
        crop = f'kernel from the central {args.kernel_crop}px' if args.kernel_crop else 'kernel from the whole image'
        return f'DAN x{net.upscale}, loop {net.loop}, kernel {net.kernel_size}x{net.kernel_size} ({crop})'

    def process_image(self, path, net, options, device, forward, prog):
        from .dan_infer_util import one_kernel_per_image
        from .infer_util import process_image
        return process_image(path, net, options, device, forward, prog, per_image=one_kernel_per_image)

    def export_graphs(self, net, outputs='fused'):
        from .export_graphs import dan_graphs
        return dan_graphs(net)


class SDFlowMethod(Method):
    name = 'SDFlow'
    summary = 'SDFlow: unpaired SR and realistic downscaling by normalizing flows (samples, mean, spread)'
    required_keys = ('lr_encoder.conv_first.weight', )
    assumed = {'temperature': 0.8, 'mixture_sampling': 'element'}  # sampling settings: no trace in the weights
    refused = ((('save_branches', 'save_weights', 'reference', 'outscale'),
                'SDFlow writes samples: drop --save-branches / --save-weights / --reference / --outscale '
                '(--samples N writes N samples with their mean and spread)'), )
    extra_outputs = ('samples', 'mean', 'spread', 'downscaled')
    deployable = True
    channels_last = False  # its flows reshape (squeeze) every step: NCHW is what they were measured in

    def read_options(self, state):
        from d2c_arch import infer_sdflow_options
        return infer_sdflow_options(state)

    def describe(self, net, args):
        temperature = net.temperature if args.temperature is None else args.temperature
        task = 'downscaling HR photos' if args.downscale else 'SR'
        return (f'SDFlow x4, {task}, {args.samples} sample(s) at temperature {temperature} (seed {args.seed})')

    def process_image(self, path, net, options, device, forward, prog):
        from .sdflow_infer_util import process_sdflow_image
        return process_sdflow_image(path, net, options, device, forward, prog)

    def export_graphs(self, net, outputs='fused'):
        from .export_graphs import sdflow_graphs
        return sdflow_graphs(net)


class PlainSRMethod(Method):
    """A single-output SR network of the paper's Table 3 that BasicSR lacks (VDSR, RDN, IMDN), run as it is.

    Recognised by ``network_g.type`` only: their weights are plain conv stacks that other networks share
    (VDSR's are only ``body.*``), and they do not tell the scale (VDSR interpolates first; RDN's and
    IMDN's upsamplers are the same at several scales), so ``--opt`` is always required.
    """
    runs_without_options = False
    refused = (SDFLOW_ONLY, (('save_branches', 'save_weights'),
                             'it has no branches or weight maps: drop --save-branches / --save-weights'))
    extra_outputs = ('metrics', )

    def __init__(self, name, summary):
        self.name, self.summary = name, summary

    def detect(self, state):
        return False

    def read_options(self, state):
        raise ValueError(f'the weights of a {self.name} do not tell its options (scale included); pass --opt '
                         '<the training option file>')

    def prepare(self, net, args, warn):
        from .infer_util import SingleOutputNetwork
        return SingleOutputNetwork(super().prepare(net, args, warn))

    def process_image(self, path, net, options, device, forward, prog):
        from .infer_util import process_image
        return process_image(path, net, options, device, forward, prog, per_image=lambda net, *unused: (net, None))


# detection order: the strictest test first (D2CNet's: every key in one of its parts); the Table 3 originals
# are known by their option files' type only
METHODS = (D2CNetMethod(), DANMethod(), SDFlowMethod(), PlainSRMethod('VDSR', 'VDSR (Table 3 original)'),
           PlainSRMethod('RDN', 'RDN (Table 3 original)'), PlainSRMethod('IMDN', 'IMDN (Table 3 original)'))


def method_named(name, source=None):
    """The entry of ``network_g.type`` ``name``; UserError naming ``source`` and the known methods otherwise."""
    for method in METHODS:
        if method.name == name:
            return method
    where = f'{source}: ' if source else ''
    raise UserError(f'{where}network_g type is {name!r}; d2c-sr runs {", ".join(m.name for m in METHODS)} models '
                    '(for other BasicSR networks use BasicSR\'s own test script)')


def detect_method(state):
    """The entry whose :meth:`Method.detect` accepts ``state``, or None."""
    return next((method for method in METHODS if method.detect(state)), None)


def method_of_options(net_opt, source):
    """The entry for a ``network_g`` dict (``type`` defaults to D2CNet, as in every option file of this project)."""
    return method_named(net_opt.get('type', 'D2CNet'), source)
