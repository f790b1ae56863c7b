"""Real 2-process DDP (CPU, gloo): the monitors' figures are exact over the global batch."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "ddp_scripts"


def _run(script: str, *args: str, timeout: int = 240) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _metrics(directory: Path) -> dict[str, float]:
    rows = list(csv.DictReader(open(next(directory.rglob("metrics.csv")))))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and "/" in k}


def test_ddp_activation_figures_equal_one_process_over_the_global_batch(tmp_path):
    """Two ranks with 16 samples each log what one process logs on the same 32 samples (dead units included)."""
    _run("monitor_ddp.py", str(tmp_path / "single"), "single")
    _run("monitor_ddp.py", str(tmp_path / "ddp"), "ddp")
    single, ddp = _metrics(tmp_path / "single"), _metrics(tmp_path / "ddp")
    assert set(single) == set(ddp) and "act_dead/net.1" in single
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert 0 < single["act_dead/net.1"] < 1
