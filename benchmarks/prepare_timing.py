"""Wall time of ``prepare(net, x, zero_init_residual=True)`` on the ResNet-18 of the tests (``tests.helpers.resnet18``,
11.7 M parameters, 2 x 3 x 64 x 64 input, CPU), the call ``tests/test_wrapper.py`` checks functionally::

    python benchmarks/prepare_timing.py [--reps 5] [--threads 1]

Prints one forward pass (the reference) and each ``prepare`` call's time on a fresh copy of the model (same seed, so
the same weights each time), then their medians. The test suite asserts no wall-clock bound: timings belong here.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_bn import prepare  # noqa: E402
from tests.helpers import resnet18  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed prepare() calls, each on a fresh copy")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the suite runs with 1)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = resnet18()
    x = torch.randn(2, 3, 64, 64)
    params = sum(p.numel() for p in base.parameters())

    forward, prepare_times = [], []
    prepare(copy.deepcopy(base), x, zero_init_residual=True)  # warm-up: first-call costs (allocator, dispatch)
    for rep in range(args.reps):
        net = copy.deepcopy(base)
        with torch.no_grad():
            start = time.perf_counter()
            net.eval()(x)
            forward.append(time.perf_counter() - start)
        net.train()
        start = time.perf_counter()
        report = prepare(net, x, zero_init_residual=True)
        prepare_times.append(time.perf_counter() - start)
        print(
            f"rep {rep}: forward {forward[-1]:.3f} s, prepare {prepare_times[-1]:.3f} s ({len(report.layers)} layers)"
        )

    print(
        f"ResNet-18 ({params / 1e6:.1f} M parameters), input {tuple(x.shape)}, torch {torch.__version__}, "
        f"{args.threads} thread(s), {platform.processor() or platform.machine()}"
    )
    print(f"one forward pass (reference): {statistics.median(forward):.3f} s (median of {args.reps})")
    print(f"prepare(net, x, zero_init_residual=True): {statistics.median(prepare_times):.3f} s (median of {args.reps})")


if __name__ == "__main__":
    main()
