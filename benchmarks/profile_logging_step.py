"""Where a logging step's time goes, per phase: hooks (the fused reductions), collection and the device-to-host
transfer, logger writes, histograms, heatmap, gradient norms, the non-finite watch — against the step without
callbacks.

Each phase is timed (exclusive of the other phases nested in it) by wrapping the library function that does it
(synchronizing first on GPU), over a real
``Trainer.fit`` with both monitors logging every step; the same fit without callbacks gives the baseline::

    python benchmarks/profile_logging_step.py --model "small CNN" --steps 60 [--accelerator gpu]

The next regression shows up as one phase growing.
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from run import MODELS, Config, fit, ours  # the script's directory is on sys.path

import lightning_bn.monitoring.activation as probe
import lightning_bn.monitoring.engine as engine
import lightning_bn.monitoring.gradients as gradients
from lightning_bn import writers
from lightning_bn.monitoring.rows import COMPILE_SECONDS

#: phase -> (module, attribute) of the function that does it
PHASES: dict[str, tuple[Any, str]] = {
    "fused reductions (activation hooks)": (probe, "fused_row"),
    "histograms (activations, on device)": (probe, "histogram"),
    "hook glue (activation hooks)": (probe.ActivationProbe, "_measure"),
    "gather (activations)": (probe.ActivationProbe, "gather"),
    "gradient norms + parameter copies": (gradients.GradientProbe, "measure"),
    "gather (gradients)": (gradients.GradientProbe, "gather"),
    "non-finite gradient watch": (engine.MonitorEngine, "watch_nonfinite"),
    "end: one transfer + parse + history": (engine.MonitorEngine, "end"),
    "logger writes (scalars)": (writers, "write_scalars"),
    "logger writes (histograms)": (writers, "log_histograms"),
}


_INNER: list[float] = []  # time spent in timed calls nested inside the running one: phases are exclusive


def _timed(fn: Callable, totals: dict[str, float], phase: str, sync: bool) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        _INNER.append(0.0)
        try:
            return fn(*args, **kwargs)
        finally:
            if sync:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            inner = _INNER.pop()
            totals[phase] += elapsed - inner
            if _INNER:
                _INNER[-1] += elapsed

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODELS[0].name, choices=[m.name for m in MODELS])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    model = next(m for m in MODELS if m.name == args.model)
    sync = args.accelerator == "gpu"

    def run(config: Config) -> float:
        start = time.perf_counter()
        fit(model, config, args.steps)
        return (time.perf_counter() - start) / args.steps

    fit(model, Config("warm-up", 1, ours(1), ""), 3)  # compile the fused pass (if it compiles) before timing
    baseline = statistics.median(run(Config("baseline", None, list, "")) for _ in range(3))
    totals: dict[str, float] = defaultdict(float)
    originals = {phase: getattr(owner, name) for phase, (owner, name) in PHASES.items()}
    for phase, (owner, name) in PHASES.items():
        setattr(owner, name, _timed(originals[phase], totals, phase, sync))
    try:
        monitored = run(Config("both monitors, every step", 1, ours(1), ""))
    finally:
        for phase, (owner, name) in PHASES.items():
            setattr(owner, name, originals[phase])
    extra = monitored - baseline
    print(f"model: {model.name} ({model.description}); {args.steps} steps, {args.threads} threads")
    print(f"step without callbacks: {baseline * 1e3:.2f} ms; with both monitors every step: {monitored * 1e3:.2f} ms "
          f"({monitored / baseline:.2f}x, +{extra * 1e3:.2f} ms)")  # fmt: skip
    if COMPILE_SECONDS:
        print(f"fused pass compiled once per rank in {sum(COMPILE_SECONDS.values()):.1f} s (not in the timings)")
    print(f"{'phase':42s} {'ms/step':>8s} {'share of the extra':>20s}")
    for phase in PHASES:
        ms = totals[phase] / args.steps * 1e3
        print(f"{phase:42s} {ms:8.3f} {ms / (extra * 1e3) if extra > 0 else float('nan'):20.0%}")
    known = sum(totals.values()) / args.steps
    print(f"{'(rest: hook dispatch, callback glue)':42s} {(extra - known) * 1e3:8.3f}")


if __name__ == "__main__":
    main()
