"""lightning_bn.report.plot: the saturation heatmap image, and the figure of a real fit's TensorBoard logs."""

from __future__ import annotations

import math
import re
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_bn import ActivationMonitor, GradientMonitor
from lightning_bn.report.plot import _labels, _select_rows, plot, saturation_heatmap
from lightning_bn.report.reading import find_runs, read_layers, read_scalars
from tests.helpers import BoringClassifier, mlp, trainer

VIRIDIS_LOW = (68, 1, 84)  # viridis(0.0)
VIRIDIS_HIGH = (253, 231, 37)  # viridis(1.0)


def _near(image: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 12) -> np.ndarray:
    return np.all(np.abs(image.astype(int) - np.array(rgb)) <= tolerance, axis=-1)


def _heatmap(rows: int, steps: int = 2, **kwargs) -> np.ndarray:
    grid = np.linspace(0, 1, rows * steps).reshape(rows, steps)
    return saturation_heatmap(grid, list(range(0, 10 * steps, 10)), [f"net.{i}" for i in range(rows)], **kwargs)


# --- saturation_heatmap ---


def test_heatmap_is_rgb_uint8_with_a_white_margin_all_round():
    image = _heatmap(3, kinds=["relu", None, "tanh"])
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    # saved with a tight bounding box plus padding: nothing (labels, colorbar, title) is cut at an edge
    for edge in (image[:3], image[-3:], image[:, :3], image[:, -3:]):
        assert (edge == 255).all()


def test_heatmap_height_grows_at_least_12_px_per_layer():
    small, large = _heatmap(5), _heatmap(20)
    assert large.shape[0] - small.shape[0] >= 12 * 15
    # the width does not depend on the number of layers, beyond the labels
    assert abs(large.shape[1] - small.shape[1]) < 40
    for image in (small, large):
        assert 300 < image.shape[1] < 1400


def test_heatmap_width_is_bounded_in_steps():
    few, many = _heatmap(3, steps=2), _heatmap(3, steps=1000)
    assert 300 < few.shape[1] <= many.shape[1] < 1400


def test_heatmap_keeps_max_layers_rows():
    capped = _heatmap(57, max_layers=32)
    same_rows = _heatmap(32)
    full = _heatmap(57, max_layers=100)
    # 32 rows high (the title has one more line saying "top 32 of 57 layers")
    assert 0 <= capped.shape[0] - same_rows.shape[0] <= 20
    assert full.shape[0] - capped.shape[0] >= 12 * 25


def test_select_rows_keeps_the_most_saturated_by_latest_value_in_order():
    rng = np.random.default_rng(0)
    latest = rng.permutation(57) / 57.0
    grid = np.column_stack([rng.random(57), latest])
    kept = _select_rows(grid, 32)
    assert kept.tolist() == sorted(np.argsort(-latest)[:32].tolist())
    assert latest[kept].min() > np.delete(latest, kept).max()
    assert _select_rows(grid, 100).tolist() == list(range(57))


def test_select_rows_uses_the_latest_finite_value_then_the_worst():
    grid = np.array(
        [
            [0.9, 0.1],  # latest 0.1
            [0.2, np.nan],  # latest finite 0.2
            [np.nan, np.nan],  # never logged: last
            [0.5, 0.1],  # latest 0.1, worst 0.5
            [0.3, 0.1],  # latest 0.1, worst 0.3
        ]
    )
    assert _select_rows(grid, 1).tolist() == [1]
    assert _select_rows(grid, 2).tolist() == [0, 1]  # the tie at 0.1 goes to the worst (0.9)
    assert _select_rows(grid, 3).tolist() == [0, 1, 3]
    assert _select_rows(grid, 4).tolist() == [0, 1, 3, 4]
    with pytest.raises(ValueError, match="max_layers"):
        _select_rows(grid, 0)


def test_heatmap_colours_zero_one_and_missing():
    image = saturation_heatmap(np.array([[0.0, 1.0]]), [0, 10], ["net.1"], ["relu"])
    low, high = _near(image, VIRIDIS_LOW), _near(image, VIRIDIS_HIGH)
    # each cell is at least 200 x 60 pixels; the colorbar's ends add a few hundred at most
    assert low.sum() > 10_000 and high.sum() > 10_000
    assert np.nonzero(low)[1].mean() < np.nonzero(high)[1].mean()  # 0.0 left, 1.0 right
    missing = saturation_heatmap(np.array([[np.nan, 0.5]]), [0, 10], ["net.1"])
    assert _near(missing, (128, 128, 128), tolerance=3).sum() > 10_000
    assert _near(missing, VIRIDIS_LOW).sum() < 2_000  # the NaN cell is grey, not drawn as 0


def test_heatmap_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        saturation_heatmap(np.zeros((2, 2)), [0, 1, 2], ["a", "b"])
    with pytest.raises(ValueError, match="kinds"):
        saturation_heatmap(np.zeros((2, 2)), [0, 1], ["a", "b"], ["relu"])


def test_heatmap_of_nothing_logged_is_an_empty_image(recwarn):
    for grid, steps, layers in ((np.zeros((0, 0)), [], []), (np.zeros((2, 0)), [], ["a", "b"])):
        image = saturation_heatmap(grid, steps, layers)
        assert image.shape[2] == 3 and 100 < image.shape[0] < 300
    assert not [w for w in recwarn if "matplotlib" in w.filename or "plot.py" in w.filename]


def test_heatmap_leaves_no_figure_and_is_thread_safe():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    grid = np.random.default_rng(1).random((6, 8))
    expected = saturation_heatmap(grid, list(range(8)), [f"l{i}" for i in range(6)])
    results: list[np.ndarray] = []

    def render() -> None:
        results.append(saturation_heatmap(grid, list(range(8)), [f"l{i}" for i in range(6)]))

    threads = [threading.Thread(target=render) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    for image in results:
        assert np.array_equal(image, expected)
    assert plt.get_fignums() == before


# --- plot ---


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """A real fit: Tanh MLP, activations and gradients logged every 2 steps of 6, to TensorBoard."""
    root = tmp_path_factory.mktemp("plot_run")
    model = BoringClassifier(mlp(2, 16, nn.Tanh))
    trainer(
        root,
        max_steps=6,
        logger=TensorBoardLogger(root),
        callbacks=[ActivationMonitor(every_n_steps=2), GradientMonitor(every_n_steps=2)],
    ).fit(model)
    modules = {name.rpartition(".")[0] for name, _ in model.net.named_parameters()}
    return root, {f"net.{module}" for module in modules}


def _lines(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def test_plot_draws_the_logged_values_of_a_real_run(logdir):
    root, modules = logdir
    (run,) = find_runs(root)
    scalars = read_scalars(run)
    fig = plot(root)
    assert len(fig.axes) in (3, 4)
    std_ax, sat_ax, grad_ax = fig.axes[:3]

    std_layers = [tag.partition("/")[2] for tag in scalars if tag.startswith("act_std/")]
    lines = _lines(std_ax)
    assert list(lines) == [entry["name"] for entry in read_layers(run)] == std_layers  # forward order
    assert len(lines) == 5
    for layer, (x, y) in lines.items():
        assert x == [0, 2, 4]
        assert y == [value for _, value in scalars[f"act_std/{layer}"]]
    assert std_ax.get_yscale() == "log"

    sat_lines = _lines(sat_ax)
    assert list(sat_lines) == ["net.1", "net.3"]  # the two Tanh
    for layer, (x, y) in sat_lines.items():
        assert x == [0, 2, 4] and y == [value for _, value in scalars[f"act_saturation/{layer}"]]
    assert sat_ax.get_ylim()[0] < 0 and sat_ax.get_ylim()[1] > 1

    grad_lines = _lines(grad_ax)
    assert set(grad_lines) == modules and len(grad_lines) == 3  # net.0, net.2, net.4: the three Linear
    weight, bias = scalars["grad_norm/net.2.weight"], scalars["grad_norm/net.2.bias"]
    expected = [math.sqrt(w**2 + b**2) for (_, w), (_, b) in zip(weight, bias)]
    np.testing.assert_allclose(grad_lines["net.2"][1], expected, rtol=1e-12)
    assert grad_ax.get_yscale() == "log"

    for ax in fig.axes:
        assert ax.get_title()
    assert "version_0" in fig._suptitle.get_text()
    if len(fig.axes) == 4:  # the heatmap: the two activations, labelled with their kind
        labels = [tick.get_text() for tick in fig.axes[3].get_yticklabels()]
        assert labels == ["net.1 (tanh)", "net.3 (tanh)"]
    # the figure renders
    fig.canvas.draw()
    assert fig.canvas.buffer_rgba().shape[0] > 500


def test_plot_of_a_mapping_matches_the_directory(logdir):
    root, _ = logdir
    scalars = read_scalars(find_runs(root)[0])
    from_dir, from_mapping = plot(root), plot(scalars)
    for ax_dir, ax_map in zip(from_dir.axes[:3], from_mapping.axes[:3]):
        assert _lines(ax_dir) == _lines(ax_map)
    without = plot(scalars, heatmap=False)
    assert len(without.axes) == 3
    with pytest.raises(ValueError, match="lightning-bn scalars"):
        plot({"train_loss": [(0, 1.0)]})


def test_plot_picks_a_run(logdir, tmp_path):
    root, _ = logdir
    (run,) = find_runs(root)
    for version in ("version_9", "version_10"):
        shutil.copytree(run, tmp_path / "lightning_logs" / version)
    with pytest.warns(UserWarning, match=r"holds 2 runs; plotting 'lightning_logs/version_10'") as record:
        fig = plot(tmp_path)
    assert "version_10" in fig._suptitle.get_text()  # the last, in natural order
    assert "run=" in str(record[0].message) and "'lightning_logs/version_9'" in str(record[0].message)
    assert record[0].filename == __file__  # pointed at the caller of plot
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a named run, or a single one: no warning
        assert "version_9" in plot(tmp_path, run="lightning_logs/version_9")._suptitle.get_text()
        assert "version_9" in plot(tmp_path, run="version_9")._suptitle.get_text()  # by its own name
        assert "version_0" in plot(root)._suptitle.get_text()
    with pytest.raises(ValueError, match="lightning_logs/version_10") as error:
        plot(tmp_path, run="version_3")
    assert "'version_3'" in str(error.value) and "lightning_logs/version_9" in str(error.value)


def test_plot_run_by_its_own_name_must_be_unique(logdir, tmp_path):
    root, _ = logdir
    (run,) = find_runs(root)
    for parent in ("a", "b"):
        shutil.copytree(run, tmp_path / parent / "version_0")
    with pytest.raises(ValueError, match=r"No run 'version_0' under .*available runs: a/version_0, b/version_0"):
        plot(tmp_path, run="version_0")
    assert "b/version_0" in plot(tmp_path, run="b/version_0")._suptitle.get_text()
    assert "b/version_0" in plot(tmp_path, "b/version_0", heatmap=False)._suptitle.get_text()  # positional, as before


def test_plot_explains_a_directory_without_monitor_scalars(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty))):
        plot(empty)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing"))):
        plot(str(tmp_path / "missing"))

    from torch.utils.tensorboard import SummaryWriter

    other = tmp_path / "other"
    with SummaryWriter(other) as writer:
        writer.add_scalar("train_loss", 1.0, 0)
    with pytest.raises(ValueError, match="No lightning-bn scalars") as error:
        plot(other)
    assert str(other) in str(error.value)


class _Unsorted(nn.Module):
    """Registered b_out, a_in, c_hidden; runs a_in -> tanh -> c_hidden -> relu -> b_out: registration order, name
    order and forward order all differ."""

    def __init__(self) -> None:
        super().__init__()
        self.b_out, self.a_in, self.c_hidden = nn.Linear(32, 10), nn.Linear(64, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.b_out(torch.relu(self.c_hidden(torch.tanh(self.a_in(x)))))


def test_plot_and_report_list_layers_in_the_same_order(tmp_path):
    """One layer ordering: `plot` draws the layers in the order `lightning-bn report` lists them (forward order),
    with the layers table and from the bare scalars alike."""
    from lightning_bn import analyze

    torch.manual_seed(0)
    monitors = [ActivationMonitor(every_n_steps=1), GradientMonitor(every_n_steps=1)]
    trainer(tmp_path, logger=TensorBoardLogger(tmp_path), max_steps=2, callbacks=monitors).fit(
        BoringClassifier(_Unsorted())
    )
    run = find_runs(tmp_path)[0]
    forward = ["net.a_in", "net.a_in.tanh", "net.c_hidden", "net.c_hidden.relu", "net.b_out"]
    for source, layers in ((tmp_path, read_layers(run)), (read_scalars(run), None)):
        report = [layer.name for layer in analyze(read_scalars(run), layers=layers).layers]
        assert report == forward, layers is not None
        fig = plot(source)
        drawn = fig.axes[0].get_legend_handles_labels()[1]
        assert [name for name in report if name in drawn] == drawn == forward


# --- long layer names, zeros on log axes ---

BERT_GELU = [f"bert.bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(6)]


def _assert_keeps_blocks(labels: list[str], limit: int) -> None:
    assert len(set(labels)) == len(labels) == 6
    for i, label in enumerate(labels):
        assert f"layer.{i}.intermediate.intermediate_act_fn" in label, label
        assert len(label) <= limit
        assert "…" not in label[1:]  # cut from the left, if at all, never in the middle


def test_long_names_lose_their_common_prefix_not_their_block_numbers():
    labels, prefix = _labels(BERT_GELU, ["gelu"] * 6)
    assert prefix == "bert.bert.encoder."  # not "...layer.": the word before a block number stays
    assert labels == [f"layer.{i}.intermediate.intermediate_act_fn (gelu)" for i in range(6)]
    _assert_keeps_blocks(labels, 48)
    # with other rows the common prefix is short: the long names are cut from the left, keeping their end
    labels, prefix = _labels(
        [*BERT_GELU, "bert.bert.embeddings.LayerNorm", "bert.classifier"], ["gelu"] * 6 + [None] * 2
    )
    assert prefix == "bert."
    assert labels[0] == "…layer.0.intermediate.intermediate_act_fn (gelu)" and len(labels[0]) == 48
    assert labels[6:] == ["bert.embeddings.LayerNorm", "classifier"]
    _assert_keeps_blocks(labels[:6], 48)
    # short names stay whole, prefix and all
    assert _labels(["net.1", "net.3"], ["tanh", None]) == (["net.1 (tanh)", "net.3"], "")
    assert _labels(["x" * 60])[0] == ["…" + "x" * 47]


def test_heatmap_image_labels_keep_block_numbers(monkeypatch):
    from matplotlib.axes import Axes

    drawn: list[list[str]] = []
    set_yticks = Axes.set_yticks

    def record(self, ticks, labels=None, **kwargs):
        if labels is not None:
            drawn.append([str(label) for label in labels])
        return set_yticks(self, ticks, labels, **kwargs)

    monkeypatch.setattr(Axes, "set_yticks", record)
    image = saturation_heatmap(np.linspace(0, 1, 12).reshape(6, 2), [0, 10], BERT_GELU, ["gelu"] * 6)
    assert image.shape[2] == 3
    (labels,) = drawn
    _assert_keeps_blocks(labels, 48)
    assert labels[5] == "layer.5.intermediate.intermediate_act_fn (gelu)"


def test_plot_labels_keep_block_numbers_in_legend_and_heatmap():
    scalars = {
        f"act_{statistic}/{name}": [(0, 0.5), (10, 0.25)] for name in BERT_GELU for statistic in ("std", "saturation")
    }
    fig = plot(scalars)
    for ax in fig.axes[:2]:
        handles, labels = ax.get_legend_handles_labels()
        _assert_keeps_blocks(labels, 40)
        assert ax.get_legend().get_title().get_text() == "bert.bert.encoder.…"
    heat = fig.axes[3]
    _assert_keeps_blocks([tick.get_text() for tick in heat.get_yticklabels()], 48)
    assert "bert.bert.encoder." in heat.get_title()


def test_plot_shows_zeros_on_log_axes_at_the_bottom():
    scalars = {
        "act_std/net.0": [(0, 1.0), (10, 0.0), (20, 0.5)],  # dead at step 10
        "act_std/net.1": [(0, 0.2), (10, 0.1), (20, 0.05)],
        "grad_norm/net.0.weight": [(0, 0.3), (10, 0.0), (20, 0.0)],
        "grad_norm/net.1.weight": [(0, 0.02), (10, 0.01), (20, 0.01)],
    }
    fig = plot(scalars)
    std_ax, _, grad_ax = fig.axes[:3]
    for ax, name, steps, smallest in ((std_ax, "net.0", [10], 0.05), (grad_ax, "net.0", [10, 20], 0.01)):
        assert ax.get_yscale() == "log"
        (zero,) = [line for line in ax.lines if line.get_gid() == f"zero:{name}"]
        bottom = ax.get_ylim()[0]
        assert list(zero.get_xdata()) == steps
        assert list(zero.get_ydata()) == [bottom] * len(steps)
        assert 0 < bottom < smallest and zero.get_marker() == "v" and not zero.get_clip_on()
        legend = [text.get_text() for text in ax.get_legend().get_texts()]
        assert legend == ["net.0", "net.1", "0 (at the axis bottom)"]
    # the layer's own line still holds the true values (0 included), and the colour matches the marker's
    (line,) = [line for line in std_ax.lines if line.get_label() == "net.0"]
    assert list(line.get_ydata()) == [1.0, 0.0, 0.5]
    (zero,) = [line for line in std_ax.lines if line.get_gid() == "zero:net.0"]
    assert zero.get_color() == line.get_color()
    # without zeros there is no marker and no legend entry for it
    clean = plot({"act_std/net.1": scalars["act_std/net.1"]})
    assert [t.get_text() for t in clean.axes[0].get_legend().get_texts()] == ["net.1"]
    assert not [line for line in clean.axes[0].lines if line.get_gid()]


def test_plot_shows_zeros_with_many_layers_too():
    scalars = {f"act_std/net.{i}": [(0, 1.0 + i), (10, 0.0 if i == 7 else 0.5)] for i in range(20)}
    ax = plot(scalars).axes[0]
    (zero,) = [line for line in ax.lines if line.get_gid() == "zero:net.7"]
    assert list(zero.get_xdata()) == [10] and list(zero.get_ydata()) == [ax.get_ylim()[0]]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["0 (at the axis bottom)"]
