"""Wall time of ``lightning-bn report`` on a long run's log, this checkout against an earlier revision, in one run::

    python benchmarks/report_speed.py                    # 10,000 steps x 50 layers; writes benchmarks/REPORT_SPEED.md
    python benchmarks/report_speed.py --steps 2000       # a smaller log
    python benchmarks/report_speed.py --before 9d7232c   # the revision measured as "before" (default: 9d7232c)

The log is written the way the monitors write it (``lightning_bn.writers.write_scalars``: one event per logging step
holding every figure, through ``torch.utils.tensorboard.SummaryWriter``), with the library's own tags
(``lightning_bn.tags``): every activation statistic of ``--layers`` layers, ``grad_norm`` / ``update_ratio`` /
``weight_norm`` of each layer's weight, the total gradient norm and the loss, plus the layers table. "Before" is
``lightning_bn`` of ``--before`` (``git archive`` into a temporary directory, no worktree); "after" is this checkout.
Each side runs in a fresh Python process: ``lightning_bn.cli.main(["report", LOG, "--format", "json"])`` timed from
the call to its return (imports excluded), then ``read_run`` alone (the reading part), and a digest of what
``read_run`` returned, which must agree between the two. Not part of the test suite: timings belong here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("REPORT_SPEED.md")
BEFORE = "9d7232c"  # the last revision with EventAccumulator + pure-Python CRC (twice) in lightning-bn report

#: run in a fresh process with the measured ``lightning_bn`` first on ``sys.path``; prints one JSON line
_MEASURE = r"""
import contextlib, hashlib, io, json, sys, time
from pathlib import Path
log = Path(sys.argv[1])
import lightning_bn, lightning_bn.cli
from lightning_bn.report.reading import read_run, find_runs
import tensorboard.compat.proto.event_pb2  # imports outside the timed window, on both sides
from tensorboard.backend.event_processing import event_accumulator
out, err = io.StringIO(), io.StringIO()
start = time.perf_counter()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = lightning_bn.cli.main(["report", str(log), "--format", "json"])
report = time.perf_counter() - start
start = time.perf_counter()
[run] = find_runs(log)
scalars, layers = read_run(run)
reading = time.perf_counter() - start
digests = {tag: hashlib.sha256(repr(series).encode()).hexdigest()[:16] for tag, series in scalars.items()}
digests["<layers table>"] = hashlib.sha256(repr(layers).encode()).hexdigest()[:16]
layer_count = len(json.loads(out.getvalue())["runs"]["."]["layers"]) if code == 0 else 0
print(json.dumps({"report_s": report, "read_s": reading, "code": code, "digests": digests, "layers": layer_count,
                  "values": sum(map(len, scalars.values())), "package": lightning_bn.__file__}))
"""


def write_log(directory: Path, steps: int, layers: int) -> Path:
    """A monitors' log of ``steps`` logging steps x ``layers`` layers; returns its event file."""
    import random

    from _synthetic import layers_table, monitor_tags  # the script's directory is on sys.path
    from torch.utils.tensorboard import SummaryWriter

    from lightning_bn.tags import LAYERS_TAG, LOSS_TAG, TOTAL_GRADIENT_TAG
    from lightning_bn.writers import write_scalars

    rng = random.Random(0)
    names = [f"net.{2 * i}" for i in range(layers)]
    activations, gradients = monitor_tags(names)
    tags = [*activations, *gradients, TOTAL_GRADIENT_TAG, LOSS_TAG]
    writer = SummaryWriter(str(directory), max_queue=1000, flush_secs=3600)
    writer.add_text(LAYERS_TAG, json.dumps(layers_table(names, "relu")), 0)
    for step in range(steps):
        write_scalars(writer, {key: rng.uniform(0.05, 0.5) for key in tags}, step)
    writer.close()
    [event_file] = directory.glob("events.out.tfevents.*")
    return event_file


def measure(package_root: Path, log: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(package_root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(log)], env=env, capture_output=True, text=True, check=True, cwd="/"
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--before", default=BEFORE, help=f"git revision measured as before (default {BEFORE})")
    parser.add_argument("--reps", type=int, default=1, help="measurements per side, interleaved (default 1)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="the Markdown written (default REPORT_SPEED.md)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="report_speed_") as tmp:
        tmp_path = Path(tmp)
        start = time.perf_counter()
        event_file = write_log(tmp_path / "log", args.steps, args.layers)
        written = time.perf_counter() - start
        size = event_file.stat().st_size
        print(f"log: {args.steps} steps x {args.layers} layers, {size / 1e6:.1f} MB, written in {written:.1f} s")
        before_root = tmp_path / "before"
        before_root.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", args.before, "lightning_bn"],
            capture_output=True,
            check=True,
        ).stdout
        archive_path = tmp_path / "before.tar"
        archive_path.write_bytes(archive)
        with tarfile.open(archive_path) as tar:
            tar.extractall(before_root, filter="data")
        sides = {"before": before_root, "after": ROOT}
        results: dict[str, list[dict]] = {side: [] for side in sides}
        for _ in range(args.reps):
            for side, root in sides.items():
                result = measure(root, event_file.parent)
                assert Path(result["package"]).is_relative_to(root), result["package"]
                results[side].append(result)
                print(f"{side}: report {result['report_s']:.2f} s, read_run {result['read_s']:.2f} s")
    before, after = (min(results[side], key=lambda r: r["report_s"]) for side in ("before", "after"))
    common = before["digests"].keys() & after["digests"].keys()
    same = all(before["digests"][key] == after["digests"][key] for key in common)
    only = sorted({key.partition("/")[0] for key in before["digests"].keys() ^ after["digests"].keys()})
    load = os.getloadavg()
    rows = [
        ("before", args.before, before),
        ("after", "this checkout", after),
    ]
    text = [
        "# `lightning-bn report` on a long run's log",
        "",
        f"Generated by `python benchmarks/report_speed.py --steps {args.steps} --layers {args.layers}` in "
        f"{time.perf_counter() - began:.0f} s. Do not edit by hand; rerun it.",
        "",
        f"- {os.cpu_count()} logical cores, Python {platform.python_version()}, {platform.machine()}; load average at "
        f"the end {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} (a shared machine: single runs are noisy).",
        f"- Log: one event file, {args.steps} logging steps x {args.layers} layers ({after['values']:,} scalars: every "
        "activation statistic per layer, grad_norm / update_ratio / weight_norm per weight, total gradient norm, "
        f"loss), plus the layers table: {size / 1e6:.1f} MB, written through `lightning_bn.writers.write_scalars`.",
        f"- Each side in a fresh process, best of {args.reps}; *report*: `lightning_bn.cli.main(['report', LOG, "
        "'--format', 'json'])` (reading, damage check, analysis, formatting; imports excluded); *read_run*: the "
        "reading alone. Before: event files read by TensorBoard's `EventAccumulator` (pure-Python CRC-32C) after a "
        "separate damage pass (pure-Python CRC-32C again); after: one pass, CRC-32C with the `crc32c` C extension.",
        f"- The same series and layers table read on both sides: {'yes' if same else '**NO**'} ({len(common)} in "
        "common"
        + (f"; read on one side only, statistics unknown to the other's tags: {', '.join(only)}" if only else "")
        + ").",
        "",
        "| side | revision | report s | read_run s | layers reported |",
        "| --- | --- | ---: | ---: | ---: |",
        *(
            f"| {side} | {revision} | {r['report_s']:.2f} | {r['read_s']:.2f} | {r['layers']} |"
            for side, revision, r in rows
        ),
        "",
        f"after / before: report {after['report_s'] / before['report_s']:.3f}x, read_run "
        f"{after['read_s'] / before['read_s']:.3f}x.",
    ]
    args.output.write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
