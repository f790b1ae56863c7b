"""What the monitors cover (issue 24): every micro-batch of an accumulated step and no recomputed checkpoint forward,
RNN cells and attention, activations in free functions, each call of a reused module, parameters added after the
start, and a scripted submodule."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import ActivationMonitor, GradientMonitor, Monitor
from tests.helpers import trainer


def _act(figures: dict) -> dict[str, float]:
    """The activation figures of the first logged step: tag -> value."""
    return {tag: series[0][1] for tag, series in figures.items() if tag.startswith("act_") and series}


def _close(a: dict[str, float], b: dict[str, float], tol: float = 1e-6) -> None:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for tag in a:
        assert abs(a[tag] - b[tag]) <= tol * max(1.0, abs(b[tag])), (tag, a[tag], b[tag])


class Block(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.fc2(F.relu(self.fc1(x))))


class Net(nn.Module):
    def __init__(self, checkpointed: bool = False) -> None:
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(8, 16), Block(), nn.Linear(16, 3)
        self.checkpointed = checkpointed

    def forward(self, x):
        h = F.gelu(self.inp(x))
        h = checkpoint(self.block, h, use_reentrant=False) if self.checkpointed else self.block(h)
        return self.out(h)


def _data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _plain_step(net: nn.Module, x, y, micro: int = 1) -> dict[str, float]:
    """One logged step of ``Monitor`` over ``micro`` micro-batches (lr 0: the weights stay)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with Monitor(net, every_n_steps=1, example_input=x[:2]) as monitor:
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            F.cross_entropy(net(xs), ys).backward()
        opt.step()
        monitor.step()
        return _act(monitor.figures)


class Task(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path, net: nn.Module, data, batch_size: int, callbacks: list, **kwargs) -> pl.Trainer:
    loader = DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=False)
    fit = trainer(tmp_path, logger=False, callbacks=callbacks, **kwargs)
    fit.fit(Task(net), loader)
    return fit


def test_accumulated_step_counts_every_micro_batch(tmp_path):
    """``accumulate_grad_batches=4``: the logged step holds all four micro-batches, as the hand loop and as one
    plain step over the same 32 samples (to 1e-6)."""
    x, y = _data()
    torch.manual_seed(0)
    net = Net()
    plain = _plain_step(net, x, y)
    hand = _plain_step(net, x, y, micro=4)
    _close(hand, plain)
    callback = ActivationMonitor(every_n_steps=1)
    _fit(tmp_path, net, (x, y), 8, [callback], max_steps=1, accumulate_grad_batches=4)
    _close({k.replace("net.", "", 1): v for k, v in _act(callback.figures).items()}, plain)


def test_checkpointed_segment_is_not_counted_twice(tmp_path):
    """The recomputed forward of a ``torch.utils.checkpoint`` segment is no second sample: the same figures as the
    model without checkpointing."""
    x, y = _data()
    torch.manual_seed(0)
    net = Net()
    plain = _plain_step(net, x, y)
    net.checkpointed = True
    _close(_plain_step(net, x, y), plain)
    callback = ActivationMonitor(every_n_steps=1)
    _fit(tmp_path, net, (x, y), 32, [callback], max_steps=1)
    _close({k.replace("net.", "", 1): v for k, v in _act(callback.figures).items()}, plain)


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.gru = nn.LSTM(8, 16, batch_first=True), nn.GRU(16, 16, batch_first=True)
        self.lstm_cell, self.gru_cell = nn.LSTMCell(16, 16), nn.GRUCell(16, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h, _ = self.lstm(x)
        h, _ = self.gru(h)
        h, _ = self.attn(h, h, h)
        c, _ = self.lstm_cell(h[:, -1])
        return self.out(self.gru_cell(c))


def test_recurrent_cells_and_attention_are_watched():
    net = Recurrent()
    x = torch.randn(4, 5, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with Monitor(net, every_n_steps=1) as monitor:
        net(x).pow(2).mean().backward()
        opt.step()
        monitor.step()
        figures = _act(monitor.figures)
    for name in ("lstm", "gru", "lstm_cell", "gru_cell", "attn"):
        assert f"act_std/{name}" in figures, (name, sorted(figures))
        assert figures[f"act_std/{name}"] > 0


def _mamba_gate(hidden, gate):
    """HF Mamba's slow path: the gate's activation in a plain function, on tensors no module returns as such."""
    return hidden * F.silu(gate)


class MambaLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.in_proj, self.out_proj = nn.Linear(8, 32), nn.Linear(16, 3)

    def forward(self, x):
        hidden, gate = self.in_proj(x).chunk(2, dim=-1)
        return self.out_proj(_mamba_gate(hidden * 0.5, gate + 0.0))


def test_free_function_activation_is_named_and_counted(tmp_path):
    """A ``silu`` in a plain function (HF Mamba's slow path) no hook can see: one warning naming it, a
    ``hook="unwatched"`` row of the layers table, and the count in the report read from the event files."""
    from torch.utils.tensorboard import SummaryWriter

    from lightning_bn.report import analyze
    from lightning_bn.report.formatting import format_table
    from lightning_bn.report.reading import read_run

    net = MambaLike()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    writer = SummaryWriter(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Monitor(net, every_n_steps=1, writer=writer) as monitor:
            for _ in range(3):
                net(torch.randn(4, 8)).pow(2).mean().backward()
                opt.step()
                monitor.step()
    writer.close()
    unwatched = [str(w.message) for w in caught if "not watched" in str(w.message)]
    assert len(unwatched) == 1, [str(w.message) for w in caught]
    assert "silu" in unwatched[0]
    rows = [row for row in monitor.layers if row["hook"] == "unwatched"]
    assert [row["name"] for row in rows] == ["in_proj.silu"], monitor.layers  # named after the chunked layer
    assert monitor.engine.unwatched == ["in_proj.silu"]
    scalars, layers = read_run(tmp_path)
    health = analyze(scalars, "run", layers=layers)
    assert health.unwatched == ["in_proj.silu"]
    assert "1 activation(s) not watched: in_proj.silu" in format_table([health], [], _thresholds())


def _thresholds():
    from lightning_bn.report import Thresholds

    return Thresholds()


def test_health_check_summary_counts_the_unwatched(tmp_path, caplog):
    from lightning_bn import HealthCheck

    x, y = _data()
    net = nn.Sequential(nn.Linear(8, 32), _Gate(), nn.Linear(16, 3))
    check = HealthCheck()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, net, (x, y), 8, [ActivationMonitor(every_n_steps=1), GradientMonitor(every_n_steps=1), check],
             max_steps=2)  # fmt: skip
    assert len([w for w in caught if "not watched" in str(w.message)]) == 1
    assert check.health.unwatched == ["net.0.silu"]


class _Gate(nn.Module):
    """A module whose activation runs in a free function on a slice of its input (no module's output)."""

    def forward(self, x):
        hidden, gate = x.chunk(2, dim=-1)
        return _mamba_gate(hidden * 0.5, gate + 0.0)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: one ``self.relu`` called three times (after bn1, after bn2, after the add)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4 * width, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


@pytest.mark.parametrize("example", [False, True])
def test_post_add_relu_of_a_bottleneck_has_its_own_row(example):
    """torchvision's Bottleneck calls one ``relu`` three times: three rows (``relu``, ``relu@2``, ``relu@3``: after
    the residual add), each over its own call only, equal to the tensors the module returned."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), Bottleneck(), Bottleneck())
    x = torch.randn(2, 3, 8, 8)
    outputs: list[torch.Tensor] = []
    net[1].relu.register_forward_hook(lambda m, a, out: outputs.append(out.detach().clone()))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with Monitor(net, every_n_steps=1, example_input=x if example else None) as monitor:
        for _ in range(2):
            outputs.clear()
            net(x).pow(2).mean().backward()
            opt.step()
            last = monitor.step()
    rows = [tag.partition("/")[2] for tag in last if tag.startswith("act_std/1.relu")]
    assert rows == ["1.relu", "1.relu@2", "1.relu@3"], rows
    for name, out in zip(rows, outputs[-3:]):
        assert abs(last[f"act_mean/{name}"] - out.mean().item()) < 1e-5, name
        assert abs(last[f"act_max/{name}"] - out.max().item()) < 1e-5, name
    assert [row["name"] for row in monitor.layers if row["name"].startswith("1.relu")] == rows


class Reused(nn.Module):
    """One ``relu`` called twice, the second time after a residual add (no norm: micro-batches are independent)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.out(self.relu(self.fc2(self.relu(self.fc1(x))) + x))


def test_reused_module_rows_stay_apart_over_micro_batches_and_evaluation():
    """Each call's row over 4 micro-batches, with a ``no_grad`` evaluation pass in between, equals the plain step's."""
    x, y = _data()
    torch.manual_seed(0)
    net = Reused()
    plain = _plain_step(net, x, y)
    assert {"act_std/relu", "act_std/relu@2"} <= plain.keys()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with Monitor(net, every_n_steps=1, example_input=x[:2]) as monitor:
        for i, (xs, ys) in enumerate(zip(x.chunk(4), y.chunk(4))):
            F.cross_entropy(net(xs), ys).backward()
            if i == 1:
                with torch.no_grad():
                    net(x[:3])
        opt.step()
        monitor.step()
        _close(_act(monitor.figures), plain)


def test_parameter_added_after_the_start_is_measured_or_named():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Monitor(net, every_n_steps=1) as monitor:
            net(torch.randn(4, 4)).pow(2).mean().backward()
            opt.step()
            monitor.step()
            net.append(nn.Linear(1, 1))
            opt.add_param_group({"params": net[3].parameters()})
            net(torch.randn(4, 4)).pow(2).mean().backward()
            opt.step()
            monitor.step()
            figures = dict(monitor.figures)
    named = [str(w.message) for w in caught if "'3.weight'" in str(w.message) or "'3'" in str(w.message)]
    assert "grad_norm/3.weight" in figures or named, [str(w.message) for w in caught]


class Scripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.body = torch.jit.script(nn.Sequential(nn.Linear(16, 16), nn.ReLU()))
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.body(F.relu(self.inp(x))))


def test_scripted_submodule_trains_with_the_monitors_on(tmp_path):
    x, y = _data()
    monitors = [ActivationMonitor(every_n_steps=1), GradientMonitor(every_n_steps=1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = _fit(tmp_path, Scripted(), (x, y), 8, monitors, max_steps=3)
    assert fit.global_step == 3
    assert "act_std/net.inp" in monitors[0].figures
    scripted = [str(w.message) for w in caught if "net.body" in str(w.message)]
    assert any(f"act_std/net.body{s}" in monitors[0].figures for s in ("", ".0", ".1")) or len(scripted) == 1
