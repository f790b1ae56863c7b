"""`lightning_bn.Monitor` outside the Trainer: a plain PyTorch loop and Lightning Fabric log the same figures as the
Trainer callbacks on the same model and data."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger as FabricCSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from lightning_bn import ActivationMonitor, GradientMonitor, Monitor
from tests.helpers import random_data, read_scalars, trainer

STEPS, EVERY = 5, 2


class Net(nn.Module):
    """Functional activations (F.gelu, torch.tanh): found by the trace, logged as `<layer>.<kind>`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(F.gelu(self.fc1(x)))))


class Task(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.data = random_data(32 * STEPS)
        self.example_input_array = self.data.tensors[0][:32]

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=32, shuffle=False)


def _trainer_figures(tmp_path) -> dict:
    task = Task(Net())
    monitors = [
        ActivationMonitor(every_n_steps=EVERY, histograms=False, heatmap=False),
        GradientMonitor(every_n_steps=EVERY, update_ratio="all"),
    ]
    trainer(tmp_path, max_steps=STEPS, callbacks=monitors, logger=False).fit(task)
    return {tag: list(series) for m in monitors for tag, series in m.figures.items()}


def _assert_same(found: dict, expected: dict) -> None:
    assert set(found) == set(expected)
    assert {"act_std/net.fc1.gelu", "act_saturation/net.fc2.tanh", "grad_norm/total"} <= set(expected)
    for tag, series in expected.items():
        assert [step for step, _ in found[tag]] == [step for step, _ in series] == [0, 2, 4], tag
        for (_, got), (_, want) in zip(found[tag], series):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-9) or (math.isnan(got) and math.isnan(want)), tag


@pytest.fixture(scope="module")
def expected(tmp_path_factory) -> dict:
    return _trainer_figures(tmp_path_factory.mktemp("trainer"))


def test_plain_loop_logs_the_trainer_figures(expected, tmp_path):
    """A hand-written loop with `monitor.step()` after `optimizer.step()` logs what the callbacks log (1e-6), to a
    SummaryWriter that TensorBoard reads back."""
    task = Task(Net())
    optimizer = task.configure_optimizers()
    writer = SummaryWriter(str(tmp_path))
    with Monitor(task, every_n_steps=EVERY, writer=writer, example_input=task.example_input_array,
                 histograms=False, update_ratio="all") as monitor:  # fmt: skip
        returned = []
        for x, y in task.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(task(x), y).backward()
            optimizer.step()
            returned.append(monitor.step())
    writer.close()
    _assert_same({tag: list(s) for tag, s in monitor.figures.items()}, expected)
    assert [r is not None for r in returned] == [True, False, True, False, True]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in task.modules())  # closed: no hook left
    on_disk = read_scalars(tmp_path)["act_std/net.fc1.gelu"]  # float32 in the event file
    kept = list(monitor.figures["act_std/net.fc1.gelu"])
    assert [s for s, _ in on_disk] == [s for s, _ in kept]
    assert [v for _, v in on_disk] == pytest.approx([v for _, v in kept], rel=1e-6)


def test_fabric_logs_the_trainer_figures(expected, tmp_path):
    """Under Fabric (its loggers, via `fabric.log_dict`), traced at the first call (no example input)."""
    fabric = Fabric(accelerator="cpu", devices=1, loggers=FabricCSVLogger(str(tmp_path)))
    task = Task(Net())
    monitor = Monitor(task, every_n_steps=EVERY, writer=fabric, histograms=False, update_ratio="all")
    model, optimizer = fabric.setup(task, task.configure_optimizers())
    loader = fabric.setup_dataloaders(task.train_dataloader())
    for x, y in loader:
        optimizer.zero_grad()
        fabric.backward(F.cross_entropy(model(x), y))
        optimizer.step()
        monitor.step()
    monitor.close()
    fabric.loggers[0].finalize("success")
    _assert_same({tag: list(s) for tag, s in monitor.figures.items()}, expected)
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "act_std/net.fc1.gelu" in logged.splitlines()[0]


def test_model_without_example_and_copies_of_the_step(tmp_path):
    """A model traced at its first call logs functional activations at step 0 too; the steps between logging steps
    attach no hook."""
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    monitor = Monitor(net, every_n_steps=3)
    x, y = random_data(32).tensors
    attached = []
    for _ in range(4):
        attached.append(bool(sum(len(m._forward_hooks) for m in net.modules())))
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        monitor.step()
    monitor.close()
    assert attached == [True, False, False, True]  # logging steps only (step 0: the modules, and the live trace)
    assert [s for s, _ in monitor.figures["act_std/fc1.gelu"]] == [0, 3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"fused": "fast"}, "'fast'"),
        ({"update_ratio": "some"}, "'some'"),
        ({"writer": 42}, "int"),
        ({"modules": [3.5]}, "3.5"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Monitor(Net(), **kwargs)
