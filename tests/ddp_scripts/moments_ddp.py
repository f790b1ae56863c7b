"""Centred moments over 2 processes (gloo, CPU): each rank summarizes its half of 1e4 + N(0, 1); after
``reduce_across_processes`` both ranks hold the row of the whole tensor. Usage: python moments_ddp.py OUT_DIR."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_bn.monitoring.rows import figures, reduce_across_processes, summarize


def run(rank: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MOMENTS_PORT", "29533"))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x = 1e4 + torch.randn(2, 50_000, generator=torch.Generator().manual_seed(0))
    rows = summarize(x[rank]).reshape(1, -1)
    reduced, _ = reduce_across_processes(rows, torch.zeros(0, dtype=torch.float64))
    Path(out, f"rank{rank}.json").write_text(json.dumps(figures(reduced[0].tolist())))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2)
