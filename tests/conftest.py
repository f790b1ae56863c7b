"""Suite-wide settings: one intra-op thread per test process (xdist runs one process per core), and the eager fused
pass (as "auto" picks on CPU anyway): compiling costs seconds per process and per tensor rank, which ~700 short tests
would pay again and again; tests/test_fused.py checks the compiled path against the eager one explicitly."""

import os

import torch

# Tiny ops on a shared 2-core machine run far slower with several intra-op threads spinning against each other.
torch.set_num_threads(1)
os.environ.setdefault("LIGHTNING_BN_FUSED", "eager")
