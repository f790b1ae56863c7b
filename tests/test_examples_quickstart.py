"""The quickstart example runs end to end and writes activation and gradient figures to TensorBoard."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_fast_writes_monitor_scalars(tmp_path: Path) -> None:
    """`quickstart.py --fast` exits 0, prints a numeric accuracy and logs act_std/ and grad_norm/ scalars."""
    logdir = tmp_path / "tmp"
    proc = subprocess.run(
        [sys.executable, str(QUICKSTART), "--fast", "--logdir", str(logdir)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr

    match = re.search(r"val accuracy: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout
    assert 0.0 <= float(match.group(1)) <= 1.0
    assert f"tensorboard --logdir {logdir}" in proc.stdout

    event_files = list(logdir.rglob("events.out.tfevents.*"))
    assert event_files
    tags = set()
    for path in event_files:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags.update(accumulator.Tags()["scalars"])
    assert any(tag.startswith("act_std/") for tag in tags), sorted(tags)
    assert any(tag.startswith("grad_norm/") for tag in tags), sorted(tags)
