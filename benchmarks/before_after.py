"""Monitor overhead of several checkouts of the package, interleaved: ``run.py --overhead-only`` once per checkout,
thread count and round, in turn, each run its own process importing its checkout's ``lightning_bn``::

    git worktree add /tmp/before cb2ec80
    python benchmarks/before_after.py --tree before=/tmp/before --tree after=. --threads 1 2 --rounds 3

Within a run the configurations (no callbacks, every 50 steps, every step) are interleaved as in ``run.py``; the runs
of the checkouts alternate, so a change in the machine's speed hits all of them alike. Each cell is the median over
rounds of the per-repetition ratio to the baseline of the same process, with the smallest and largest ratio. Writes
the table to stdout and, with ``--results``, appends it to ``benchmarks/RESULTS.md`` as its last section.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
SECTION = "## Before / after"
CONFIGS = {"every step": "ours, every_n_steps=1", "every 50": "ours, every_n_steps=50"}
BASELINE = "baseline (TensorBoardLogger, no callback)"


def run_once(tree: Path, threads: int, models: list[str], steps: int, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
        command = [sys.executable, str(HERE / "run.py"), "--overhead-only", "--threads", str(threads), "--reps",
                   str(reps), "--steps", str(steps), "--models", *models, "--output", str(Path(tmp) / "r.md"),
                   "--json", str(out)]  # fmt: skip
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        found = json.loads(out.read_text())
    expected = str((tree / "lightning_bn" / "__init__.py").resolve())
    if os.path.realpath(found["package"]) != expected:
        raise RuntimeError(f"the run imported {found['package']}, not {expected}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="label=path of a checkout (repeat)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", default=["mlp", "small cnn"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=1, help="repetitions inside each run.py process")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--results", type=Path, help="append the table to this Markdown file (e.g. RESULTS.md)")
    args = parser.parse_args()
    trees = [(label, Path(path)) for label, path in (t.split("=", 1) for t in args.tree)]
    ratios: dict[tuple[str, str, int, str], list[float]] = {}
    start = time.perf_counter()
    for round_ in range(args.rounds):
        order = trees if round_ % 2 == 0 else trees[::-1]
        for threads in args.threads:
            for label, tree in order:
                found = run_once(tree, threads, args.models, args.steps, args.reps)
                for model, times in found["times"].items():
                    for cadence, config in CONFIGS.items():
                        key = (model, cadence, threads, label)
                        ratios.setdefault(key, []).extend(t / b for t, b in zip(times[config], times[BASELINE]))
        print(f"round {round_ + 1}/{args.rounds} done after {time.perf_counter() - start:.0f} s", file=sys.stderr)
    models = list(dict.fromkeys(k[0] for k in ratios))
    labels = [label for label, _ in trees]
    lines = [
        SECTION,
        "",
        f"`python benchmarks/before_after.py {' '.join(sys.argv[1:])}` ({(time.perf_counter() - start) / 60:.0f} min, "
        f"load average at end {os.getloadavg()[0]:.2f}): per checkout, thread count and round one `run.py "
        f"--overhead-only` process ({args.reps} repetition(s) of {args.steps} measured steps), the checkouts in "
        "turn. Cell: median ratio to the no-callback baseline of the same process (smallest..largest), "
        f"{args.rounds * args.reps} ratios each.",
        "",
        "| model | cadence | threads | " + " | ".join(labels) + " |",
        "| --- | --- | ---: |" + " ---: |" * len(labels),
    ]
    for model in models:
        for cadence in CONFIGS:
            for threads in args.threads:
                cells = []
                for label in labels:
                    r = ratios[(model, cadence, threads, label)]
                    cells.append(f"{statistics.median(r):.3f}x ({min(r):.2f}..{max(r):.2f})")
                lines.append(f"| {model} | {cadence} | {threads} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.results is not None:
        text = args.results.read_text() if args.results.exists() else ""
        if SECTION in text:
            text = text[: text.index(SECTION)]
        args.results.write_text(text.rstrip("\n") + "\n\n" + table)


if __name__ == "__main__":
    main()
