"""Event-file bytes per logging step and the lightning-bn tab's data build time, per-layer scalars against the compact
record (``per_layer_scalars=False``), in one run::

    python benchmarks/compact_and_tab.py                 # 61 layers x 1,000 logging steps; writes COMPACT_AND_TAB.md
    python benchmarks/compact_and_tab.py --steps 200     # a shorter log

Both logs are written the way the monitors write them: ``lightning_bn.writers.Destination.of_writer(SummaryWriter,
per_layer_scalars=...)``, one destination for the activation figures and one for the gradient figures (as
``ActivationMonitor`` and ``GradientMonitor`` each publish their own), the layers table at step 0. A step's figures
are shaped like a real step's metrics dict (``lightning_bn.tags``): every activation statistic of each of
``--layers`` layers (act_std, act_saturation, act_dead, act_transmission, ...), grad_norm / update_ratio /
weight_norm of each layer's weight and bias, the total gradient norm and the loss; values are random. Bytes are the
event file's size over the logging steps; the tab's build time is ``lightning_bn.tb_plugin.data.run_data`` (what the
tab's ``/run`` route returns), best of ``--reps``, each form in the same process. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("COMPACT_AND_TAB.md")


def write_log(directory: Path, steps: int, layers: int, per_layer_scalars: bool) -> tuple[Path, int]:
    """A monitors' log of ``steps`` logging steps x ``layers`` layers in one form; its event file and figure count."""
    from _synthetic import layers_table, monitor_tags  # the script's directory is on sys.path
    from torch.utils.tensorboard import SummaryWriter

    from lightning_bn.tags import LOSS_TAG, TOTAL_GRADIENT_TAG
    from lightning_bn.writers import Destination

    rng = random.Random(0)
    names = [f"model.encoder.layer.{i}" for i in range(layers)]
    act_tags, grad_tags = monitor_tags(names, ("weight", "bias"))
    writer = SummaryWriter(str(directory), max_queue=1000, flush_secs=3600)
    activations = Destination.of_writer(writer, per_layer_scalars=per_layer_scalars)
    gradients = Destination.of_writer(writer, per_layer_scalars=per_layer_scalars)
    activations.write_layers(layers_table(names, "gelu"))
    for step in range(steps):
        act = {key: rng.uniform(0.05, 0.5) for key in act_tags}
        act[LOSS_TAG] = rng.uniform(0.1, 2.0)
        activations.publish(act, [], step)
        grad = {key: rng.uniform(0.05, 0.5) for key in grad_tags}
        grad[TOTAL_GRADIENT_TAG] = rng.uniform(0.5, 5.0)
        gradients.publish(grad, [], step)
    writer.close()
    [event_file] = directory.glob("events.out.tfevents.*")
    return event_file, len(act_tags) + len(grad_tags) + 2


def scalar_tags(run: Path) -> int:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 1, "tensors": 1})
    acc.Reload()
    return len(acc.Tags()["scalars"])


def build_time(run: Path, reps: int) -> tuple[float, dict]:
    from lightning_bn.tb_plugin.data import run_data

    best, data = float("inf"), {}
    for _ in range(reps):
        start = time.perf_counter()
        data = run_data(run, run.name)
        best = min(best, time.perf_counter() - start)
    return best, data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000)
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--reps", type=int, default=2, help="tab builds per form, best taken (default 2)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="the Markdown written (default: next to this)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    began = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="compact_and_tab_") as tmp:
        for form, per_layer in (("per-layer scalars", True), ("compact record", False)):
            run = Path(tmp) / ("per_layer" if per_layer else "compact")
            start = time.perf_counter()
            event_file, figures = write_log(run, args.steps, args.layers, per_layer)
            written = time.perf_counter() - start
            size = event_file.stat().st_size
            seconds, data = build_time(run, args.reps)
            results[form] = {
                "bytes": size,
                "per_step": size / args.steps,
                "written_s": written,
                "build_s": seconds,
                "tags": scalar_tags(run),
                "figures": figures,
                "layers": len(data["layers"]),
                "steps": len(data["steps"]),
                "digest": json.dumps(data["figures"], sort_keys=True),
            }
            r = results[form]
            print(
                f"{form}: {size / 1e6:.2f} MB ({r['per_step']:.0f} B/step), written in {written:.1f} s, "
                f"tab data {seconds:.2f} s, {r['tags']} scalar tags, {r['layers']} layers x {r['steps']} steps"
            )
    a, b = results["per-layer scalars"], results["compact record"]
    same = a["digest"] == b["digest"]
    load = os.getloadavg()
    text = [
        "# Compact record against per-layer scalars: event-file size and the tab's data build",
        "",
        f"Generated by `python benchmarks/compact_and_tab.py --steps {args.steps} --layers {args.layers}` in "
        f"{time.perf_counter() - began:.0f} s. Do not edit by hand; rerun it.",
        "",
        f"- {os.cpu_count()} logical cores, Python {platform.python_version()}, {platform.machine()}; load average at "
        f"the end {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} (a shared machine: single runs are noisy).",
        f"- Synthetic log: {args.steps} logging steps x {args.layers} layers, {a['figures']} figures a step (every "
        "activation statistic per layer; grad_norm / update_ratio / weight_norm per weight and bias; total gradient "
        "norm, loss), written through `lightning_bn.writers.Destination.of_writer(SummaryWriter, "
        "per_layer_scalars=...)` with one destination per monitor (two events a step), plus the layers table. "
        "No histograms.",
        f"- *tab data*: `lightning_bn.tb_plugin.data.run_data` (the `/run` route's JSON), best of {args.reps}, same "
        f"process. The same tab data from both forms: {'yes' if same else '**NO**'}.",
        "",
        "| form | event file MB | bytes / logging step | scalar tags | write s | tab data s | layers x steps shown |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {form} | {r['bytes'] / 1e6:.2f} | {r['per_step']:,.0f} | {r['tags']} | {r['written_s']:.1f} | "
            f"{r['build_s']:.2f} | {r['layers']} x {r['steps']} |"
            for form, r in results.items()
        ),
        "",
        f"compact / per-layer: bytes {b['per_step'] / a['per_step']:.3f}x, "
        f"tab data {b['build_s'] / a['build_s']:.3f}x.",
    ]
    args.output.write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
