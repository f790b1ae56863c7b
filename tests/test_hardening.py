"""Real training setups: checkpoint resume, LightningCLI, bf16, manual optimization, shared modules, torch.compile,
non-finite activations."""

import csv
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_bn import ActivationMonitor, AutoInit, BatchNormGuard, BatchNormRecalibration, GradientMonitor
from lightning_bn.monitoring import ActivationProbe, select_modules
from tests.helpers import BoringClassifier, bn_mlp, mlp, random_data, read_scalars, state_of, trainer


def all_callbacks() -> list[Callback]:
    return [
        AutoInit(),
        ActivationMonitor(every_n_steps=2),
        GradientMonitor(every_n_steps=2),
        BatchNormGuard(),
        BatchNormRecalibration(num_batches=2),
    ]


def test_checkpoint_resume_with_every_callback(tmp_path):
    """Resuming keeps the cadence (no step logged twice or skipped) and ends with the checkpoint's weights."""
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = trainer(
        tmp_path, logger=logger, max_steps=4, callbacks=[*all_callbacks(), checkpoint], enable_checkpointing=True
    )
    first.fit(BoringClassifier(bn_mlp()))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert state_of(saved, "ActivationMonitor")["last_logged_step"] == 2
    assert state_of(saved, "GradientMonitor")["last_logged_step"] == 2

    seen = {}

    class WeightsAtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    resumed_monitor = ActivationMonitor(every_n_steps=2)
    callbacks = [AutoInit(), resumed_monitor, GradientMonitor(every_n_steps=2), WeightsAtStart()]
    second = trainer(
        tmp_path,
        logger=TensorBoardLogger(tmp_path, name="run", version=0),
        max_steps=8,
        callbacks=callbacks,
        enable_checkpointing=False,
    )
    second.fit(BoringClassifier(bn_mlp()), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for key, value in saved["state_dict"].items():
        assert torch.equal(seen[key], value), key
    steps = sorted(step for step, _ in read_scalars(tmp_path)["act_std/net.2"])
    assert steps == [0, 2, 4, 6]
    assert len(resumed_monitor.state_dict()["history"]) == 4  # the saturation history came back with the checkpoint


class CLIClassifier(BoringClassifier):
    def __init__(self, depth: int = 2, width: int = 16) -> None:
        super().__init__(mlp(depth, width, nn.Tanh))


def test_lightning_cli_yaml_configures_the_callbacks(tmp_path):
    """`LightningCLI` builds the callbacks from YAML (class_path / init_args) and the run logs their figures."""
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  accelerator: cpu
  max_steps: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_checkpointing: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: "{tmp_path}"}}
  callbacks:
    - class_path: lightning_bn.ActivationMonitor
      init_args: {{every_n_steps: 1, histograms: false}}
    - class_path: lightning_bn.GradientMonitor
      init_args: {{every_n_steps: 1, norm_type: 1.0}}
    - class_path: lightning_bn.AutoInit
      init_args: {{init: lsuv}}
    - class_path: lightning_bn.BatchNormGuard
      init_args: {{min_values_per_channel: 8}}
model:
  depth: 3
"""
    )
    cli = LightningCLI(CLIClassifier, args=["fit", "--config", str(config)], save_config_callback=None)
    by_type = {type(c).__name__: c for c in cli.trainer.callbacks}
    assert by_type["ActivationMonitor"].every_n_steps == 1 and by_type["ActivationMonitor"].histograms is False
    assert by_type["GradientMonitor"].norm_type == 1.0
    assert by_type["AutoInit"].init == "lsuv" and by_type["AutoInit"].report is not None
    assert by_type["BatchNormGuard"].min_values_per_channel == 8
    rows = list(csv.DictReader(open(next(Path(tmp_path).rglob("metrics.csv")))))
    assert {"act_std/net.5", "grad_norm/net.6.weight"} <= set(rows[0])


def _first_std(tmp_path, **kwargs) -> dict[str, float]:
    torch.manual_seed(0)
    model = BoringClassifier(mlp(2, 32, nn.GELU))
    t = trainer(
        tmp_path,
        logger=TensorBoardLogger(tmp_path),
        max_steps=1,
        callbacks=[ActivationMonitor(every_n_steps=1)],
        **kwargs,
    )
    t.fit(model)
    return {k.split("/")[1]: v[0][1] for k, v in read_scalars(tmp_path).items() if k.startswith("act_std/")}


def test_bf16_mixed_precision_figures_match_float32(tmp_path):
    """Under bf16 autocast the figures (accumulated in float) stay within bf16's precision of the float32 run."""
    full = _first_std(tmp_path / "fp32")
    half = _first_std(tmp_path / "bf16", precision="bf16-mixed")
    assert full.keys() == half.keys() and len(full) == 5
    for name, value in full.items():
        assert half[name] == pytest.approx(value, rel=0.03), name


class TwoOptimizers(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.critic = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_g, opt_c = self.optimizers()
        critic_loss = self.critic(self.generator(x[:, :8]).detach()).mean()
        opt_c.zero_grad()
        self.manual_backward(critic_loss)
        opt_c.step()
        generator_loss = -self.critic(self.generator(x[:, :8])).mean()
        opt_g.zero_grad()
        self.manual_backward(generator_loss)
        opt_g.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.generator.parameters(), lr=0.01), torch.optim.SGD(self.critic.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(random_data(64), batch_size=16)


def test_manual_optimization_with_two_optimizers(tmp_path):
    """Both optimizers' parameters get gradient figures; activations of both networks are watched."""
    t = trainer(
        tmp_path,
        logger=TensorBoardLogger(tmp_path),
        max_steps=4,
        callbacks=[ActivationMonitor(every_n_steps=2), GradientMonitor(every_n_steps=2)],
    )
    t.fit(TwoOptimizers())
    scalars = read_scalars(tmp_path)
    for tag in [
        "grad_norm/generator.0.weight",
        "grad_norm/critic.2.weight",
        "update_ratio/critic.0.bias",
        "act_saturation/critic.1",
        "act_dead/generator.1",
    ]:
        assert tag in scalars, tag
        assert all(math.isfinite(v) for _, v in scalars[tag])


def test_module_called_twice_counts_both_calls():
    """A module run twice in one forward is summarized over both outputs (mean/std/min/max of the two together)."""
    shared = nn.Linear(8, 8)
    outputs = []
    shared.register_forward_hook(lambda m, a, out: outputs.append(out.detach()))
    net = nn.ModuleDict({"shared": shared})
    probe = ActivationProbe(select_modules(net))
    with probe:
        x = torch.randn(16, 8)
        shared(shared(x) * 3)
    figures = probe.collect().figures[0]
    both = torch.cat(outputs)
    for key, expected in [("mean", both.mean()), ("std", both.std()), ("min", both.min()), ("max", both.max())]:
        assert figures[key] == pytest.approx(expected.item(), rel=1e-5), key


def test_torch_compiled_model_is_monitored_with_one_warning(tmp_path):
    """A torch.compile'd network gets the same figures under the same tags as the plain one (no `_orig_mod.`), with
    one warning, about graph breaks (the trace runs the compiled part eagerly: no "could not trace")."""
    plain = _first_std(tmp_path / "plain")
    torch.manual_seed(0)
    model = BoringClassifier(mlp(2, 32, nn.GELU))
    model.net = torch.compile(model.net, backend="eager")
    t = trainer(
        tmp_path / "compiled",
        logger=TensorBoardLogger(tmp_path / "compiled"),
        max_steps=1,
        callbacks=[ActivationMonitor(every_n_steps=1)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model)
    ours = [str(w.message) for w in caught if "ActivationMonitor" in str(w.message)]
    assert len(ours) == 1 and "torch.compile'd" in ours[0], ours
    scalars = read_scalars(tmp_path / "compiled")
    compiled = {k.split("/")[1]: v[0][1] for k, v in scalars.items() if k.startswith("act_std/")}
    assert compiled.keys() == plain.keys()
    for name, value in plain.items():
        assert compiled[name] == pytest.approx(value, rel=1e-5), name


def test_nonfinite_activations_never_crash_the_callbacks(tmp_path):
    """inf weights make inf/NaN activations and gradients: every callback keeps running and the counts are logged."""
    model = BoringClassifier(mlp(2, 16, nn.ReLU))
    with torch.no_grad():
        model.net[2].weight[0, 0] = math.inf
    callbacks = [
        ActivationMonitor(every_n_steps=1),
        GradientMonitor(every_n_steps=1, histograms=True),
        BatchNormGuard(),
    ]
    t = trainer(tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=2, callbacks=callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model)
    scalars = read_scalars(tmp_path)
    assert scalars["act_nonfinite/net.2"][0][1] > 0
    assert any("non-finite gradient" in str(w.message) for w in caught)
