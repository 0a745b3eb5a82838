#!/usr/bin/env python
"""Prepare paired real-world super-resolution data sets for BasicSR / D2C-SR.

The tool pairs the HR and LR images of a real-world SR data set (RealSR V3,
DRealSR, D2CRealSR, or any two folders) or of KernelGAN's DIV2KRK, checks every
pair, and writes::

    <output>/<split>/HR/<key>.png           full-size HR (cropped to LR x scale if --allow-crop)
    <output>/<split>/LR/<key>.png           full-size LR, same file names as in HR/
    <output>/train/HR_sub/<key>_s001.png    HR sub-images                 (--crop-size)
    <output>/train/LR_sub/<key>_s001.png    matching LR sub-images        (--crop-size)
    <output>/<split>/HR.lmdb, LR.lmdb       BasicSR LMDBs                 (--lmdb)
    <output>/test/kernels/<key>.npy         DIV2KRK's blur kernels        (--preset div2krk)

``<split>`` is ``train`` and/or ``test``. With ``--crop-size`` the train LMDBs
hold the sub-images, otherwise the full-size images; the test split is never
cropped. The LMDBs are made by BasicSR's own ``make_lmdb_from_imgs``, with one
key list shared by HR and LR, so BasicSR's ``PairedImageDataset`` reads them
with ``io_backend: {type: lmdb}``.

DIV2KRK (``--preset div2krk``, KernelGAN's ``DIV2KRK_public``: ``gt/img_<n>_gt.png``,
``lr_x2/`` and ``lr_x4/im_<n>.png``, ``gt_k_x2/`` and ``gt_k_x4/kernel_<n>.mat``) is a test
split keyed ``<n>``: its LR PNGs are RGBA with an opaque alpha channel, which is dropped
(``--drop-alpha``, on for this preset), and every ``kernel_<n>.mat`` (MATLAB 5, variable
``Kernel``, read with scipy) is checked and written as ``kernels/<n>.npy`` (float32, normalised
to sum 1), which DANModel reads as ``dataroot_kernel`` to report the kernel error.

Bad data is reported file by file (missing partner, LR x scale not matching HR,
unreadable or truncated images, 8/16-bit or gray/RGB/RGBA mixed within a pair
or across the set). Without ``--skip-bad`` any such problem aborts the run with
exit code 1 before anything is written; with it the good pairs are written and
the exit code is 0. Usage errors exit with 2.

Output is written to a sibling temporary folder ``<output>.tmp-<pid>`` and moved
into place only when complete, so an interrupted run never leaves output that
looks finished, and an existing split folder is replaced (``--overwrite``) only
after its replacement is complete.

Examples::

    python scripts/prepare_data.py --preset realsr --input 'datasets/RealSR(V3)' \\
        --output datasets/RealSR_x4 --scale 4 --crop-size 384 --step 192 --lmdb
    python scripts/prepare_data.py --preset generic --split test \\
        --hr-dir my/HR --lr-dir my/LR --lr-pattern '{key}_LR{scale}.png' \\
        --output datasets/mine_x4 --scale 4
    python scripts/prepare_data.py --preset div2krk --input datasets/DIV2KRK_public \\
        --output datasets/DIV2KRK_x4 --scale 4
"""
import argparse
import collections
import os
import os.path as osp
import re
import shutil
import signal
import string
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import cv2
import numpy as np
from tqdm import tqdm

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run from a checkout too
from d2c_utils.errors import ImageError, UserError  # noqa: E402  (light: no basicsr, no torch)
from d2c_utils.img_util import read_image  # noqa: E402

SPLITS = ('train', 'test')
IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
# BasicSR's create_lmdb.py stores PNGs at compression level 1 (fast to decode).
LMDB_COMPRESS_LEVEL = 1
CHANNEL_NAMES = {1: 'gray', 2: 'gray+alpha', 3: 'RGB', 4: 'RGBA'}
# Named regex groups that make up the pairing key: key, key1, key2, ...
KEY_GROUP = re.compile(r'key\d*')
# LMDB keys are ASCII and BasicSR's paired_paths_from_lmdb() cuts meta_info
# names at the first '.', so keys may not contain dots or whitespace either.
VALID_KEY = re.compile(r'[!-~]+')

# Per preset: accepted scales, default scale and default HR/LR name templates.
PRESETS = {
    'realsr': dict(scales=(2, 3, 4), default_scale=None, hr='{key}_HR.png', lr='{key}_LR{scale}.png'),
    'drealsr': dict(scales=(2, 3, 4), default_scale=None, hr='{key}_x1.png', lr='{key}_x{scale}.png'),
    'd2crealsr': dict(scales=(8, ), default_scale=8, hr='{key}.png', lr='{key}.png'),
    'generic': dict(scales=None, default_scale=None, hr='{key}.{ext}', lr='{key}.{ext}'),
    'div2krk': dict(scales=(2, 4), default_scale=None, hr='img_{key}_gt.png', lr='im_{key}.png'),
}
# DIV2KRK's kernels: <input>/gt_k_x<scale>/kernel_<key>.mat holding the variable Kernel
DIV2KRK_KERNEL = ('gt_k_x{scale}', 'kernel_{key}.mat', 'Kernel')


class Interrupted(Exception):
    """Raised by the SIGTERM/SIGHUP handler so that clean-up code runs."""

    def __init__(self, signum):
        super().__init__(f'signal {signum}')
        self.signum = signum


@dataclass
class ImageInfo:
    """Shape and sample format of one decoded image."""
    h: int
    w: int
    channels: int
    depth: int

    @classmethod
    def from_array(cls, img):
        channels = 1 if img.ndim == 2 else img.shape[2]
        return cls(img.shape[0], img.shape[1], channels, 16 if img.dtype == np.uint16 else 8)

    @property
    def fmt(self):
        return f'{self.depth}-bit {CHANNEL_NAMES.get(self.channels, f"{self.channels}-channel")}'

    @property
    def size(self):
        return f'{self.w}x{self.h}'


@dataclass
class Pair:
    """One HR/LR pair; ``lr_size`` is the LR (h, w) after alignment."""
    split: str
    key: str
    hr_path: str
    lr_path: str
    hr: ImageInfo = None
    lr: ImageInfo = None
    lr_size: tuple = None
    sub_keys: list = field(default_factory=list)
    kernel_path: str = None  # DIV2KRK: its blur kernel (.mat)
    kernel: np.ndarray = None  # ... as read and checked
    alpha_dropped: set = field(default_factory=set)  # roles ('HR', 'LR') whose opaque alpha is dropped


@dataclass
class Problem:
    """Why a file or pair was skipped. ``kind`` is the short reason used in the summary."""
    split: str
    paths: list
    kind: str
    detail: str


@dataclass
class Plan:
    """Everything the run needs, resolved and validated from the command line."""
    splits: list  # [(split, [(hr_dir, lr_dir), ...])]
    scale: int
    hr_regex: re.Pattern
    lr_regex: re.Pattern
    hr_desc: str
    lr_desc: str
    crop: tuple  # (crop_size, step, thresh_size) or None
    output: str
    base: str  # paths in messages are shown relative to this folder
    kernel_dir: str = None  # DIV2KRK: folder of kernel_<key>.mat
    drop_alpha: bool = False


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------
EPILOG = """\
input layouts (--input is the root):
  realsr     <root>/{Canon,Nikon}/{Train,Test}/<scale>/<Cam>_<NNN>_HR.png and <Cam>_<NNN>_LR<scale>.png
  drealsr    <root>/x<scale>/Train_x<scale>/{train_HR,train_LR}, <root>/x<scale>/Test_x<scale>/{test_HR,test_LR}
             with <name>_x1.png (HR) and <name>_x<scale>.png (LR); <root> may also be the x<scale> folder
  d2crealsr  <root>/{train,test}/{HR,LR} with the same file names in HR and LR (x8)
  generic    --hr-dir and --lr-dir, one --split per call
  div2krk    <root>/gt/img_<n>_gt.png, <root>/lr_x<scale>/im_<n>.png (RGBA), <root>/gt_k_x<scale>/kernel_<n>.mat
             (KernelGAN's DIV2KRK; x2, x4; test split only; kernels written to <output>/test/kernels/<n>.npy)

name templates take {key} (alias {stem}), {scale} and {ext}; regexes need a named group (?P<key>...).
output: <output>/<split>/{HR,LR}[, HR_sub, LR_sub (train, --crop-size)][, HR.lmdb, LR.lmdb (--lmdb)][, kernels]
exit codes: 0 ok, 1 bad data without --skip-bad (nothing written) or failure, 2 usage error,
            130/143 interrupted (nothing written)
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the epilog's line breaks and show defaults only where there is one."""

    def _get_help_string(self, action):
        text = action.help or ''
        if action.default not in (None, False, argparse.SUPPRESS) and '%(default)' not in text:
            text += ' (default: %(default)s)'
        return text


def build_parser():
    parser = argparse.ArgumentParser(
        prog='prepare_data.py',
        description=('Pair, check and convert real-world SR data (RealSR V3, DRealSR, D2CRealSR or any HR/LR '
                     'folders) into BasicSR folders, sub-images and LMDBs.'),
        epilog=EPILOG,
        formatter_class=_HelpFormatter)
    src = parser.add_argument_group('input')
    src.add_argument('--preset', choices=sorted(PRESETS), default='generic', help='input layout')
    src.add_argument('--input', help='data set root (presets realsr, drealsr, d2crealsr, div2krk)')
    src.add_argument('--hr-dir', help='HR folder (preset generic)')
    src.add_argument('--lr-dir', help='LR folder (preset generic)')
    src.add_argument(
        '--split',
        choices=('train', 'test', 'all'),
        help='split(s) to prepare; default: all for presets, train for generic (which takes one split per call)')
    src.add_argument(
        '--scale',
        type=int,
        help='SR scale (LR is smaller than HR by this factor); required '
        'except for d2crealsr (8)')
    pair = parser.add_argument_group('pairing (override the preset\'s file names)')
    pair.add_argument('--hr-pattern', help="HR file name template, e.g. '{key}_HR.png'")
    pair.add_argument('--lr-pattern', help="LR file name template, e.g. '{stem}_LR{scale}.png'")
    pair.add_argument(
        '--hr-regex', help='HR file name regex (full match); named group(s) key, key1, ... '
        'form the pairing key')
    pair.add_argument('--lr-regex', help='LR file name regex, as --hr-regex')
    pair.add_argument('--regex', help='one regex for both HR and LR file names')
    chk = parser.add_argument_group('checks')
    chk.add_argument(
        '--allow-crop',
        type=int,
        default=0,
        metavar='N',
        help='accept LR x scale differing from HR by up to N HR pixels; both are then cropped '
        'top-left aligned to the common size (HR = LR x scale)')
    chk.add_argument(
        '--drop-alpha',
        action='store_true',
        help='drop the alpha channel of RGBA (gray+alpha) images when it is fully opaque, e.g. DIV2KRK\'s LR PNGs '
        '(on for --preset div2krk); images with transparent pixels are reported')
    chk.add_argument(
        '--skip-bad', action='store_true', help='write the good pairs and exit 0 even if some were skipped')
    chk.add_argument('--dry-run', action='store_true', help='check and report only; write nothing')
    out = parser.add_argument_group('output')
    out.add_argument('--output', required=True, help='output root; <output>/<split>/... is written')
    out.add_argument(
        '--overwrite',
        action='store_true',
        help='replace existing <output>/<split> folders (only after the new ones are complete)')
    out.add_argument(
        '--crop-size',
        type=int,
        help='extract HR sub-images of this size (HR px) for the train split; '
        'LR sub-images are crop-size/scale at position/scale')
    out.add_argument('--step', type=int, help='sub-image stride in HR px (default: crop-size/2, a multiple of scale)')
    out.add_argument(
        '--thresh-size',
        type=int,
        default=0,
        help='keep an extra border-aligned sub-image when the leftover strip is wider than this '
        '(BasicSR extract_subimages.py semantics)')
    out.add_argument('--lmdb', action='store_true', help='also write <split>/HR.lmdb and <split>/LR.lmdb')
    out.add_argument(
        '--compress-level',
        type=int,
        default=3,
        choices=range(10),
        metavar='0-9',
        help='PNG compression of written images (LMDBs always use 1, as BasicSR)')
    out.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1), help='threads for decoding/encoding')
    return parser


def _compile_template(template, scale, option):
    """Turn a name template such as '{key}_LR{scale}.png' into a full-match regex."""
    parts, seen = [], set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise UserError(f'{option} {template!r}: {err}')
    for literal, name, spec, conv in parsed:
        parts.append(re.escape(literal))
        if name is None:
            continue
        if spec or conv:
            raise UserError(f'{option} {template!r}: format specs are not supported in {{{name}}}')
        if name in ('key', 'stem'):
            if 'key' in seen:
                raise UserError(f'{option} {template!r}: {{key}}/{{stem}} may appear only once')
            parts.append('(?P<key>.+)')
            seen.add('key')
        elif name == 'scale':
            parts.append(re.escape(str(scale)))
        elif name == 'ext':
            if 'ext' in seen:
                raise UserError(f'{option} {template!r}: {{ext}} may appear only once')
            parts.append('(?P<ext>[A-Za-z0-9]+)')
            seen.add('ext')
        else:
            raise UserError(f'{option} {template!r}: unknown placeholder {{{name}}}; use {{key}} (or {{stem}}), '
                            '{scale}, {ext}')
    if 'key' not in seen:
        raise UserError(f'{option} {template!r} must contain {{key}} (or {{stem}}) to pair HR with LR files')
    return re.compile(''.join(parts))


def _compile_regex(regex, option):
    try:
        compiled = re.compile(regex)
    except re.error as err:
        raise UserError(f'{option} {regex!r} is not a valid regular expression: {err}')
    if not any(KEY_GROUP.fullmatch(name) for name in compiled.groupindex):
        raise UserError(f'{option} {regex!r} needs a named group (?P<key>...) that pairs HR with LR files')
    return compiled


def match_key(regex, name):
    """Return the pairing key of file ``name`` under ``regex``, or None if it does not match.

    The key joins the named groups key, key1, key2, ... in the order they appear in the name,
    so that names like ``A_x1_3.png`` / ``A_x4_3.png`` can be paired with two groups.
    """
    match = regex.fullmatch(name)
    if match is None:
        return None
    groups = [g for g in regex.groupindex if KEY_GROUP.fullmatch(g) and match.group(g) is not None]
    groups.sort(key=match.start)
    return '_'.join(match.group(g) for g in groups)


def _require_dir(path, what):
    if not osp.isdir(path):
        raise UserError(f'{path} is not a folder ({what}); check --input/--scale or the layout in --help')


def _preset_dirs(preset, root, split, scale):
    """Return [(hr_dir, lr_dir), ...] of ``split`` for a preset layout."""
    if preset == 'realsr':
        cams = [cam for cam in ('Canon', 'Nikon') if osp.isdir(osp.join(root, cam))]
        if not cams:
            raise UserError(f'--input {root} has neither Canon/ nor Nikon/; expected the RealSR(V3) root, '
                            f'e.g. <root>/Canon/Train/{scale}/Canon_001_HR.png')
        dirs = []
        for cam in cams:
            folder = osp.join(root, cam, split.capitalize(), str(scale))
            if not osp.isdir(folder):
                parent = osp.dirname(folder)
                found = sorted(os.listdir(parent)) if osp.isdir(parent) else []
                raise UserError(f'{folder} is missing (RealSR V3 layout <root>/{cam}/{split.capitalize()}/<scale>); '
                                f'scale folders there: {", ".join(found) or "none"}; check --input and --scale')
            dirs.append((folder, folder))
        return dirs
    if preset == 'drealsr':
        base = osp.join(root, f'x{scale}')
        if not osp.isdir(base) and osp.isdir(osp.join(root, f'{split.capitalize()}_x{scale}')):
            base = root  # --input already points at the x<scale> folder
        split_dir = osp.join(base, f'{split.capitalize()}_x{scale}')
        hr_dir, lr_dir = osp.join(split_dir, f'{split}_HR'), osp.join(split_dir, f'{split}_LR')
        _require_dir(hr_dir, f'DRealSR {split} HR')
        _require_dir(lr_dir, f'DRealSR {split} LR')
        return [(hr_dir, lr_dir)]
    if preset == 'd2crealsr':
        hr_dir, lr_dir = osp.join(root, split, 'HR'), osp.join(root, split, 'LR')
        _require_dir(hr_dir, f'D2CRealSR {split} HR')
        _require_dir(lr_dir, f'D2CRealSR {split} LR')
        return [(hr_dir, lr_dir)]
    if preset == 'div2krk':
        hr_dir, lr_dir = osp.join(root, 'gt'), osp.join(root, f'lr_x{scale}')
        _require_dir(hr_dir, 'DIV2KRK gt/ (img_<n>_gt.png)')
        _require_dir(lr_dir, f'DIV2KRK lr_x{scale}/ (im_<n>.png)')
        return [(hr_dir, lr_dir)]
    raise AssertionError(preset)


def make_plan(args):
    """Validate the options and resolve folders and name patterns; raise UserError."""
    preset = PRESETS[args.preset]
    # scale
    scale = args.scale if args.scale is not None else preset['default_scale']
    if scale is None:
        raise UserError(f'--scale is required for preset {args.preset}')
    if scale < 1:
        raise UserError(f'--scale {scale} must be a positive integer')
    if preset['scales'] and scale not in preset['scales']:
        raise UserError(f'--scale {scale} is not available for preset {args.preset} (choose from '
                        f'{", ".join(map(str, preset["scales"]))}); use --preset generic for other data')
    # splits and folders
    if args.preset == 'generic':
        if args.input:
            raise UserError('--input is for the presets; with --preset generic give --hr-dir and --lr-dir')
        if not args.hr_dir or not args.lr_dir:
            raise UserError('--preset generic needs both --hr-dir and --lr-dir')
        if args.split == 'all':
            raise UserError('--preset generic prepares one split per call: use --split train or --split test')
        for opt, path in (('--hr-dir', args.hr_dir), ('--lr-dir', args.lr_dir)):
            if not osp.isdir(path):
                raise UserError(f'{opt} {path} is not a folder')
        splits = [(args.split or 'train', [(osp.abspath(args.hr_dir), osp.abspath(args.lr_dir))])]
        base = osp.commonpath([osp.abspath(args.hr_dir), osp.abspath(args.lr_dir)])
    else:
        if args.hr_dir or args.lr_dir:
            raise UserError(f'--hr-dir/--lr-dir are for --preset generic; preset {args.preset} reads --input')
        if not args.input:
            raise UserError(f'--input is required for preset {args.preset}')
        if not osp.isdir(args.input):
            raise UserError(f'--input {args.input} is not a folder')
        root = osp.abspath(args.input)
        names = SPLITS if args.split in (None, 'all') else (args.split, )
        if args.preset == 'div2krk':
            if args.split == 'train':
                raise UserError('--preset div2krk: DIV2KRK is a test set; use --split test (the default)')
            names = ('test', )
        splits = [(split, _preset_dirs(args.preset, root, split, scale)) for split in names]
        base = root
    kernel_dir = None
    if args.preset == 'div2krk':
        kernel_dir = osp.join(base, DIV2KRK_KERNEL[0].format(scale=scale))
        _require_dir(kernel_dir, f'DIV2KRK kernels {DIV2KRK_KERNEL[1]}')
    # pairing patterns
    if args.regex and (args.hr_regex or args.lr_regex):
        raise UserError('--regex sets both sides; do not combine it with --hr-regex/--lr-regex')
    regexes = {}
    for side in ('hr', 'lr'):
        regex = args.regex or getattr(args, f'{side}_regex')
        template = getattr(args, f'{side}_pattern')
        if regex and template:
            raise UserError(f'give either --{side}-pattern or a regex for the {side.upper()} names, not both')
        if regex:
            regexes[side] = (_compile_regex(regex, f'--{side}-regex'), f'regex {regex!r}')
        else:
            template = template or preset[side]
            regexes[side] = (_compile_template(template, scale, f'--{side}-pattern'), f'{template!r}')
    # sub-images
    crop = None
    if args.crop_size is None:
        if args.step is not None or args.thresh_size:
            raise UserError('--step/--thresh-size need --crop-size')
    else:
        if not any(split == 'train' for split, _ in splits):
            raise UserError('--crop-size applies to the train split only (the test split is never cropped)')
        if args.crop_size <= 0 or args.crop_size % scale:
            raise UserError(f'--crop-size {args.crop_size} must be a positive multiple of --scale {scale} so that '
                            'the LR sub-image is crop-size/scale pixels')
        step = args.step if args.step is not None else max(scale, args.crop_size // 2 // scale * scale)
        if step <= 0 or step % scale:
            raise UserError(f'--step {step} must be a positive multiple of --scale {scale} so that LR positions '
                            'are whole pixels')
        if args.thresh_size < 0:
            raise UserError(f'--thresh-size {args.thresh_size} must be >= 0')
        crop = (args.crop_size, step, args.thresh_size)
    if args.allow_crop < 0:
        raise UserError(f'--allow-crop {args.allow_crop} must be >= 0')
    if args.workers < 1:
        raise UserError(f'--workers {args.workers} must be >= 1')
    # output
    output = osp.abspath(args.output)
    if osp.lexists(output) and not osp.isdir(output):
        raise UserError(f'--output {output} exists and is not a folder')
    for split, dir_pairs in splits:
        target = osp.join(output, split)
        for hr_dir, lr_dir in dir_pairs:
            for folder in (hr_dir, lr_dir):
                # --overwrite would move the input away together with the old output
                if osp.commonpath([folder, target]) == target:
                    raise UserError(f'input folder {folder} lies inside the output {target}; choose another --output')
    if not args.overwrite and not args.dry_run:
        for split, _ in splits:
            target = osp.join(output, split)
            if osp.lexists(target):
                raise UserError(f'{target} already exists; pass --overwrite to replace it (the old folder is '
                                'replaced only after the new one is complete) or choose another --output')
    return Plan(
        splits=splits,
        scale=scale,
        hr_regex=regexes['hr'][0],
        lr_regex=regexes['lr'][0],
        hr_desc=regexes['hr'][1],
        lr_desc=regexes['lr'][1],
        crop=crop,
        output=output,
        base=base,
        kernel_dir=kernel_dir,
        drop_alpha=args.drop_alpha or args.preset == 'div2krk')


# ----------------------------------------------------------------------------
# Pairing and checks
# ----------------------------------------------------------------------------
def collect_pairs(split, dir_pairs, plan):
    """Scan the folders of one split and pair HR with LR files by key.

    Returns:
        list[Pair]: pairs sorted by key (not yet decoded).
        list[Problem]: unpaired, unrecognised, duplicated or badly named files.
    """
    roles = collections.OrderedDict()  # folder -> {'HR', 'LR'}; RealSR keeps both in one folder
    for hr_dir, lr_dir in dir_pairs:
        roles.setdefault(hr_dir, set()).add('HR')
        roles.setdefault(lr_dir, set()).add('LR')
    found = {'HR': collections.defaultdict(list), 'LR': collections.defaultdict(list)}
    problems = []
    for folder, folder_roles in roles.items():
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries if e.is_file() and not e.name.startswith('.'))
        for name in names:
            if not name.lower().endswith(IMG_EXTENSIONS):
                continue  # README.txt, Thumbs.db, ...: not data
            path = osp.join(folder, name)
            hits = []
            if 'HR' in folder_roles:
                key = match_key(plan.hr_regex, name)
                if key is not None:
                    hits.append(('HR', key))
            if 'LR' in folder_roles:
                key = match_key(plan.lr_regex, name)
                if key is not None:
                    hits.append(('LR', key))
            if not hits:
                expected = ' or '.join(f'{role} {plan.hr_desc if role == "HR" else plan.lr_desc}'
                                       for role in sorted(folder_roles))
                problems.append(
                    Problem(
                        split, [path], 'unrecognised name',
                        f'matches neither pattern (expected {expected}); fix the name or the '
                        '--hr-pattern/--lr-pattern/--regex options'))
            elif len(hits) > 1:
                problems.append(
                    Problem(split, [path], 'ambiguous name',
                            'matches both the HR and the LR pattern; make the patterns distinct'))
            else:
                role, key = hits[0]
                found[role][key].append(path)

    pairs = []
    for key in sorted(set(found['HR']) | set(found['LR'])):
        hr_paths, lr_paths = found['HR'].get(key, []), found['LR'].get(key, [])
        if len(hr_paths) > 1 or len(lr_paths) > 1:
            problems.append(
                Problem(split, hr_paths + lr_paths, 'duplicate key',
                        f'several files map to key {key!r}; keep one of them'))
        elif not lr_paths:
            problems.append(
                Problem(split, hr_paths, 'no LR partner',
                        f'no LR file {plan.lr_desc} with key {key!r} (x{plan.scale})'))
        elif not hr_paths:
            problems.append(Problem(split, lr_paths, 'no HR partner', f'no HR file {plan.hr_desc} with key {key!r}'))
        elif not VALID_KEY.fullmatch(key) or '.' in key or len(key) > 400:
            problems.append(
                Problem(
                    split, hr_paths + lr_paths, 'bad key',
                    f'key {key!r} must be printable ASCII without spaces or dots (BasicSR LMDB '
                    'keys are ASCII and its meta_info reader cuts names at the first dot); rename '
                    'the files'))
        else:
            pairs.append(Pair(split, key, hr_paths[0], lr_paths[0]))
    return pairs, problems


def align_sizes(hr, lr, scale, allow_crop):
    """Return ((lr_h, lr_w), None) for a usable pair or (None, detail) if the sizes do not fit.

    HR must be LR x scale. Within ``allow_crop`` HR pixels both are cropped (top-left aligned) to
    the largest LR size that fits both: lr = min(lr, hr // scale), hr = lr * scale.
    """
    dh, dw = hr.h - lr.h * scale, hr.w - lr.w * scale
    if dh == 0 and dw == 0:
        return (lr.h, lr.w), None
    if max(abs(dh), abs(dw)) <= allow_crop:
        lr_h, lr_w = min(lr.h, hr.h // scale), min(lr.w, hr.w // scale)
        if lr_h > 0 and lr_w > 0:
            return (lr_h, lr_w), None
    detail = (f'LR {lr.size} x{scale} = {lr.w * scale}x{lr.h * scale} does not match HR {hr.size} (WxH; off by '
              f'{dw},{dh} HR px, --allow-crop {allow_crop})')
    if (hr.h, hr.w) == (lr.h, lr.w):
        detail += ('; LR has the same size as HR: pre-upsampled LR (e.g. RealSR V1/V2) is not supported, '
                   'use RealSR(V3) or downscaled LR')
    elif hr.h % lr.h == 0 and hr.w % lr.w == 0 and hr.h // lr.h == hr.w // lr.w:
        detail += f'; the sizes fit --scale {hr.h // lr.h}: wrong --scale or wrong folder?'
    else:
        detail += f'; if the pair is otherwise aligned, --allow-crop {max(abs(dh), abs(dw))} crops it to fit'
    return None, detail


def read_kernel_mat(path, variable=DIV2KRK_KERNEL[2]):
    """A blur kernel from a MATLAB file (DIV2KRK's ``kernel_<n>.mat``): (l, l) float32, normalised to sum 1.

    Raises:
        ImageError: unreadable file (kind 'unreadable'), no such variable, not a square kernel of odd
            side, non-finite taps or a sum that is not positive (kind 'bad kernel').
    """
    from scipy.io import loadmat  # only DIV2KRK needs scipy (installed with basicsr)
    try:
        data = loadmat(path)
    except Exception as err:  # scipy raises ValueError, TypeError, MatReadError, ... for damaged files
        raise ImageError(f'not a MATLAB file scipy can read ({type(err).__name__}: {err})') from None
    if variable not in data:
        names = sorted(k for k in data if not k.startswith('__'))
        raise ImageError(f'no variable {variable!r} (it holds {", ".join(names) or "nothing"})', 'bad kernel')
    kernel = np.asarray(data[variable], dtype=np.float64)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 != 1:
        raise ImageError(f'{variable} has shape {kernel.shape}; a blur kernel is square with an odd side', 'bad kernel')
    total = kernel.sum()
    if not np.isfinite(kernel).all() or total <= 0:
        raise ImageError(
            f'{variable} has non-finite taps or sums to {total:g}; expected non-negative taps summing '
            'to 1', 'bad kernel')
    return (kernel / total).astype(np.float32)


def _opaque(img):
    """True if ``img`` (H, W, 4) has its alpha channel at the maximum everywhere."""
    return bool((img[..., 3] == np.iinfo(img.dtype).max).all())


def inspect_pair(pair, scale, allow_crop, crop, drop_alpha=False):
    """Decode both images of ``pair`` and check them (and its kernel); fill pair.hr/lr/lr_size. Return Problems.

    With ``drop_alpha`` an RGBA image whose alpha is fully opaque counts as RGB (``write_pair``
    drops the channel); one with transparent pixels is a problem.
    """
    problems, infos = [], {}
    for role, path in (('HR', pair.hr_path), ('LR', pair.lr_path)):
        try:
            img = read_image(path)
        except ImageError as err:
            problems.append(Problem(pair.split, [path], err.kind, f'{role}: {err}'))
            continue
        if drop_alpha and img.ndim == 3 and img.shape[2] == 4:
            if not _opaque(img):
                problems.append(
                    Problem(
                        pair.split, [path], 'transparent alpha',
                        f'{role}: --drop-alpha drops only fully opaque alpha channels; this one has '
                        'transparent pixels: flatten the image yourself'))
                continue
            img = img[..., :3]
            pair.alpha_dropped.add(role)
        infos[role] = ImageInfo.from_array(img)
    if pair.kernel_path:
        if not osp.isfile(pair.kernel_path):
            problems.append(Problem(pair.split, [pair.kernel_path], 'no kernel', 'kernel file missing'))
        else:
            try:
                pair.kernel = read_kernel_mat(pair.kernel_path)
            except ImageError as err:
                problems.append(Problem(pair.split, [pair.kernel_path], err.kind, f'kernel: {err}'))
    if problems:
        return problems
    pair.hr, pair.lr = infos['HR'], infos['LR']
    both = [pair.hr_path, pair.lr_path]
    if pair.hr.fmt != pair.lr.fmt:
        return [
            Problem(pair.split, both, 'format mismatch in pair',
                    f'HR is {pair.hr.fmt} but LR is {pair.lr.fmt}; convert them to the same bit depth and '
                    'channels')
        ]
    pair.lr_size, detail = align_sizes(pair.hr, pair.lr, scale, allow_crop)
    if detail:
        return [Problem(pair.split, both, 'size mismatch', detail)]
    if crop and pair.split == 'train':
        crop_size = crop[0]
        hr_h, hr_w = pair.lr_size[0] * scale, pair.lr_size[1] * scale
        if hr_h < crop_size or hr_w < crop_size:
            return [
                Problem(pair.split, both, 'smaller than crop',
                        f'HR {hr_w}x{hr_h} is smaller than --crop-size {crop_size}; no sub-image fits')
            ]
    return []


def check_set_formats(pairs):
    """Split checked pairs into those in the most common format of the whole run and the others.

    BasicSR decodes every image to 8-bit BGR, so a 16-bit or gray pair in an 8-bit RGB set is
    silently converted; a mixed set is almost always a preparation mistake.

    Returns:
        list[Pair]: pairs in the majority format.
        list[Problem]: one per pair in another format.
    """
    counts = collections.Counter(p.hr.fmt for p in pairs)
    if len(counts) <= 1:
        return pairs, []
    (major, n_major), = counts.most_common(1)
    seen = ', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))
    problems = [
        Problem(
            p.split, [p.hr_path, p.lr_path], 'format differs from set',
            f'pair is {p.hr.fmt} while {n_major} of {len(pairs)} pairs are {major} (pairs per format: {seen}); '
            f'convert it to {major}') for p in pairs if p.hr.fmt != major
    ]
    return [p for p in pairs if p.hr.fmt == major], problems


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------
def crop_positions(length, crop_size, step, thresh_size):
    """Top-left positions of sliding-window crops, as BasicSR's extract_subimages.py."""
    if length < crop_size:
        return []
    positions = list(range(0, length - crop_size + 1, step))
    if length - (positions[-1] + crop_size) > thresh_size:
        positions.append(length - crop_size)
    return positions


def _write_png(path, img, compress_level):
    ok, buf = cv2.imencode('.png', np.ascontiguousarray(img), [cv2.IMWRITE_PNG_COMPRESSION, compress_level])
    if not ok:
        raise RuntimeError(f'OpenCV could not encode {path}')
    with open(path, 'wb') as fout:
        fout.write(buf.tobytes())


def _load_checked(path):
    try:
        return read_image(path)
    except ImageError as err:  # it was fine a moment ago, so it changed under us
        raise RuntimeError(f'{path} became unusable while preparing ({err}); rerun') from None


def write_pair(pair, split_dir, scale, crop, compress_level):
    """Write one checked pair (full size, aligned) and its sub-images into ``split_dir``.

    Returns:
        list[str]: keys of the written sub-images (empty without cropping).
    """
    lr_h, lr_w = pair.lr_size
    targets = (('HR', pair.hr_path, pair.hr, lr_h * scale, lr_w * scale), ('LR', pair.lr_path, pair.lr, lr_h, lr_w))
    do_crop = crop is not None and pair.split == 'train'
    arrays = {}
    for role, src, info, h, w in targets:
        dst = osp.join(split_dir, role, f'{pair.key}.png')
        as_is = (info.h, info.w) == (h, w) and src.lower().endswith('.png') and role not in pair.alpha_dropped
        if as_is and not do_crop:
            shutil.copyfile(src, dst)  # bit-exact and much faster than decode + encode
            continue
        img = _load_checked(src)[:h, :w]
        if role in pair.alpha_dropped:
            img = img[..., :3]
        arrays[role] = img
        if as_is:
            shutil.copyfile(src, dst)
        else:
            _write_png(dst, img, compress_level)
    if pair.kernel is not None:
        np.save(osp.join(split_dir, 'kernels', f'{pair.key}.npy'), pair.kernel)
    if not do_crop:
        return []
    crop_size, step, thresh_size = crop
    sub_keys = []
    index = 0
    for y in crop_positions(lr_h * scale, crop_size, step, thresh_size):
        for x in crop_positions(lr_w * scale, crop_size, step, thresh_size):
            index += 1
            sub_key = f'{pair.key}_s{index:03d}'
            _write_png(
                osp.join(split_dir, 'HR_sub', f'{sub_key}.png'), arrays['HR'][y:y + crop_size, x:x + crop_size],
                compress_level)
            ly, lx, lc = y // scale, x // scale, crop_size // scale
            _write_png(
                osp.join(split_dir, 'LR_sub', f'{sub_key}.png'), arrays['LR'][ly:ly + lc, lx:lx + lc], compress_level)
            sub_keys.append(sub_key)
    return sub_keys


def run_parallel(fn, items, workers, desc):
    """Apply ``fn`` to ``items`` with a thread pool (OpenCV releases the GIL); keep the order."""
    results = [None] * len(items)
    with tqdm(total=len(items), desc=desc, unit='pair') as pbar:
        if workers <= 1:
            for i, item in enumerate(items):
                results[i] = fn(item)
                pbar.update(1)
            return results
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                pbar.update(1)
        finally:
            # on errors/interrupts, drop queued work and wait for running tasks, so nothing writes
            # into the temporary folder while it is being removed
            pool.shutdown(wait=True, cancel_futures=True)
    return results


def _make_lmdb_from_imgs():
    """Import BasicSR's LMDB writer lazily.

    Importing basicsr loads torch (seconds), so it is done only when --lmdb is used; d2c_compat
    must patch torchvision before basicsr is first imported.
    """
    import d2c_compat
    d2c_compat.apply()
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs
    return make_lmdb_from_imgs


def build_lmdbs(split_dir, folder_suffix, entries):
    """Write <split_dir>/HR.lmdb and LR.lmdb from <split_dir>/{HR,LR}<folder_suffix>.

    Args:
        entries (list[tuple]): (key, hr_shape, lr_shape) with shapes (h, w, c, bytes per sample).
    """
    make_lmdb_from_imgs = _make_lmdb_from_imgs()
    keys = sorted(e[0] for e in entries)
    for index, role in enumerate(('HR', 'LR')):
        # make_lmdb_from_imgs sizes the map from the first image only, which overflows when images
        # differ in size (RealSR); give it an upper bound from the raw sizes (sparse on Linux).
        raw = sum(int(np.prod(e[1 + index])) + 8192 for e in entries)
        map_size = int(raw * 1.5) + (64 << 20)
        make_lmdb_from_imgs(
            osp.join(split_dir, role + folder_suffix),
            osp.join(split_dir, f'{role}.lmdb'), [f'{k}.png' for k in keys],
            keys,
            compress_level=LMDB_COMPRESS_LEVEL,
            map_size=map_size)
    meta = []
    for role in ('HR', 'LR'):
        with open(osp.join(split_dir, f'{role}.lmdb', 'meta_info.txt')) as fin:
            meta.append([line.split(' ')[0] for line in fin])
    if meta[0] != meta[1]:
        raise RuntimeError(f'HR and LR LMDB keys differ in {split_dir}; this is a bug')


def _entry_shapes(pair, scale, crop):
    """(hr_shape, lr_shape) of the written images of ``pair``, for LMDB sizing."""
    nbytes = pair.hr.depth // 8
    if crop:
        lc = crop[0] // scale
        return (crop[0], crop[0], pair.hr.channels, nbytes), (lc, lc, pair.lr.channels, nbytes)
    lr_h, lr_w = pair.lr_size
    return (lr_h * scale, lr_w * scale, pair.hr.channels, nbytes), (lr_h, lr_w, pair.lr.channels, nbytes)


class _SignalGuard:
    """Turn SIGTERM/SIGHUP into an exception (so clean-up runs), deferrable during the final renames."""

    SIGNALS = tuple(s for s in (getattr(signal, 'SIGTERM', None), getattr(signal, 'SIGHUP', None)) if s)

    def __init__(self):
        self.old = {}
        self.deferred = None
        self.defer = False

    def _handle(self, signum, frame):
        if self.defer:
            self.deferred = signum
        else:
            raise Interrupted(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        return False


def commit(tmp_root, output, splits, guard):
    """Move the finished split folders from ``tmp_root`` into ``output``.

    If ``output`` does not exist this is one rename. Otherwise each existing split folder is moved
    aside to ``<output>.old-<pid>`` first and deleted after the new one is in place. Signals are
    deferred meanwhile so the swap is not cut in half.
    """
    guard.defer = True
    try:
        if not osp.lexists(output):
            os.rename(tmp_root, output)
            return
        trash = f'{output}.old-{os.getpid()}'
        for split in splits:
            final = osp.join(output, split)
            if osp.lexists(final):
                os.makedirs(trash, exist_ok=True)
                os.rename(final, osp.join(trash, split))
            os.rename(osp.join(tmp_root, split), final)
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(tmp_root, ignore_errors=True)
    finally:
        guard.defer = False


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def _show(path, base):
    try:
        rel = osp.relpath(path, base)
    except ValueError:  # another drive on Windows
        return path
    return path if rel.startswith('..') else rel


def print_summary(plan, pairs_by_split, problems, written, output_note):
    """Print counts per split, every skipped file with its reason, and the reasons tallied."""
    print('\n==== prepare_data summary ====')
    print(f'scale x{plan.scale}; HR names {plan.hr_desc}, LR names {plan.lr_desc}; paths relative to {plan.base}')
    for split, _ in plan.splits:
        n_bad = sum(1 for p in problems if p.split == split)
        pairs = pairs_by_split.get(split, [])
        n_sub = sum(len(p.sub_keys) for p in pairs)
        verb = 'written' if written else 'valid'
        line = f'  {split:5s}: {len(pairs)} pairs {verb}'
        if n_sub:
            line += f', {n_sub} sub-images (crop {plan.crop[0]}, step {plan.crop[1]}, thresh {plan.crop[2]})'
        print(f'{line}, {n_bad} skipped')
    if problems:
        print(f'Skipped ({len(problems)}), file by file:')
        for p in sorted(problems, key=lambda p: (SPLITS.index(p.split), p.paths)):
            names = ' + '.join(_show(path, plan.base) for path in p.paths)
            print(f'  [{p.split}] {names}: {p.kind}: {p.detail}')
        tally = collections.Counter(p.kind for p in problems)
        print('Skipped by reason: ' + ', '.join(f'{kind} {n}' for kind, n in sorted(tally.items())))
    print(output_note)


def main(argv=None):
    """Run the tool; return the exit code (usage errors raise SystemExit(2) as argparse does)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = make_plan(args)
    except UserError as err:
        parser.error(str(err))

    prefix = osp.basename(plan.output)
    stale = [n for n in _siblings(plan.output) if n.startswith((prefix + '.tmp-', prefix + '.old-'))]
    if stale:
        print(
            f'note: {", ".join(stale)} next to {plan.output}: left by an interrupted run (unfinished output or '
            'a replaced old one); delete it when no other run is active',
            file=sys.stderr)

    # 1) pair by name, 2) decode and check every pair, 3) check formats across the whole set.
    problems, pairs = [], []
    for split, dir_pairs in plan.splits:
        split_pairs, split_problems = collect_pairs(split, dir_pairs, plan)
        pairs += split_pairs
        problems += split_problems
    if plan.kernel_dir:
        for pair in pairs:
            pair.kernel_path = osp.join(plan.kernel_dir, DIV2KRK_KERNEL[1].format(key=pair.key))
    results = run_parallel(lambda p: inspect_pair(p, plan.scale, args.allow_crop, plan.crop, plan.drop_alpha), pairs,
                           args.workers, 'Check')
    good = []
    for pair, pair_problems in zip(pairs, results):
        problems += pair_problems
        if not pair_problems:
            good.append(pair)
    good, set_problems = check_set_formats(good)
    problems += set_problems
    pairs_by_split = {split: [p for p in good if p.split == split] for split, _ in plan.splits}

    empty = [split for split, _ in plan.splits if not pairs_by_split[split]]
    if args.dry_run or (problems and not args.skip_bad) or empty:
        if args.dry_run:
            note = 'Dry run: nothing was written.'
        else:
            note = f'Nothing was written; {plan.output} is untouched.'
        print_summary(plan, pairs_by_split, problems, False, note)
        if empty:
            print(
                f'error: no valid pairs in split(s) {", ".join(empty)}; check the input folders and patterns',
                file=sys.stderr)
            return 1
        if problems and not args.skip_bad:
            print(
                f'error: {len(problems)} problem(s) found (listed above). Fix or remove those files, or rerun '
                f'with --skip-bad to write the {len(good)} valid pairs.',
                file=sys.stderr)
            return 1
        return 0

    # 4) write everything into a temporary sibling folder and move it into place when complete.
    os.makedirs(osp.dirname(plan.output), exist_ok=True)
    tmp_root = f'{plan.output}.tmp-{os.getpid()}'
    if osp.lexists(tmp_root):  # left by a dead process that had our pid
        shutil.rmtree(tmp_root)
    os.mkdir(tmp_root)
    split_names = [split for split, _ in plan.splits]
    with _SignalGuard() as guard:
        try:
            for split in split_names:
                split_dir = osp.join(tmp_root, split)
                crop = plan.crop if split == 'train' else None
                folders = ('HR', 'LR', 'HR_sub', 'LR_sub') if crop else ('HR', 'LR')
                if plan.kernel_dir:
                    folders += ('kernels', )
                for folder in folders:
                    os.makedirs(osp.join(split_dir, folder))
                split_pairs = pairs_by_split[split]
                sub_lists = run_parallel(
                    lambda p, d=split_dir, c=crop: write_pair(p, d, plan.scale, c, args.compress_level),
                    split_pairs,
                    args.workers,
                    f'Write {split}')
                for pair, sub_keys in zip(split_pairs, sub_lists):
                    pair.sub_keys = sub_keys
                if args.lmdb:
                    if crop:
                        entries = [(k, *_entry_shapes(p, plan.scale, crop)) for p in split_pairs for k in p.sub_keys]
                    else:
                        entries = [(p.key, *_entry_shapes(p, plan.scale, None)) for p in split_pairs]
                    build_lmdbs(split_dir, '_sub' if crop else '', entries)
            commit(tmp_root, plan.output, split_names, guard)
        except (KeyboardInterrupt, Interrupted) as err:
            shutil.rmtree(tmp_root, ignore_errors=True)
            signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
            print(
                f'\ninterrupted ({signal.Signals(signum).name}); removed {tmp_root}; {plan.output} is untouched',
                file=sys.stderr)
            return 128 + signum
        except BaseException:
            shutil.rmtree(tmp_root, ignore_errors=True)
            print(f'\nerror while writing; removed {tmp_root}; {plan.output} is untouched', file=sys.stderr)
            raise
        if guard.deferred is not None:  # a signal arrived during the final renames: honour it now
            return 128 + guard.deferred

    layout = []
    for split in split_names:
        layout += [f'{split}/HR', f'{split}/LR']
        if plan.crop and split == 'train':
            layout += [f'{split}/HR_sub', f'{split}/LR_sub']
        if args.lmdb:
            layout += [f'{split}/HR.lmdb', f'{split}/LR.lmdb']
        if plan.kernel_dir:
            layout.append(f'{split}/kernels')
    print_summary(plan, pairs_by_split, problems, True, f'Output: {plan.output}: {", ".join(layout)}')
    return 0


def _siblings(path):
    parent = osp.dirname(path)
    return sorted(os.listdir(parent)) if osp.isdir(parent) else []


if __name__ == '__main__':
    sys.exit(main())
