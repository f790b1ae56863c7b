"""Suite-wide settings: one intra-op thread per test process (xdist runs one process per core)."""

import torch

# Tiny ops on a shared 2-core machine run far slower with several intra-op threads spinning against each other.
torch.set_num_threads(1)
