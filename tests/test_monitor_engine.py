"""`lightning_bn.Monitor` outside the Trainer: a plain PyTorch loop and Lightning Fabric log the same figures as the
Trainer callbacks on the same model and data."""

import dataclasses
import inspect
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger as FabricCSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from lightning_bn import ActivationMonitor, GradientMonitor, Monitor, prepare
from lightning_bn.monitoring import MonitorOptions
from lightning_bn.tags import LOSS_TAG
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
    assert {"act_std/net.fc1.gelu", "act_saturation/net.fc2.tanh", "grad_norm/total", LOSS_TAG} <= set(expected)
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
            loss = F.cross_entropy(task(x), y)
            loss.backward()
            optimizer.step()
            returned.append(monitor.step(loss))
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
        loss = F.cross_entropy(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        monitor.step(loss)
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


# ---------------------------------------------------------------------------------------- one engine, three drivers
#: (option, value) pairs every driver that has the option must reject, with the same message
BAD_OPTIONS = [
    ("every_n_steps", 0),
    ("every_n_steps", "5"),
    ("histogram_bins", -5),
    ("histogram_bins", 2.5),
    ("zero_tol", -1),
    ("zero_tol", float("inf")),
    ("fused", "fast"),
    ("norm_type", 0),
    ("norm_type", "inf"),
    ("update_ratio", "some"),
    ("update_ratio_budget", 5.0),
    ("update_ratio_budget", 0),
    ("nonfinite_every_step", 1),
    ("histograms", "yes"),
    ("heatmap", None),
    ("modules", [3.5]),
]
GOOD_OPTIONS = [("every_n_steps", 7), ("zero_tol", 0.0), ("norm_type", float("inf")), ("update_ratio", "all"),
                ("update_ratio_budget", 1.0), ("histogram_bins", 1), ("fused", "eager")]  # fmt: skip
_DRIVERS = {
    "ActivationMonitor": (ActivationMonitor, MisconfigurationException),
    "GradientMonitor": (GradientMonitor, MisconfigurationException),
    "Monitor": (lambda **kw: Monitor(Net(), **kw), ValueError),
}


def _accepts(driver: str, option: str) -> bool:
    factory = _DRIVERS[driver][0]
    target = Monitor.__init__ if driver == "Monitor" else factory.__init__
    return option in inspect.signature(target).parameters


@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS, ids=[f"{o}={v!r}" for o, v in BAD_OPTIONS])
def test_every_driver_rejects_a_bad_option_with_the_same_message(option, value):
    """Where an option exists in a driver, a bad value is refused by all of them with one message (that of
    MonitorOptions), naming the option and the value; `Monitor` used to accept `update_ratio_budget=5.0`."""
    with pytest.raises(ValueError) as expected:
        MonitorOptions(**{option: value})
    message = str(expected.value)
    assert f"`{option}`" in message and repr(value).strip("[]") in message
    checked = 0
    for driver, (factory, error) in _DRIVERS.items():
        if not _accepts(driver, option):
            continue
        checked += 1
        with pytest.raises(error) as raised:
            factory(**{option: value})
        assert str(raised.value) == message, driver
    assert checked >= 2 or option in ("zero_tol", "fused", "modules", "heatmap", "norm_type", "update_ratio",
                                      "update_ratio_budget", "nonfinite_every_step")  # fmt: skip


@pytest.mark.parametrize(("option", "value"), GOOD_OPTIONS)
def test_every_driver_accepts_a_good_option(option, value):
    for driver, (factory, _) in _DRIVERS.items():
        if _accepts(driver, option):
            factory(**{option: value})


def test_defaults_are_the_same_in_every_driver():
    """The defaults a driver exposes are MonitorOptions' (GradientMonitor's `histograms` is its gradient histograms,
    off by default as `Monitor(gradient_histograms=False)`)."""
    defaults = {f.name: f.default for f in dataclasses.fields(MonitorOptions)}
    renamed = {"GradientMonitor": {"histograms": "gradient_histograms"}}
    for driver in _DRIVERS:
        target = Monitor.__init__ if driver == "Monitor" else _DRIVERS[driver][0].__init__
        for name, parameter in inspect.signature(target).parameters.items():
            option = renamed.get(driver, {}).get(name, name)
            if option in defaults and option not in ("activations", "gradients"):
                assert parameter.default == defaults[option], (driver, name)


class _Counting(nn.Module):
    """A stateful model: counts its forward calls (a second forward pass would advance it twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc2(F.gelu(self.fc1(x)))


def _step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_first_call_trace_runs_forward_once_and_measures_that_call():
    """Traced on its first call as it runs: `forward` runs once per call, and step 0 has the functional sites."""
    net = _Counting()
    x, y = random_data(32).tensors
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with Monitor(net, every_n_steps=1) as monitor:
        for _ in range(2):
            _step(net, opt, x, y)
            monitor.step()
    assert net.calls == 2
    assert [s for s, _ in monitor.figures["act_std/fc1.gelu"]] == [0, 1]
    assert monitor.model_map is not None and "fc1.gelu" in monitor.model_map.site_names


def test_first_call_trace_of_the_callback_runs_forward_once(tmp_path):
    """The same for ActivationMonitor without `example_input_array`."""
    task = Task(_Counting())
    task.example_input_array = None
    monitor = ActivationMonitor(every_n_steps=1, histograms=False, heatmap=False)
    trainer(tmp_path, max_steps=3, callbacks=[monitor], logger=False).fit(task)
    assert task.net.calls == 3
    assert [s for s, _ in monitor.figures["act_std/net.fc1.gelu"]] == [0, 1, 2]


def test_evaluation_between_steps_is_not_counted():
    """An evaluation pass under no_grad (and a trace, a prepare()) between two steps is no part of the next logging
    step: its figures are those of the training batch alone."""
    torch.manual_seed(0)
    net, reference = Net(), Net()
    reference.load_state_dict(net.state_dict())
    x, y = random_data(32).tensors
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (net, reference))
    huge = 1000 * torch.randn(32, 64)
    with Monitor(net, every_n_steps=1, example_input=x) as monitor, \
            Monitor(reference, every_n_steps=1, example_input=x) as clean:  # fmt: skip
        for _ in range(2):
            _step(net, opt, x, y)
            _step(reference, ref_opt, x, y)
            monitor.step()
            clean.step()
            with torch.no_grad():
                net.eval()
                net(huge)  # evaluation, in eval mode
                net.train()
                net(huge)  # no_grad in train mode
            Monitor(net, example_input=huge, gradients=False).close()  # another monitor's trace
        prepare(net, example_input=huge, seed=0)  # prepare()'s passes on another batch ...
        reference.load_state_dict(net.state_dict())  # ... while the reference only gets the weights it drew
        for _ in range(2):
            _step(net, opt, x, y)
            _step(reference, ref_opt, x, y)
            monitor.step()
            clean.step()
    got, want = monitor.figures["act_std/fc1.gelu"], clean.figures["act_std/fc1.gelu"]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert want[-1][1] < 5  # the evaluation batch would read ~300


def test_writer_failure_keeps_step_numbers():
    """A writer that raises once: the exception reaches the caller, and every later step keeps its number."""
    calls = []

    def flaky(metrics, step):
        calls.append(step)
        if len(calls) == 2:
            raise OSError("disk full")

    net = Net()
    x, y = random_data(32).tensors
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with Monitor(net, every_n_steps=1, writer=flaky, example_input=x) as monitor:
        for step in range(4):
            _step(net, opt, x, y)
            if step == 1:
                with pytest.raises(OSError, match="disk full"):
                    monitor.step()
            else:
                monitor.step()
    assert calls == [0, 1, 2, 3] and monitor.global_step == 4
    assert [s for s, _ in monitor.figures["act_std/fc1.gelu"]] == [0, 1, 2, 3]


def test_closed_is_closed():
    """After close(): no hook anywhere, step() raises, and nothing re-attaches (not even the first-call trace)."""
    net = Net()
    monitor = Monitor(net, every_n_steps=1)  # no example: the first call would be traced
    monitor.close()
    monitor.close()  # twice is fine
    assert "forward" not in net.__dict__
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    with pytest.raises(RuntimeError, match="closed"):
        monitor.step()
    net(torch.randn(4, 64))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules()) and monitor.model_map is None


def test_compiled_and_fabric_models_log_the_plain_models_tags(tmp_path):
    """Monitor(torch.compile(model), example_input=...) works, and its tags are the plain model's (no `_orig_mod.`);
    the same under Fabric's wrapper (no `_forward_module.`)."""
    torch.manual_seed(0)
    net = Net()
    x, y = random_data(32).tensors
    compiled = torch.compile(net, backend="eager")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="torch.compile"):
        monitor = Monitor(compiled, every_n_steps=1, example_input=x)
    _step(compiled, opt, x, y)
    monitor.step()
    monitor.close()
    tags = set(monitor.figures)
    assert {"act_std/fc1.gelu", "act_std/fc1", "grad_norm/fc1.weight"} <= tags
    assert not [t for t in tags if "_orig_mod" in t]

    fabric = Fabric(accelerator="cpu", devices=1)
    task = Task(Net())
    model, optimizer = fabric.setup(task, task.configure_optimizers())
    monitor = Monitor(model, every_n_steps=1)  # the wrapper itself, traced on its first call
    optimizer.zero_grad()
    fabric.backward(F.cross_entropy(model(x), y))
    optimizer.step()
    monitor.step()
    monitor.close()
    tags = set(monitor.figures)
    assert {"act_std/net.fc1.gelu", "grad_norm/net.fc1.weight"} <= tags
    assert not [t for t in tags if "_forward_module" in t]


def test_gradient_accumulation_counts_every_micro_batch(tmp_path):
    """Under accumulate_grad_batches=4 the ActivationMonitor's figures are those of all four micro-batches, as
    Monitor's in a hand-written accumulation loop."""
    torch.manual_seed(0)
    task = Task(Net())
    data = task.data.tensors
    monitor = ActivationMonitor(every_n_steps=1, histograms=False, heatmap=False)
    trainer(tmp_path, max_steps=1, callbacks=[monitor], logger=False, accumulate_grad_batches=4).fit(task)
    torch.manual_seed(0)
    plain = Task(Net())
    opt = plain.configure_optimizers()
    with Monitor(plain, every_n_steps=1, example_input=plain.example_input_array, gradients=False) as loop:
        opt.zero_grad()
        for i in range(4):
            x, y = data[0][32 * i : 32 * (i + 1)], data[1][32 * i : 32 * (i + 1)]
            (F.cross_entropy(plain(x), y) / 4).backward()
        opt.step()
        loop.step()
    got, want = monitor.figures["act_std/net.fc1.gelu"], loop.figures["act_std/net.fc1.gelu"]
    assert got[0][1] == pytest.approx(want[0][1], rel=1e-6)
    assert monitor.figures["act_std/net.fc1"][0][1] == pytest.approx(loop.figures["act_std/net.fc1"][0][1], rel=1e-6)


def test_activation_checkpointing_counts_the_forward_once():
    """A checkpointed segment is recomputed during backward: that recomputation is not counted again."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Net()

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    torch.manual_seed(0)
    net = Checkpointed()
    plain = Net()
    plain.load_state_dict(net.inner.state_dict())
    x, y = random_data(32).tensors
    figures = []
    for model in (net, plain):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with Monitor(model, every_n_steps=1, example_input=x, gradients=False) as monitor:
            _step(model, opt, x, y)
            monitor.step()
        figures.append({t.split("/", 1)[1].removeprefix("inner.") + "|" + t.split("/")[0]: s[0][1]
                        for t, s in monitor.figures.items()})  # fmt: skip
    assert figures[0] == pytest.approx(figures[1], rel=1e-6)


def test_trace_failure_is_said_the_same_way_by_every_driver(tmp_path):
    """A model the trace cannot follow: every driver warns, naming it, and watches its activation modules."""

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(64, 10), nn.Tanh()

        def forward(self, x):
            if not isinstance(x, torch.Tensor):
                raise TypeError("odd input")
            return self.act(self.fc(x))

    with pytest.warns(RuntimeWarning, match="could not trace Odd on its example input.*odd input"):
        monitor = Monitor(Odd(), example_input={"x": "odd"})
    assert "act" in [entry["name"] for entry in monitor.layers]
    monitor.close()
    task = Task(Odd())
    task.example_input_array = {"x": "odd"}
    with pytest.warns(RuntimeWarning, match="could not trace Task on its example input.*odd input"):
        ActivationMonitor().engine.start(task, task.example_input_array)


def test_two_gradient_monitors_resume_their_own_state(tmp_path):
    """Two GradientMonitors in one Trainer checkpoint under their own state_key and resume to their own state."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    every_2, every_3 = GradientMonitor(every_n_steps=2), GradientMonitor(every_n_steps=3)
    assert every_2.state_key != every_3.state_key
    ckpt = tmp_path / "ckpt"
    trainer(tmp_path, max_steps=4, callbacks=[every_2, every_3, ModelCheckpoint(ckpt, save_last=True)],
            logger=False, enable_checkpointing=True).fit(Task(Net()))  # fmt: skip
    saved = torch.load(ckpt / "last.ckpt", weights_only=False)["callbacks"]
    assert saved[every_2.state_key]["last_logged_step"] == 2 and saved[every_3.state_key]["last_logged_step"] == 3
    again_2, again_3 = GradientMonitor(every_n_steps=2), GradientMonitor(every_n_steps=3)
    resumed = trainer(tmp_path, max_steps=7, callbacks=[again_2, again_3], logger=False)
    resumed.fit(Task(Net()), ckpt_path=ckpt / "last.ckpt")
    assert [s for s, _ in again_2.figures["grad_norm/total"]] == [4, 6]
    assert [s for s, _ in again_3.figures["grad_norm/total"]] == [6]


@pytest.mark.parametrize("arch", ["gpt2", "t5", "llama"])
def test_real_models_log_only_finite_figures(arch):
    """transformers' GPT-2, T5 and Llama, traced on their first call: no figure is NaN or inf. T5's `shared` embedding
    runs only through a tied copy and GPT-2's NewGELU (recognized by the trace) is not hooked before the first call:
    a module that did not run in a step has no figure there (its empty row read mean NaN, min +inf)."""
    from tests import zoo

    torch.manual_seed(0)
    case = getattr(zoo, arch)()
    model = case.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Monitor(model, every_n_steps=1, optimizer=optimizer) as monitor:
        for _ in range(2):
            optimizer.zero_grad()
            loss = zoo.main_output(zoo.run_model(model, case.example_input)).float().pow(2).mean()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    bad = [tag for tag, series in monitor.figures.items() if any(not math.isfinite(v) for _, v in series)]
    assert not bad, bad
    transmission = [series[-1][1] for tag, series in monitor.figures.items() if tag.startswith("act_transmission/")]
    assert transmission and all(0.3 < t < 3 for t in transmission)  # small GELU/SiLU inputs at init: ~0.55-1
