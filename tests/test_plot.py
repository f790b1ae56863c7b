"""lightning_bn.report.plot: the saturation heatmap image, and the figure of a real fit's TensorBoard logs."""

from __future__ import annotations

import math
import re
import shutil
import threading

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_bn import ActivationMonitor, GradientMonitor
from lightning_bn.report.plot import _select_rows, plot, saturation_heatmap
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
    assert "version_10" in plot(tmp_path)._suptitle.get_text()  # the newest, in natural order
    assert "version_9" in plot(tmp_path, run="lightning_logs/version_9")._suptitle.get_text()
    with pytest.raises(ValueError, match="lightning_logs/version_10") as error:
        plot(tmp_path, run="version_3")
    assert "version_3" in str(error.value) and "lightning_logs/version_9" in str(error.value)


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
