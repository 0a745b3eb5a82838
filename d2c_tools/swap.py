"""Turn a BasicSR training option file into its D2C counterpart.

    d2c-swap OLD.yml -o NEW.yml [--budget original|same|N] [--tree-depth 2] [--tree-width 2]
        [--convergence-fraction 0.1 | --convergence-iters N] [--check]
    python -m d2c_tools.swap ...

Prints the original and new parameter counts and a diff of what changed; ``--check`` writes nothing.
"""
import argparse
import os
import sys

from d2c_utils.errors import UserError, command_line_tool

PROG = 'd2c-swap'


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description='Make the D2C counterpart of a BasicSR training option file (EDSR, MSRResNet, RRDBNet, RCAN, '
        'SwinIR, VDSR, RDN, IMDN networks; SRModel, SwinIRModel, RealESRNetModel): D2CNet with the same basic '
        'module, at most the original\'s parameters, D2C\'s two phases; every other key and comment kept.')
    parser.add_argument('input', help='the BasicSR training option file (.yml)')
    parser.add_argument('-o', '--output', help='where to write the D2C option file (required unless --check)')
    parser.add_argument(
        '--budget',
        default='original',
        help='parameter budget: "original" (default: at most the original network\'s count), "same" (keep the '
        'original\'s width and depth along every path, whatever the count), or a count such as 1.37M or 500k')
    parser.add_argument('--tree-depth', type=int, default=2, help='L, depth of the divergence tree (default: 2)')
    parser.add_argument('--tree-width', type=int, default=2, help='C, children per node (default: 2)')
    phase = parser.add_mutually_exclusive_group()
    phase.add_argument(
        '--convergence-fraction',
        type=float,
        default=None,
        help='share of train.total_iter for the convergence phase (default: 0.1; the rest is divergence)')
    phase.add_argument('--convergence-iters', type=int, default=None, help='the convergence phase in iterations')
    parser.add_argument('--check', action='store_true', help='only report what would change; write nothing')
    parser.add_argument('--force', action='store_true', help='overwrite an existing output file')
    return parser


@command_line_tool(PROG)
def main(argv=None):
    return run(build_parser().parse_args(argv))


def run(args):
    from d2c_convert.swap_util import build_check, parse_budget, swap_options, unified_diff
    from d2c_utils.option_check import check_options, read_option_file
    from d2c_utils.output_util import atomic_write

    if not args.check and not args.output:
        raise UserError('-o/--output is required (or pass --check to only see the changes).')
    if args.output and os.path.abspath(args.output) == os.path.abspath(args.input):
        raise UserError(f'-o {args.output} is the input file; write the D2C file next to it.')
    if args.output and os.path.exists(args.output) and not (args.force or args.check):
        raise UserError(f'{args.output} exists; pass --force to overwrite it.')
    if args.tree_depth < 1 or args.tree_width < 2:
        raise UserError(f'--tree-depth {args.tree_depth} / --tree-width {args.tree_width}: D2C needs depth >= 1 '
                        'and width >= 2 (at least two branches to diverge).')
    if args.convergence_fraction is not None and not 0 < args.convergence_fraction < 1:
        raise UserError(f'--convergence-fraction {args.convergence_fraction}: give a number between 0 and 1.')
    # size, encoding, aliases and the values of the keys d2c-train checks, before the sizing search
    check_options(read_option_file(args.input, flag='INPUT', check=False), args.input)
    with open(args.input, encoding='utf-8') as f:
        old_text = f.read()
    result = swap_options(
        old_text,
        args.input,
        budget=parse_budget(args.budget),
        tree_depth=args.tree_depth,
        tree_width=args.tree_width,
        convergence_fraction=args.convergence_fraction,
        convergence_iters=args.convergence_iters)
    build_check(result, args.input)
    new_text = result.text
    net = result.network
    depth_key = 'num_group' if net['branch_type'] == 'RCANBranch' else 'num_block'
    print(f'{result.original_type}: {result.original_params:,} parameters')
    print(f'D2CNet ({net["branch_type"]}, num_feat {net["num_feat"]}, {depth_key} {net[depth_key]} per node, '
          f'tree {net["tree_depth"]}x{net["tree_width"]}): {result.params:,} parameters '
          f'({result.params / result.original_params:.2f}x)')
    for notice in result.notices:
        print(f'note: {notice}')
    print(unified_diff(old_text, new_text, args.input, args.output or '(d2c)'), end='')
    if args.check:
        print('--check: nothing written.')
        return 0

    def write(tmp_path):
        with open(tmp_path, 'w', encoding='utf-8') as f:
            f.write(new_text)
        os.chmod(tmp_path, 0o644)  # an ordinary text file, not mkstemp's private one

    atomic_write(args.output, write)
    print(f'wrote {args.output}; train it with: d2c-train -opt {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
