"""``per_layer_scalars=False`` (the default): a logging step's per-layer figures as one compact TensorBoard record
(``lightning_bn/rows``), a handful of model-wide scalars, and the same diagnosis as from per-layer scalars."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lightning_bn import ActivationMonitor, GradientMonitor, Monitor
from lightning_bn.monitoring import MonitorOptions
from lightning_bn.report import analyze
from lightning_bn.report.reading import read_rows, read_run, read_scalars
from lightning_bn.tags import (
    NONFINITE_LAYERS_TAG,
    NONFINITE_PARAMETERS_TAG,
    ROWS_PLUGIN,
    ROWS_TAG,
    TOTAL_GRADIENT_TAG,
    is_row_tag,
)
from tests.helpers import BoringClassifier, mlp, random_data, trainer

STEPS, EVERY, FAULT_STEP = 20, 2, 10


class ZeroLayerAt(Callback):
    """Zeroes ``net.6`` (a hidden Linear: weight and bias) before step ``FAULT_STEP``: everything after it goes flat."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == FAULT_STEP:
            with torch.no_grad():
                pl_module.net[6].weight.zero_()
                pl_module.net[6].bias.zero_()


def _fit(root: Path, name: str, per_layer_scalars: bool | None, extra_logger: bool = False) -> Path:
    """``per_layer_scalars=None``: the monitors' default."""
    torch.manual_seed(0)
    net = mlp(7, 32, nn.ReLU)  # 8 Linears + 7 ReLUs: 15 watched layers, 16 parameters
    model = BoringClassifier(net, lr=0.1, batch_size=32, data=random_data(32 * STEPS))
    option = {} if per_layer_scalars is None else {"per_layer_scalars": per_layer_scalars}
    monitors = [ActivationMonitor(every_n_steps=EVERY, **option), GradientMonitor(every_n_steps=EVERY, **option),
                ZeroLayerAt()]  # fmt: skip
    tb = TensorBoardLogger(root, name=name)
    loggers = [tb, CSVLogger(root, name=f"{name}_csv")] if extra_logger else tb
    trainer(root, logger=loggers, max_steps=STEPS, callbacks=monitors).fit(model)
    return Path(tb.log_dir)


def _tags(run: Path) -> dict[str, list[str]]:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc, acc.Tags()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("compact")
    return _fit(root, "per_layer", True), _fit(root, "compact", None, extra_logger=True), root


def _flags(health) -> dict[str, dict[str, int]]:
    return {layer.name: {n: f.first_step for n, f in layer.flags.items()} for layer in health.layers if layer.flags}


def test_compact_run_writes_few_scalar_tags_and_one_record_per_step(runs):
    per_layer, compact, _ = runs
    _, before = _tags(per_layer)
    acc, after = _tags(compact)
    layers = read_run(compact)[1]
    assert layers is not None and len(layers) >= 12
    assert len(before["scalars"]) > 100  # one card per figure and layer
    assert len(after["scalars"]) <= 20, after["scalars"]
    assert not any(is_row_tag(t) for t in after["scalars"])
    assert {TOTAL_GRADIENT_TAG, "lightning_bn/loss", NONFINITE_LAYERS_TAG, NONFINITE_PARAMETERS_TAG} <= set(
        after["scalars"]
    )
    assert ROWS_TAG in after["tensors"]
    events = acc.Tensors(ROWS_TAG)
    # one record per monitor and logging step (ActivationMonitor's and GradientMonitor's)
    assert sorted(e.step for e in events) == sorted(list(range(0, STEPS, EVERY)) * 2)
    # the record's format, as documented in lightning_bn.writers
    assert acc.SummaryMetadata(ROWS_TAG).plugin_data.plugin_name == ROWS_PLUGIN
    content = json.loads(acc.SummaryMetadata(ROWS_TAG).plugin_data.content)
    assert content["version"] == 1 and len(content["present"]) == len(content["rows"])
    from tensorboard.util import tensor_util

    matrix = tensor_util.make_ndarray(events[0].tensor_proto)
    assert matrix.dtype == np.float32 and matrix.shape == (len(content["rows"]), len(content["figures"]))
    assert not any(t for t in after.get("scalars", []) if t.startswith("act_")), "no per-layer cards"


def test_compact_and_per_layer_runs_get_the_same_diagnosis(runs):
    per_layer, compact, _ = runs
    scalars_a, layers_a = read_run(per_layer)
    scalars_b, layers_b = read_run(compact)
    assert layers_a == layers_b
    assert set(scalars_a) == set(scalars_b)
    for statistic in {t.split("/")[0] for t in scalars_a}:  # each statistic's layers in the same (depth) order
        assert [t for t in scalars_a if t.startswith(f"{statistic}/")] == [
            t for t in scalars_b if t.startswith(f"{statistic}/")
        ], statistic
    for key, series in scalars_a.items():
        assert [s for s, _ in series] == [s for s, _ in scalars_b[key]], key
        np.testing.assert_allclose([v for _, v in series], [v for _, v in scalars_b[key]], rtol=1e-5, atol=1e-6)
    (a,) = analyze(per_layer)
    (b,) = analyze(compact)
    flags_a, flags_b = _flags(a), _flags(b)
    assert flags_a == flags_b
    assert any(step >= FAULT_STEP for flags in flags_a.values() for step in flags.values()), flags_a


def test_cli_and_plot_read_a_compact_run(runs, capsys):
    from lightning_bn.cli import main

    per_layer, compact, _ = runs
    outputs = []
    for run in (per_layer, compact):
        code = main(["report", str(run), "--format", "json"])
        outputs.append((code, json.loads(capsys.readouterr().out)))
    (code_a, report_a), (code_b, report_b) = outputs
    assert code_a == code_b
    assert list(report_a["runs"].values())[0]["layers"] == list(report_b["runs"].values())[0]["layers"]

    import matplotlib

    matplotlib.use("Agg")
    from lightning_bn import plot

    figure = plot(compact)
    assert figure is not None


def test_other_loggers_keep_every_scalar(runs):
    _, compact, root = runs
    metrics = next((root / "compact_csv").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert sum(is_row_tag(column) for column in metrics) > 100


def test_read_rows_gives_layers_by_steps_for_both_forms(runs):
    per_layer, compact, _ = runs
    rows_a, rows_b = read_rows(per_layer), read_rows(compact)
    assert set(rows_a) == set(rows_b) and "act_std" in rows_a and "grad_norm" in rows_a
    for figure, (steps, names, values) in rows_b.items():
        steps_a, names_a, values_a = rows_a[figure]
        assert steps == steps_a and names == names_a, figure
        assert values.shape == (len(names), len(steps))
        np.testing.assert_allclose(values, values_a, rtol=1e-5, atol=1e-6, equal_nan=True)
    steps, names, values = rows_b["act_std"]
    assert steps == list(range(0, STEPS, EVERY))
    assert "grad_norm" in rows_b and TOTAL_GRADIENT_TAG.split("/")[1] not in rows_b["grad_norm"][1]


def test_monitor_in_a_plain_loop_with_a_summary_writer(tmp_path):
    torch.manual_seed(0)
    net = mlp(6, 16, nn.Tanh, in_features=8, out_features=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    runs = {}
    for per_layer in (True, False):
        run = tmp_path / ("per_layer" if per_layer else "compact")
        torch.manual_seed(1)
        net_copy = mlp(6, 16, nn.Tanh, in_features=8, out_features=2)
        net_copy.load_state_dict(net.state_dict())
        opt = torch.optim.SGD(net_copy.parameters(), lr=0.1)
        with SummaryWriter(run) as writer, Monitor(net_copy, 2, writer, per_layer_scalars=per_layer) as monitor:
            for step in range(6):
                opt.zero_grad()
                loss = net_copy(torch.randn(16, 8)).pow(2).mean()
                loss.backward()
                if step == 3:
                    with torch.no_grad():
                        net_copy[4].weight.fill_(math.nan)
                opt.step()
                figures = monitor.step(loss)
                assert figures is None or any(is_row_tag(t) for t in figures)  # what step returns is unchanged
        runs[per_layer] = run
    _, tags = _tags(runs[False])
    assert len(tags["scalars"]) <= 20 and ROWS_TAG in tags["tensors"]
    assert read_scalars(runs[True]).keys() == read_scalars(runs[False]).keys()
    acc, _ = _tags(runs[False])
    nonfinite = [e.value for e in acc.Scalars(NONFINITE_LAYERS_TAG)]
    assert nonfinite[0] == 0 and nonfinite[-1] > 0  # the NaN weight shows in the Scalars tab
    assert _flags(analyze(runs[True])[0]) == _flags(analyze(runs[False])[0])


@pytest.mark.parametrize("bad", [0, 1, "no", None])
def test_per_layer_scalars_is_checked(bad):
    with pytest.raises(ValueError, match="per_layer_scalars"):
        MonitorOptions(per_layer_scalars=bad)
    with pytest.raises(MisconfigurationException, match="per_layer_scalars"):
        ActivationMonitor(per_layer_scalars=bad)
    with pytest.raises(ValueError, match="per_layer_scalars"):
        Monitor(nn.Linear(2, 2), per_layer_scalars=bad)


def test_default_is_compact_and_keeps_the_checkpoint_key():
    assert MonitorOptions().per_layer_scalars is False
    assert ActivationMonitor().per_layer_scalars is False and GradientMonitor().per_layer_scalars is False
    # a checkpoint written before the option existed (no key for it) restores into the default callbacks
    assert "per_layer_scalars" not in ActivationMonitor().state_key
    assert "per_layer_scalars" in ActivationMonitor(per_layer_scalars=True).state_key


def test_histograms_false_writes_no_activation_histogram(tmp_path):
    """`histograms=False` was never consulted: every logging step wrote a histogram per watched activation."""
    from torch.utils.tensorboard import SummaryWriter

    from lightning_bn import Monitor

    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    counts = {}
    for histograms in (True, False):
        writer = SummaryWriter(str(tmp_path / str(histograms)))
        with Monitor(net, every_n_steps=1, writer=writer, histograms=histograms) as monitor:
            for _ in range(2):
                net(torch.randn(16, 4)).pow(2).mean().backward()
                monitor.step()
        writer.close()
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / str(histograms)), size_guidance={"histograms": 0}).Reload()
        counts[histograms] = len(events.Tags()["histograms"])
    assert counts[True] > 0 and counts[False] == 0, counts


from lightning.pytorch import LightningModule  # noqa: E402  (appended with the BERT-sized test)


class _Bert(LightningModule):
    """A transformers BertForSequenceClassification (small widths, real depth pattern) in a LightningModule."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=16, num_labels=2)  # fmt: skip
        self.bert = BertForSequenceClassification(config)

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return self.bert(input_ids=ids, labels=labels).loss

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(
            torch.randint(0, 100, (32, 12), generator=generator), torch.randint(0, 2, (32,), generator=generator)
        )
        return torch.utils.data.DataLoader(data, batch_size=8)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class _KillIntermediate(Callback):
    """Zeroes encoder layer 3's intermediate dense (weight and bias) at step 6: its GELU outputs a constant."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 6:
            dense = pl_module.bert.bert.encoder.layer[3].intermediate.dense
            with torch.no_grad():
                dense.weight.zero_()
                dense.bias.zero_()


def test_bert_sized_run_keeps_the_scalars_tab_small_and_the_report_the_same(tmp_path, capsys):
    """A BERT-depth model (6 layers, >= 60 watched modules) with a layer killed at step 6: by default the run leaves
    <= 20 scalar tags (per_layer_scalars=True: hundreds), and `lightning-bn report` says the same of both runs."""
    pytest.importorskip("transformers")
    from lightning_bn.cli import main

    counts, watched, reports = {}, 0, {}
    for per_layer in (True, None):
        torch.manual_seed(0)
        model = _Bert()
        option = {} if per_layer is None else {"per_layer_scalars": per_layer}
        monitors = [ActivationMonitor(every_n_steps=2, **option), GradientMonitor(every_n_steps=2, **option),
                    _KillIntermediate()]  # fmt: skip
        tb = TensorBoardLogger(tmp_path, name=f"per_layer_{per_layer}")
        trainer(tmp_path, logger=tb, max_steps=12, log_every_n_steps=2, callbacks=monitors).fit(model)
        _, tags = _tags(Path(tb.log_dir))
        counts[per_layer] = len(tags["scalars"])
        watched = max(watched, len(read_run(Path(tb.log_dir))[1] or ()))
        capsys.readouterr()
        code = main(["report", tb.log_dir, "--format", "json"])
        reports[per_layer] = (code, next(iter(json.loads(capsys.readouterr().out)["runs"].values())))
    assert watched >= 60, watched
    assert counts[None] <= 20, f"default: {counts[None]} scalar tags (per-layer: {counts[True]})"
    assert counts[True] > 200, f"per-layer: {counts[True]} scalar tags (default: {counts[None]})"
    (code_a, report_a), (code_b, report_b) = reports[True], reports[None]
    assert code_a == code_b and report_a["layers"] == report_b["layers"]
    flagged = {name: layer for name, layer in report_b["layers"].items() if layer["flags"]}
    killed = "bert.bert.encoder.layer.3.intermediate.intermediate_act_fn"
    assert killed in flagged and min(f["first_step"] for f in flagged[killed]["flags"].values()) == 6, flagged
    assert len(flagged) <= 6, sorted(flagged)  # the killed block's rows, not the whole model
    print(f"scalar tags: default {counts[None]}, per-layer {counts[True]}, watched {watched}; {sorted(flagged)}")
