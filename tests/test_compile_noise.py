"""``trainer.fit(torch.compile(model))`` with the monitors: the one warning the README promises, exact figures on every
logging step, and none of dynamo's logs (no graph break, no recompilation: logging steps run eagerly)."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import ActivationMonitor, GradientMonitor
from tests.helpers import read_scalars

#: what dynamo prints (with TORCH_LOGS="graph_breaks,recompiles", or on its own at the recompile limit)
DYNAMO_NOISE = ("Graph break", "graph_break", "Recompiling", "recompile_limit", "cache_size_limit", "torch/_dynamo")
WARNING = "is torch.compile'd"
LOGGING_STEPS = [0, 5, 10, 15]


class Classifier(pl.LightningModule):
    """A 4-layer MLP, no ``example_input_array``: the monitors trace its first call."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(logdir: Path, compile: str | None = None, backend: str = "inductor") -> None:
    """20 steps, figures every 5; ``compile``: ``"model"`` (``trainer.fit(torch.compile(model))``), ``"part"``
    (``model.net = torch.compile(model.net)``) or ``None``."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(640, 16), torch.randint(0, 4, (640,)))
    model = Classifier()
    if compile == "part":
        model.net = torch.compile(model.net, backend=backend)
    fitted = torch.compile(model, backend=backend) if compile == "model" else model
    trainer = pl.Trainer(
        max_steps=20,
        logger=TensorBoardLogger(logdir),
        callbacks=[
            ActivationMonitor(every_n_steps=5, per_layer_scalars=True),
            GradientMonitor(every_n_steps=5, per_layer_scalars=True),
        ],
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(fitted, DataLoader(data, batch_size=32))


def _figures(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    return {tag: sorted(values) for tag, values in read_scalars(logdir).items() if tag.startswith(("act_", "grad_"))}


def _assert_same_figures(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    assert any(tag.startswith("act_std/") for tag in expected)
    for tag, values in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in values], tag  # every logging step, not the first only
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in values], rel=1e-4, abs=1e-6), tag


@pytest.mark.parametrize("compile", ["model", "part"])
def test_compiled_fit_measures_every_logging_step_without_graph_breaks(tmp_path, compile):
    """Dynamo keeps no guard on module hooks: a graph compiled while they are off would skip them on later logging
    steps. Logging steps run eagerly instead: same figures as the eager fit at every step, one warning, no graph
    break, no recompilation, and the compiler's stance is back to normal after the fit."""
    fit(tmp_path / "eager")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path / "compiled", compile, backend="eager")
    ours = [str(w.message) for w in caught if WARNING in str(w.message)]
    assert len(ours) == 1, ours
    assert not counters["graph_break"] and not counters["recompiles"], dict(counters)
    assert counters["frames"]["ok"] >= 1  # the other steps did run compiled
    assert torch._dynamo.eval_frame._stance.stance == "default"
    expected = _figures(tmp_path / "eager")
    assert [s for s, _ in expected["act_std/net.0"]] == LOGGING_STEPS
    _assert_same_figures(_figures(tmp_path / "compiled"), expected)


SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from tests.test_compile_noise import fit
fit(Path(sys.argv[1]), "model")
"""


@pytest.mark.slow  # inductor compiles the model (tens of seconds on a small CPU)
def test_compiled_fit_prints_the_one_warning_and_no_dynamo_logs(tmp_path):
    """A user's ``trainer.fit(torch.compile(model))`` (inductor, in a fresh process, dynamo's graph-break and
    recompile logs switched on): the library's warning, once, and nothing from dynamo; the figures are exact."""
    script = tmp_path / "fit_compiled.py"
    script.write_text(SCRIPT.format(root=str(Path(__file__).parent.parent)))
    env = {**os.environ, "TORCH_LOGS": "graph_breaks,recompiles", "PYTHONWARNINGS": "default"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "compiled")],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed
    assert printed.count(WARNING) == 1, printed
    noise = [line for line in printed.splitlines() if any(pattern in line for pattern in DYNAMO_NOISE)]
    assert not noise, "\n".join(noise[:40])
    fit(tmp_path / "eager")
    _assert_same_figures(_figures(tmp_path / "compiled"), _figures(tmp_path / "eager"))
