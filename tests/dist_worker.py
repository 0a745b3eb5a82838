"""torchrun worker for the distributed test: d2c-train, then each rank dumps its own weights.

    torchrun --nproc_per_node=2 tests/dist_worker.py <dump dir> -opt <yml> --launcher pytorch

With ``D2C_TEST_CORRUPT=<rank>:<iter>`` that rank sets one weight of net_g to inf before
iteration ``iter`` (the roll-back test: its losses turn NaN while the other rank's stay finite).
"""
import os
import sys

import torch

import d2c_model  # noqa: F401
from basicsr import train as basicsr_train
from d2c_tools import train as d2c_train

built = []
_build_model = basicsr_train.build_model


def _keep_model(opt):
    model = _build_model(opt)
    built.append(model)
    corrupt = os.environ.get('D2C_TEST_CORRUPT')
    if corrupt:
        rank, at = map(int, corrupt.split(':'))
        optimize = model.optimize_parameters

        def optimize_parameters(current_iter):
            if current_iter == at and torch.distributed.get_rank() == rank:
                with torch.no_grad():
                    next(model.get_bare_model(model.net_g).parameters()).view(-1)[0] = float('inf')
            optimize(current_iter)

        model.optimize_parameters = optimize_parameters
    return model


if __name__ == '__main__':
    dump_dir = sys.argv.pop(1)
    basicsr_train.build_model = _keep_model
    d2c_train.main(sys.argv[1:])
    rank = torch.distributed.get_rank()
    net = built[0].get_bare_model(built[0].net_g)
    torch.save({k: v.cpu() for k, v in net.state_dict().items()}, os.path.join(dump_dir, f'rank{rank}.pth'))
