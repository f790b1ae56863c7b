"""ActivationMonitor and GradientMonitor in a real Trainer: event files, cadence, hooks, warnings, bad arguments."""

import csv
import gc
import math
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_bn import ActivationMonitor, GradientMonitor
from tests.helpers import BoringClassifier, event_tags, mlp, read_scalars, state_of, trainer

ACT_STATS = ["act_mean", "act_std", "act_min", "act_max", "act_nonfinite", "act_zero"]


def test_event_files_hold_every_statistic(tmp_path):
    """A TensorBoard run writes all scalars, histograms, the layout and the saturation heatmap."""
    model = BoringClassifier(mlp(2, 16, nn.Tanh))
    t = trainer(
        tmp_path,
        logger=TensorBoardLogger(tmp_path),
        max_steps=4,
        callbacks=[ActivationMonitor(every_n_steps=2), GradientMonitor(every_n_steps=2, histograms=True)],
    )
    t.fit(model)
    tags = event_tags(tmp_path)
    scalars = set(tags["scalars"])
    for name in ["net.0", "net.1", "net.4"]:
        assert {f"{s}/{name}" for s in ACT_STATS} <= scalars
    assert {"act_saturation/net.1", "act_dead/net.1", "act_saturation/net.3"} <= scalars
    assert "act_saturation/net.0" not in scalars  # a Linear output has no saturation
    for p in ["net.0.weight", "net.0.bias", "net.4.weight"]:
        assert {f"grad_norm/{p}", f"weight_norm/{p}", f"update_ratio/{p}"} <= scalars
    assert "grad_norm/total" in scalars
    assert {"act_hist/net.1", "grad_hist/net.0.weight"} <= set(tags["histograms"])
    assert "act_saturation_heatmap" in tags["images"]
    assert "custom_scalars__config__" not in tags["tensors"]  # no layout by default: its charts would be empty
    values = read_scalars(tmp_path)
    assert [step for step, _ in values["act_std/net.1"]] == [0, 2]


def _layouts(logdir: Path) -> list:
    """Every custom-scalars layout event written under ``logdir``, parsed."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    found = []
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "custom_scalars__config__":
                    layout = layout_pb2.Layout()
                    layout.ParseFromString(value.tensor.string_val[0])
                    found.append(layout)
    return found


@pytest.mark.parametrize("gradient_first", [False, True])
def test_one_merged_layout_per_run_whatever_the_callback_order(tmp_path, gradient_first):
    """TensorBoard shows one custom-scalars layout per run: exactly one is written (with the opt-in per-layer
    scalars), holding both monitors' sections (activations first), whichever callback comes first."""
    callbacks = [ActivationMonitor(every_n_steps=2, per_layer_scalars=True),
                 GradientMonitor(every_n_steps=2, per_layer_scalars=True)]  # fmt: skip
    if gradient_first:
        callbacks.reverse()
    t = trainer(tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=4, callbacks=callbacks)
    t.fit(BoringClassifier(mlp(2, 16, nn.Tanh)))
    layouts = _layouts(tmp_path)
    assert len(layouts) == 1
    titles = [category.title for category in layouts[0].category]
    assert titles == ["lightning-bn: activations", "lightning-bn: gradients"]
    charts = {chart.title for category in layouts[0].category for chart in category.chart}
    assert {"act_std", "act_saturation", "grad_norm", "update_ratio"} <= charts


def test_logged_figures_equal_torch_on_the_same_tensor(tmp_path):
    """Logged mean/std/min/max of a layer equal torch's figures on that layer's output at that step (rel 1e-5)."""
    torch.manual_seed(0)
    model = BoringClassifier(mlp(2, 16, nn.ReLU), batch_size=64)
    seen = {}

    class Capture(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                seen["out"] = pl_module.net[:2](batch[0]).detach()

    t = trainer(
        tmp_path,
        logger=TensorBoardLogger(tmp_path),
        max_steps=1,
        callbacks=[Capture(), ActivationMonitor(every_n_steps=1, histograms=False)],
    )
    t.fit(model)
    values = {k: v[0][1] for k, v in read_scalars(tmp_path).items()}
    out = seen["out"]
    for stat, expected in [("mean", out.mean()), ("std", out.std()), ("min", out.min()), ("max", out.max())]:
        assert values[f"act_{stat}/net.1"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-7), stat


def test_csv_logger_gets_the_scalars(tmp_path):
    """Any Lightning logger gets the scalars (no TensorBoard extras, no error)."""
    model = BoringClassifier(mlp(2, 8, nn.Sigmoid))
    t = trainer(
        tmp_path,
        logger=CSVLogger(tmp_path),
        max_steps=3,
        callbacks=[ActivationMonitor(every_n_steps=1), GradientMonitor(every_n_steps=1)],
    )
    t.fit(model)
    rows = list(csv.DictReader(open(next(Path(tmp_path).rglob("metrics.csv")))))
    columns = set(rows[0])
    assert {"act_saturation/net.1", "act_std/net.2", "grad_norm/net.0.weight", "update_ratio/net.4.bias"} <= columns
    assert not list(Path(tmp_path).rglob("events.out.tfevents.*"))


def test_no_hook_on_steps_that_do_not_log_and_no_tensor_kept(tmp_path):
    """Hooks exist on logging steps only; after training no activation tensor is alive."""
    model = BoringClassifier(mlp(2, 8, nn.ReLU))
    hooks_per_step = {}
    outputs = []

    class Inspect(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            hooks_per_step[trainer.global_step] = sum(
                len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pl_module.modules()
            )

    class KeepWeakRefs(nn.Module):
        def forward(self, x):
            outputs.append(weakref.ref(x))
            return x

    model.net.append(KeepWeakRefs())
    t = trainer(
        tmp_path, logger=CSVLogger(tmp_path), max_steps=6, callbacks=[ActivationMonitor(every_n_steps=3), Inspect()]
    )
    t.fit(model)
    assert hooks_per_step[0] > 0 and hooks_per_step[3] > 0
    assert hooks_per_step[1] == hooks_per_step[2] == hooks_per_step[4] == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    del t
    gc.collect()
    assert outputs and all(ref() is None for ref in outputs)


def test_nonfinite_gradient_warning_names_the_right_layer(tmp_path):
    """A NaN gradient injected into the third Linear is reported as the first bad layer in forward order."""
    model = BoringClassifier(mlp(4, 8, nn.ReLU))
    model.net[4].weight.register_hook(lambda g: torch.full_like(g, math.nan))
    t = trainer(tmp_path, logger=CSVLogger(tmp_path), max_steps=2, callbacks=[GradientMonitor(every_n_steps=1)])
    with pytest.warns(RuntimeWarning, match=r"non-finite gradient at step 0.*'net\.4'.*parameter 'net\.4\.weight'"):
        t.fit(model)


def test_healthy_training_does_not_warn_about_gradients(tmp_path):
    """No non-finite warning when gradients are finite."""
    model = BoringClassifier(mlp(2, 8, nn.ReLU))
    t = trainer(tmp_path, logger=CSVLogger(tmp_path), max_steps=2, callbacks=[GradientMonitor(every_n_steps=1)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model)
    assert not [w for w in caught if "non-finite" in str(w.message)]


def test_gradient_accumulation_logs_on_optimizer_steps(tmp_path):
    """With accumulate_grad_batches=2, figures are logged per optimizer step (0, 1, 2), once each."""
    model = BoringClassifier(mlp(1, 8, nn.ReLU))
    t = trainer(
        tmp_path,
        logger=TensorBoardLogger(tmp_path),
        max_steps=3,
        accumulate_grad_batches=2,
        callbacks=[ActivationMonitor(every_n_steps=1), GradientMonitor(every_n_steps=1)],
    )
    t.fit(model)
    values = read_scalars(tmp_path)
    assert [s for s, _ in values["grad_norm/net.0.weight"]] == [0, 1, 2]
    assert [s for s, _ in values["act_std/net.1"]] == [0, 1, 2]


def test_frozen_parameters_are_skipped(tmp_path):
    """A frozen layer gets no gradient figures."""
    model = BoringClassifier(mlp(2, 8, nn.ReLU))
    model.net[0].requires_grad_(False)
    t = trainer(tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=2, callbacks=[GradientMonitor(every_n_steps=1)])
    t.fit(model)
    scalars = set(read_scalars(tmp_path))
    assert "grad_norm/net.2.weight" in scalars and "grad_norm/net.0.weight" not in scalars


def test_module_filter_by_pattern_type_and_predicate(tmp_path):
    """`modules` accepts glob patterns, types and a predicate."""
    for modules, expected in [
        (["net.1"], {"net.1"}),
        ([nn.Linear], {"net.0", "net.2"}),
        (lambda name, m: name == "net.2", {"net.2"}),
    ]:
        model = BoringClassifier(mlp(1, 8, nn.ReLU))
        t = trainer(
            tmp_path / str(len(expected)),
            logger=CSVLogger(tmp_path / str(len(expected))),
            max_steps=1,
            callbacks=[ActivationMonitor(every_n_steps=1, modules=modules)],
        )
        t.fit(model)
        rows = list(csv.DictReader(open(next(Path(t.logger.log_dir).rglob("metrics.csv")))))
        logged = {c.split("/", 1)[1] for c in rows[0] if c.startswith("act_std/")}
        assert logged == expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps.*0"),
        ({"every_n_steps": 2.5}, "every_n_steps.*2.5"),
        ({"modules": [42]}, "42"),
        ({"histogram_bins": -1}, "histogram_bins.*-1"),
    ],
)
def test_activation_monitor_rejects_bad_arguments(kwargs, match):
    """Bad arguments raise at construction, naming the value."""
    with pytest.raises(MisconfigurationException, match=match):
        ActivationMonitor(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [({"every_n_steps": -3}, "-3"), ({"norm_type": 0}, "norm_type.*0")])
def test_gradient_monitor_rejects_bad_arguments(kwargs, match):
    """Bad arguments raise at construction, naming the value."""
    with pytest.raises(MisconfigurationException, match=match):
        GradientMonitor(**kwargs)


def test_pattern_matching_nothing_names_the_pattern(tmp_path):
    """A `modules` pattern that matches no module fails before training, naming the pattern."""
    t = trainer(tmp_path, logger=CSVLogger(tmp_path), callbacks=[ActivationMonitor(modules=["encoder.*"])])
    with pytest.raises(MisconfigurationException, match=r"'encoder\.\*'"):
        t.fit(BoringClassifier(mlp(1, 8)))


class StepsSeen(Callback):
    """The global step at the start of each training batch."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)


def test_state_dict_resumes_the_cadence(tmp_path):
    """A real resume: fit to step 4 with ModelCheckpoint, then a new Trainer with a new
    ActivationMonitor(every_n_steps=3) resumes from that checkpoint to step 9. Across both runs the event files hold
    each figure at exactly the multiples of 3 (0, 3, 6), none repeated or skipped, and the new callback gets the first
    run's saturation history back."""
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    torch.manual_seed(0)
    first_steps = StepsSeen()
    first = trainer(
        tmp_path,
        logger=TensorBoardLogger(tmp_path, name="run", version=0),
        max_steps=4,
        callbacks=[ActivationMonitor(every_n_steps=3), first_steps, ModelCheckpoint(ckpt.parent, save_last=True)],
        enable_checkpointing=True,
    )
    first.fit(BoringClassifier(mlp(1, 8, nn.Tanh)))
    assert first_steps.steps == [0, 1, 2, 3]
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == 4
    state = state_of(saved, "ActivationMonitor")
    assert state["last_logged_step"] == 3 and [step for step, _ in state["history"]] == [0, 3]

    torch.manual_seed(1)
    resumed, second_steps = ActivationMonitor(every_n_steps=3), StepsSeen()
    assert resumed.state_dict() == {"last_logged_step": -1, "history": [], "warned_nonfinite": False}
    second = trainer(
        tmp_path,
        logger=TensorBoardLogger(tmp_path, name="run", version=0),
        max_steps=9,
        callbacks=[resumed, second_steps],
    )
    second.fit(BoringClassifier(mlp(1, 8, nn.Tanh)), ckpt_path=ckpt)
    assert second_steps.steps == [4, 5, 6, 7, 8]  # a resume, not a restart

    scalars = read_scalars(tmp_path)
    for tag in ["act_std/net.0", "act_std/net.1", "act_saturation/net.1", "act_std/net.2"]:
        assert sorted(step for step, _ in scalars[tag]) == [0, 3, 6], tag
    assert resumed.state_dict()["last_logged_step"] == 6
    assert [step for step, _ in resumed.state_dict()["history"]] == [0, 3, 6]


def test_gradient_monitor_hooks_only_the_first_batch(tmp_path):
    """GradientMonitor learns the forward order on the first batch; later non-logging steps carry no hook at all."""
    model = BoringClassifier(mlp(2, 8, nn.ReLU))
    hooks_per_step = {}

    class Inspect(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            hooks_per_step[trainer.global_step] = sum(len(m._forward_pre_hooks) for m in pl_module.modules())

    t = trainer(
        tmp_path, logger=CSVLogger(tmp_path), max_steps=4, callbacks=[GradientMonitor(every_n_steps=3), Inspect()]
    )
    t.fit(model)
    assert hooks_per_step[0] > 0
    assert hooks_per_step[1] == hooks_per_step[2] == hooks_per_step[3] == 0


def test_heatmap_is_a_readable_matplotlib_figure(tmp_path):
    """The saturation heatmap is a labelled figure (not a strip of pixels): at least 12 px per layer row, and far
    larger than the old 8 px per cell strip; its pixels vary (a drawn chart with axes and a colour bar)."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = trainer(
        tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=6, callbacks=[ActivationMonitor(every_n_steps=2)]
    )
    t.fit(BoringClassifier(mlp(4, 16, nn.Sigmoid)))
    acc = EventAccumulator(str(next(Path(tmp_path).rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    acc.Reload()
    event = acc.Images("act_saturation_heatmap")[-1]
    image = Image.open(io.BytesIO(event.encoded_image_string))
    layers = 4  # the four sigmoids
    image.save(tmp_path / "heatmap.png")
    assert image.height >= 12 * layers + 60 and image.width >= 300
    pixels = len(set(image.convert("RGB").getdata()))
    assert pixels > 50
