"""Per-forward cost of ``lightning_bn.guard(model)`` in eval mode, as a ratio against the same forward without it.

Interleaved repetitions, medians, one process::

    python benchmarks/guard_overhead.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from lightning_bn import guard


def cnn() -> nn.Module:
    layers: list[nn.Module] = []
    channels = 3
    for width in (32, 64, 64, 128):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)).eval()


def forward_ms(net: nn.Module, x: torch.Tensor, n: int = 50) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(n):
            net(x)
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    torch.set_num_threads(1)
    net, x = cnn(), torch.randn(16, 3, 16, 16)
    forward_ms(net, x, 10)
    plain, guarded = [], []
    for _ in range(7):
        plain.append(forward_ms(net, x))
        with guard(net):
            guarded.append(forward_ms(net, x))
    p, g = statistics.median(plain), statistics.median(guarded)
    print(
        f"eval forward, 4-block BN CNN, batch 16x3x16x16, 1 thread: {p:.3f} ms plain, {g:.3f} ms guarded, "
        f"ratio {g / p:.3f}x"
    )


if __name__ == "__main__":
    main()
