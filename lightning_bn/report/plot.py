"""Plot a run's monitor scalars with matplotlib: fastai's ``plot_layer_stats`` / ``color_dim`` for Lightning.

:func:`saturation_heatmap` renders a ``(layers, steps)`` grid of saturated fractions as an RGB image (what
:class:`~lightning_bn.ActivationMonitor` can log to TensorBoard); :func:`plot` draws a whole run, read from a log
directory or given as ``{tag: [(step, value)]}``, as a figure for a notebook: activation std, saturation and gradient
norm per layer over the steps, and the saturation heatmap.

Both use :class:`matplotlib.figure.Figure` with the Agg canvas, never ``pyplot``: no global state is touched, no figure
is left open, and they may run in any thread. matplotlib is imported when they are called.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_bn.tags import (
    ACT_SATURATION,
    ACT_STD,
    GRAD_NORM,
    TOTAL_GRADIENT_TAG,
    is_monitor_tag,
    layer_order,
    natural_key,
)

from .reading import find_runs, read_run

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot", "saturation_heatmap"]

_DPI = 100
#: height of one layer row of a heatmap, in pixels at ``_DPI``
_ROW_PX = 14
#: the heatmap's plot area is never lower than this many rows (room for its colorbar)
_MIN_ROWS = 5
#: width of the heatmap's plot area, in inches: ``_CELL_IN`` per step, within these bounds
_MIN_WIDTH_IN, _MAX_WIDTH_IN, _CELL_IN = 4.0, 10.0, 0.12
_MAX_LABEL = 48
#: line plots get a legend up to this many lines, a depth colorbar beyond
_MAX_LEGEND = 12
_MAX_LEGEND_LABEL = 40
_DEPTH_CMAP = "plasma"
_HEAT_CMAP = "viridis"


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - matplotlib is a dependency, the message is for broken installs
        raise ImportError(
            "lightning_bn plots need matplotlib, which is not installed: pip install matplotlib"
        ) from error
    return matplotlib


def _select_rows(grid: np.ndarray, max_layers: int) -> np.ndarray:
    """Indices of the rows to show, in their original order: all of them, or the ``max_layers`` most saturated ones
    by their latest finite value (ties broken by their worst value; rows never logged rank last).

    Example::

        >>> _select_rows(np.array([[0.1, 0.2], [0.9, np.nan], [0.5, 0.3], [np.nan, np.nan]]), 2).tolist()
        [1, 2]
    """
    grid = np.asarray(grid, dtype=np.float64)
    rows = grid.shape[0]
    if max_layers < 1:
        raise ValueError(f"Expected `max_layers` >= 1 but got {max_layers!r}")
    if rows <= max_layers:
        return np.arange(rows)
    finite = np.isfinite(grid)
    latest = np.full(rows, -np.inf)
    worst = np.full(rows, -np.inf)
    for i in range(rows):
        values = grid[i][finite[i]]
        if values.size:
            latest[i], worst[i] = values[-1], values.max()
    order = np.lexsort((np.arange(rows), -worst, -latest))  # last key first: by latest, then worst, then position
    return np.sort(order[:max_layers])


def _shorten(label: str, limit: int = _MAX_LABEL) -> str:
    """``label`` cut from the left to at most ``limit`` characters, keeping its end (where a layer name holds its
    block number and its kind), from a dot on where one is near the cut; never cut in the middle.

    Example::

        >>> _shorten("bert.encoder.layer.11.intermediate.act (gelu)", 36)
        '…layer.11.intermediate.act (gelu)'
    """
    if len(label) <= limit:
        return label
    start = len(label) - (limit - 1)
    tail = label[start:]
    dot = tail.find(".")
    # start at the next component when the cut falls inside one, unless that would leave a bare block number
    if label[start - 1] != "." and 0 <= dot < len(tail) // 3 and not tail[dot + 1 :].split(".")[0].isdigit():
        tail = tail[dot + 1 :]
    return "…" + tail


def _common_prefix(names: Sequence[str]) -> str:
    """The leading dotted components shared by all ``names`` (at least two), never a whole name, and never the
    component before a block number (``layer`` of ``layer.0``, which says what the number counts).

    Example::

        >>> _common_prefix(["bert.encoder.layer.0.act", "bert.encoder.layer.1.act"])
        'bert.encoder.'
    """
    if len(names) < 2:
        return ""
    parts = [str(name).split(".") for name in names]
    count = 0
    while count < min(len(p) for p in parts) - 1 and len({p[count] for p in parts}) == 1:
        count += 1
    while count and any(p[count].isdigit() for p in parts):
        count -= 1
    return ".".join(parts[0][:count]) + "." if count else ""


def _labels(
    names: Sequence[str], kinds: Sequence[str | None] | None = None, limit: int = _MAX_LABEL
) -> tuple[list[str], str]:
    """Labels for ``names`` (with ``" (<kind>)"``) and the prefix they leave out: all in full when they fit in
    ``limit`` characters, else without the prefix common to all of them and, if still too long, cut from the left
    (:func:`_shorten`), so the block numbers stay and the labels stay distinct."""
    kinds = kinds if kinds is not None else [None] * len(names)

    def label(name: str, kind: str | None) -> str:
        return f"{name} ({kind})" if kind else str(name)

    full = [label(name, kind) for name, kind in zip(names, kinds)]
    if all(len(text) <= limit for text in full):
        return full, ""
    prefix = _common_prefix(names)
    return [_shorten(label(str(name)[len(prefix) :], kind), limit) for name, kind in zip(names, kinds)], prefix


def _step_ticks(steps: Sequence[int], width_in: float) -> list[int]:
    """Column indices to label, about one every 0.8 inch: the columns at round step numbers where there are enough,
    else evenly spaced ones from the first to the last.

    Example::

        >>> _step_ticks(list(range(0, 400, 10)), 4.8)
        [0, 8, 16, 24, 32]
    """
    from matplotlib.ticker import MaxNLocator

    count, bins = len(steps), max(2, int(width_in / 0.8))
    if count <= bins:
        return list(range(count))
    column = {step: i for i, step in enumerate(steps)}
    nice = MaxNLocator(nbins=bins, integer=True).tick_values(min(steps), max(steps))
    ticks = [column[int(value)] for value in nice if value == int(value) and int(value) in column]
    if len(ticks) >= 2:
        return ticks
    return np.unique(np.linspace(0, count - 1, bins).round().astype(int)).tolist()


def saturation_heatmap(
    grid: Any,
    steps: Sequence[int],
    layers: Sequence[str],
    kinds: Sequence[str | None] | None = None,
    max_layers: int = 32,
) -> np.ndarray:
    """Render the saturated fraction of each layer at each step as an RGB image (``H x W x 3``, ``uint8``).

    Layers go down the y axis in the given order, labelled ``"<layer> (<kind>)"``, steps along the x axis, labelled
    with the step numbers; colours run from 0 to 1 (``viridis``, with a colorbar), grey where a layer was not logged.
    Each layer row is 14 pixels high. With more than ``max_layers`` layers only the ``max_layers`` most saturated
    (by their latest value) are shown, in their order, and the title says so.

    Args:
        grid: ``(len(layers), len(steps))`` fractions in [0, 1]; NaN where a layer was not logged at a step.
        steps: the step of each column.
        layers: the name of each row.
        kinds: each row's kind (e.g. its activation function), or ``None``.
        max_layers: the most rows shown.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: the shapes of ``grid``, ``steps``, ``layers`` and ``kinds`` do not agree.

    Example::

        >>> import numpy as np
        >>> image = saturation_heatmap(np.array([[0.1, 0.9]]), [0, 10], ["net.1"], ["relu"])
        >>> image.shape[2], image.dtype.name
        (3, 'uint8')
    """
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim == 1 and len(layers) == 1:
        grid = grid[None, :]
    steps, layers = list(steps), list(layers)
    if grid.shape != (len(layers), len(steps)):
        raise ValueError(
            f"Expected `grid` of shape (len(layers), len(steps)) = ({len(layers)}, {len(steps)}) but got {grid.shape}"
        )
    if kinds is not None and len(kinds) != len(layers):
        raise ValueError(f"Expected {len(layers)} `kinds` (one per layer) but got {len(kinds)}")
    total = len(layers)
    rows = _select_rows(grid, max_layers) if total else np.arange(0)
    grid = grid[rows]
    labels, prefix = _labels([layers[i] for i in rows], None if kinds is None else [kinds[i] for i in rows])

    width_in = min(max(_CELL_IN * len(steps), _MIN_WIDTH_IN), _MAX_WIDTH_IN)
    height_in = max(len(rows), _MIN_ROWS) * _ROW_PX / _DPI
    fig = Figure(figsize=(width_in + 0.3, height_in), dpi=_DPI, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    # the plot area and the colorbar get exact sizes in inches; the figure then grows around them to fit the labels
    boxes = {"plot": (0.0, 0.0, width_in, height_in), "colorbar": (width_in + 0.15, 0.0, 0.15, height_in)}
    ax, cax = fig.add_axes((0.0, 0.0, 1.0, 1.0)), fig.add_axes((0.0, 0.0, 1.0, 1.0))
    _place(fig, {ax: boxes["plot"], cax: boxes["colorbar"]}, (0.0, 0.0))
    cmap = _colormap(_HEAT_CMAP).with_extremes(bad="0.5")
    if grid.size:
        image = ax.imshow(
            np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest"
        )
    else:  # nothing logged: an empty plot that says so, with its colorbar
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        image = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
        ax.set_xlim(-0.5, max(len(steps), 1) - 0.5)
        ax.set_ylim(max(len(rows), 1) - 0.5, -0.5)
        ax.text(0.5, 0.5, "nothing logged", transform=ax.transAxes, ha="center", va="center", color="0.5")
    ax.set_yticks(np.arange(len(rows)), labels, fontsize=8)
    if steps:
        ticks = _step_ticks(steps, width_in)
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=8)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(length=2)
    title = "Saturated fraction per layer"
    if len(rows) < total:
        title += f"\n(top {len(rows)} of {total} layers by saturation)"
    if prefix:
        title += f"\n(names after {prefix}…)"
    ax.set_title(title, fontsize=10)
    colorbar = fig.colorbar(image, cax=cax)
    colorbar.set_label("saturated fraction", fontsize=8)
    colorbar.set_ticks([0.0, 0.5, 1.0] if height_in * _DPI < 200 else [0.0, 0.25, 0.5, 0.75, 1.0])
    colorbar.ax.tick_params(labelsize=7, length=2)

    # what savefig(bbox_inches="tight") does, without its PNG round trip: measure, then grow the figure around it
    tight = fig.get_tightbbox(canvas.get_renderer())
    pad = 0.1
    fig.set_size_inches(tight.width + 2 * pad, tight.height + 2 * pad)
    _place(fig, {ax: boxes["plot"], cax: boxes["colorbar"]}, (pad - tight.x0, pad - tight.y0))
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _place(fig: Figure, boxes: Mapping[Any, tuple[float, float, float, float]], offset: tuple[float, float]) -> None:
    """Put each axes at its ``(left, bottom, width, height)`` in inches, shifted by ``offset``."""
    width, height = fig.get_size_inches()
    for axes, (left, bottom, w, h) in boxes.items():
        axes.set_position(((left + offset[0]) / width, (bottom + offset[1]) / height, w / width, h / height))


def _colormap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


def _load(source: str | Path | Mapping[str, Any], run: str | None) -> tuple[dict, list | None, str]:
    """The monitor scalars, the layers table (or ``None``) and a name for the title of ``source``."""
    if isinstance(source, Mapping):
        if run is not None:
            raise ValueError("`run` picks one of several runs under a log directory; a mapping is a single run")
        scalars = {str(tag): list(series) for tag, series in source.items() if is_monitor_tag(str(tag))}
        if not scalars:
            raise ValueError(
                "The mapping holds no lightning-bn scalars (tags like 'act_std/<layer>' or 'grad_norm/<param>')"
            )
        return scalars, None, ""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"No such log directory: {path}")
    runs = find_runs(path)
    if not runs:
        raise FileNotFoundError(f"No TensorBoard event files under {path}: was it written by a TensorBoardLogger?")
    names = {(str(r.relative_to(path).as_posix()) if r != path else "."): r for r in runs}
    ordered = sorted(names, key=natural_key)  # version_10 after version_9
    if run is None:
        name = ordered[-1]
        if len(ordered) > 1:
            warnings.warn(
                f"{path} holds {len(ordered)} runs; plotting {name!r}, the last in natural order (pass `run=` to pick"
                f" another: {', '.join(repr(n) for n in ordered)})",
                stacklevel=3,
            )
    else:
        name = str(run) if str(run) in names else Path(run).as_posix()
        if name not in names:  # a run's own directory name, e.g. "version_1", when only one run has it
            matches = [n for n in ordered if n.rpartition("/")[2] == name]
            if len(matches) == 1:
                name = matches[0]
        if name not in names:
            raise ValueError(f"No run {str(run)!r} under {path}; available runs: {', '.join(ordered)}")
    run_dir = names[name]
    scalars, layers = read_run(run_dir)
    if not scalars:
        raise ValueError(
            f"No lightning-bn scalars in {run_dir} (were ActivationMonitor / GradientMonitor among the callbacks?)"
            + (f"; other runs: {', '.join(n for n in ordered if n != name)}" if len(ordered) > 1 else "")
        )
    return scalars, layers, name if name != "." else path.name


def _series(scalars: Mapping[str, Any], statistic: str) -> dict[str, list[tuple[int, float]]]:
    prefix = statistic + "/"
    return {tag[len(prefix) :]: list(series) for tag, series in scalars.items() if tag.startswith(prefix)}


def _grad_groups(grad: Mapping[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """Gradient norms by module (a parameter's name less its last component): ``sqrt(sum of squares)`` per step."""
    squares: dict[str, dict[int, float]] = {}
    for param, series in grad.items():
        module = param.rpartition(".")[0] or param
        per_step = squares.setdefault(module, {})
        for step, value in series:
            per_step[int(step)] = per_step.get(int(step), 0.0) + float(value) ** 2
    return {module: [(s, math.sqrt(v)) for s, v in sorted(per_step.items())] for module, per_step in squares.items()}


def _depth_colormap() -> Any:
    from matplotlib.colors import ListedColormap

    # plasma without its last, pale yellow part, unreadable as a line on white
    return ListedColormap(_colormap(_DEPTH_CMAP)(np.linspace(0.0, 0.85, 256)), name="depth")


def _draw_lines(
    fig: Figure,
    ax: Any,
    series: Mapping[str, list[tuple[int, float]]],
    order: Sequence[str],
    depth: Mapping[str, int],
    log: bool,
) -> None:
    """One line per name of ``order``, coloured by its ``depth`` (its place among all the run's layers, so a layer
    has the same colour in every panel); a legend for a few lines, a depth colorbar for many.

    With ``log``, a value of 0 (or below), which a log axis cannot show, is drawn as a ``v`` marker at the bottom of
    the axis (an extra line with the gid ``"zero:<name>"``), and the legend says so."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    cmap = _depth_colormap()
    norm = Normalize(0, max(len(depth) - 1, 1))
    labels, prefix = _labels(order, limit=_MAX_LEGEND_LABEL)
    for name, label in zip(order, labels):
        points = sorted(series[name])
        ax.plot(
            [s for s, _ in points],
            [v for _, v in points],
            color=cmap(norm(depth[name])),
            lw=1.2,
            marker=".",
            ms=3,
            label=label,
        )
    positive = [v for name in order for _, v in series[name] if math.isfinite(v) and v > 0]
    zeros = {name: [s for s, v in sorted(series[name]) if math.isfinite(v) and v <= 0] for name in order}
    zeros = {name: steps for name, steps in zeros.items() if steps}
    log = log and bool(positive)
    if log:
        ax.set_yscale("log", nonpositive="mask")
    handles, texts = ax.get_legend_handles_labels()
    if log and zeros:
        floor = 10.0 ** (math.floor(math.log10(min(positive))) - 1)
        for name, steps in zeros.items():
            (marker,) = ax.plot(steps, [floor] * len(steps), linestyle="none", marker="v", ms=5,
                                color=cmap(norm(depth[name])), clip_on=False, label="_zero")  # fmt: skip
            marker.set_gid(f"zero:{name}")
        ax.set_ylim(bottom=floor)
        handles.append(Line2D([], [], linestyle="none", marker="v", ms=5, color="0.3"))
        texts.append("0 (at the axis bottom)")
    legend = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 7, "frameon": False,
              "borderaxespad": 0.0}  # fmt: skip
    if not order:
        ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="0.5")
    elif len(order) <= _MAX_LEGEND:
        ax.legend(handles, texts, title=f"{prefix}…" if prefix else None, title_fontsize=7, **legend)
    else:
        colorbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=ax.inset_axes((1.02, 0.0, 0.015, 1.0)))
        colorbar.set_label("depth (layer index)", fontsize=7)
        colorbar.ax.tick_params(labelsize=7)
        if len(handles) > len(order):  # only the zero marker: its own small legend, left of the colorbar
            ax.legend(handles[len(order) :], texts[len(order) :], loc="lower left", fontsize=7, frameon=False)
    ax.grid(True, which="major", alpha=0.3)
    ax.tick_params(labelsize=8)


def plot(
    source: str | Path | Mapping[str, Sequence[tuple[int, float]]], run: str | None = None, *, heatmap: bool = True
) -> Figure:
    """Plot a run's activation std, saturation and gradient norm per layer over the steps, like fastai's
    ``plot_layer_stats`` / ``color_dim``.

    Three panels share the step axis: the output std of every watched layer (log scale), the saturated fraction of
    every activation (0 to 1), and the gradient norm of every module with parameters (its parameters' norms combined,
    ``sqrt(sum of squares)``; log scale); then, with ``heatmap``, the saturation heatmap (layers x steps). Layers go in
    forward order where the run has the layers table, else in the order of their tags, coloured by depth (dark = first);
    a legend names them up to 12 lines, a depth colorbar stands in for it beyond. On the log axes a value of 0 (a dead
    layer) is drawn as a ``v`` marker at the bottom of the axis, as the legend says. Long layer names lose the prefix
    common to all of them (the legend title or the heatmap title names it), then, if still too long, their start, so
    the end (the block number, the kind) stays.

    Args:
        source: a log directory written with the monitors and a ``TensorBoardLogger`` (it may hold several runs, e.g.
            ``lightning_logs/version_*``), or the scalars themselves, ``{tag: [(step, value)]}``.
        run: which run under ``source``, by its path relative to it (e.g. ``"lightning_logs/version_1"``) or, when
            no other run has it, by its own directory name (``"version_1"``); by default the last one in natural
            order of those paths (``version_10`` after ``version_9``), with a warning naming it when there are
            several. The figure's title names the run drawn.
        heatmap: add the saturation heatmap as a fourth panel (when any activation's saturation was logged).

    Returns:
        A :class:`matplotlib.figure.Figure` (not registered with ``pyplot``: a notebook shows it when it is the
        value of a cell; ``fig.savefig(...)`` writes it).

    Raises:
        ImportError: matplotlib is not installed.
        FileNotFoundError: ``source`` does not exist or holds no event files.
        ValueError: ``run`` is not one of the runs under ``source`` (the message lists them), or the run holds no
            lightning-bn scalars.

    Warns:
        UserWarning: ``source`` holds several runs and ``run`` is not given: it names the run drawn.

    Example::

        >>> fig = plot({"act_std/net.0": [(0, 1.0), (10, 0.5)], "act_saturation/net.1": [(0, 0.1), (10, 0.7)],
        ...             "grad_norm/net.0.weight": [(0, 0.3), (10, 0.2)], "grad_norm/net.0.bias": [(0, 0.4), (10, 0.1)]})
        >>> len(fig.axes), fig.axes[2].lines[0].get_ydata().round(3).tolist()
        (4, [0.5, 0.224])
    """
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    scalars, table, name = _load(source, run)
    std = _series(scalars, ACT_STD)
    saturation = _series(scalars, ACT_SATURATION)
    grad = {param: series for param, series in _series(scalars, GRAD_NORM).items()
            if f"grad_norm/{param}" != TOTAL_GRADIENT_TAG}  # fmt: skip
    groups = _grad_groups(grad)
    activations = list(dict.fromkeys(tag.partition("/")[2] for tag in scalars if tag.startswith("act_")))
    order = layer_order(activations, table, groups)
    depth = {name: i for i, name in enumerate(order)}
    std_order = [n for n in order if n in std]
    sat_order = [n for n in order if n in saturation]
    grad_order = [n for n in order if n in groups]

    show_heatmap = heatmap and bool(sat_order)
    heat_rows = min(len(sat_order), 32)
    heat_in = max(heat_rows, _MIN_ROWS) * _ROW_PX / _DPI + 0.5
    ratios = [2.4, 2.0, 2.4] + ([heat_in] if show_heatmap else [])
    fig = Figure(figsize=(11.0, sum(ratios) + 0.6), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid_spec = fig.add_gridspec(len(ratios), 1, height_ratios=ratios)
    ax_std = fig.add_subplot(grid_spec[0])
    ax_sat = fig.add_subplot(grid_spec[1], sharex=ax_std)
    ax_grad = fig.add_subplot(grid_spec[2], sharex=ax_std)

    _draw_lines(fig, ax_std, std, std_order, depth, log=True)
    ax_std.set_title("Activation std per layer", fontsize=10)
    ax_std.set_ylabel("output std", fontsize=9)
    _draw_lines(fig, ax_sat, saturation, sat_order, depth, log=False)
    ax_sat.set_ylim(-0.03, 1.03)
    ax_sat.set_title("Saturated fraction per activation", fontsize=10)
    ax_sat.set_ylabel("saturated fraction", fontsize=9)
    _draw_lines(fig, ax_grad, groups, grad_order, depth, log=True)
    ax_grad.set_title("Gradient norm per module (its parameters combined)", fontsize=10)
    ax_grad.set_ylabel("gradient norm", fontsize=9)
    panels = [ax_std, ax_sat, ax_grad]

    if show_heatmap:
        ax_heat = fig.add_subplot(grid_spec[3], sharex=ax_std)
        _draw_heatmap(fig, ax_heat, saturation, sat_order, table)
        panels.append(ax_heat)
    for ax in panels[:-1]:
        ax.tick_params(labelbottom=False)
    panels[-1].set_xlabel("step", fontsize=9)
    ax_std.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"lightning-bn: {name}" if name else "lightning-bn", fontsize=11)
    return fig


def _draw_heatmap(
    fig: Figure, ax: Any, saturation: Mapping[str, list[tuple[int, float]]], order: Sequence[str], table: list | None
) -> None:
    """The saturation heatmap as a panel of the figure: cells centred on their steps, so it shares the step axis."""
    steps = sorted({int(step) for name in order for step, _ in saturation[name]})
    column = {step: i for i, step in enumerate(steps)}
    grid = np.full((len(order), len(steps)), np.nan)
    for row, name in enumerate(order):
        for step, value in saturation[name]:
            grid[row, column[int(step)]] = value
    rows = _select_rows(grid, 32)
    entries = {entry["name"]: entry for entry in table or []}
    kinds = [entries.get(order[i], {}).get("activation") or entries.get(order[i], {}).get("module_type") for i in rows]
    labels, prefix = _labels([order[i] for i in rows], kinds)
    points = np.asarray(steps, dtype=np.float64)
    gaps = np.diff(points) if len(points) > 1 else np.array([1.0])
    edges = np.concatenate([[points[0] - gaps[0] / 2], (points[:-1] + points[1:]) / 2, [points[-1] + gaps[-1] / 2]])
    cmap = _colormap(_HEAT_CMAP).with_extremes(bad="0.5")
    mesh = ax.pcolormesh(
        edges, np.arange(len(rows) + 1) - 0.5, np.ma.masked_invalid(grid[rows]), cmap=cmap, vmin=0.0, vmax=1.0
    )
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first layer on top
    ax.set_yticks(np.arange(len(rows)), labels, fontsize=7)
    title = "Saturation heatmap"
    if len(rows) < len(order):
        title += f" (top {len(rows)} of {len(order)} layers by saturation)"
    if prefix:
        title += f" (names after {prefix}…)"
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8, length=2)
    colorbar = fig.colorbar(mesh, cax=ax.inset_axes((1.02, 0.0, 0.015, 1.0)))
    colorbar.set_label("saturated fraction", fontsize=7)
    colorbar.ax.tick_params(labelsize=7)
