"""Run by test_scaleout.py under torchrun: MonarchLinear layers sharded with FSDP2 (gloo, CPU).

Trains a small Monarch MLP for a few AdamW steps with ``fully_shard`` on each
layer and on the root, each process on half of every batch, and writes the
largest difference from the same training done in one process without FSDP.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from monarch_matrices.nn import MonarchLinear


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(MonarchLinear(64, 128, nblocks=4), torch.nn.GELU(),
                                MonarchLinear(128, 64, nblocks=4))
    reference = copy.deepcopy(model)
    for layer in model:
        if isinstance(layer, MonarchLinear):
            fully_shard(layer)
    fully_shard(model)
    sharded = tuple(model[0].w1.to_local().shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 64, generator=g)
        model(x[rank * 4 : rank * 4 + 4]).square().mean().backward()
        opt.step()
        opt.zero_grad()
        reference(x).square().mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    err = max((full[k] - v).abs().max().item() for k, v in reference.state_dict().items())
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"max_abs_diff": err, "local_w1_shape": sharded}, f)
    # every rank done with gloo before any tears it down: without this barrier a rank
    # sometimes aborted at exit ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
