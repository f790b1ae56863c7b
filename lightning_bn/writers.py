"""Write monitor figures to any Lightning logger; TensorBoard extras only when a TensorBoard logger is present.

Scalars go to every logger through ``log_metrics``. With a :class:`~lightning.pytorch.loggers.TensorBoardLogger`
(or any logger whose ``experiment`` is a ``SummaryWriter``) we also write histograms, a custom-scalars layout
that overlays all layers in one chart per statistic, text, and images such as the saturation heatmap.
"""

from __future__ import annotations

import os
import weakref
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "fast_tensorboard_crc",
    "heatmap_image",
    "flush_layout",
    "forget_layout",
    "log_histograms",
    "log_image",
    "log_scalars",
    "log_text",
    "metric_key",
    "remember",
    "tensorboard_writers",
    "write_layout",
    "write_scalars",
]


#: logged steps of each figure a monitor keeps on the host (for HealthCheck, the heatmap, ``Monitor.figures``)
HISTORY = 1000


def remember(history: dict[str, deque[tuple[int, float]]], metrics: Mapping[str, float], step: int) -> None:
    """Append the figures just logged (host floats, already transferred) to ``history``: tag -> the latest
    :data:`HISTORY` ``(step, value)`` pairs.

    Example::

        >>> history = {}
        >>> remember(history, {"act_std/fc1": 0.5}, step=0)
        >>> list(history["act_std/fc1"])
        [(0, 0.5)]
    """
    for tag, value in metrics.items():
        series = history.get(tag)
        if series is None:
            series = history[tag] = deque(maxlen=HISTORY)
        series.append((step, float(value)))


def metric_key(statistic: str, name: str) -> str:
    """The logged key of one statistic of one layer: grouped by statistic so TensorBoard overlays layers.

    Example::

        >>> metric_key("act_std", "encoder.0")
        'act_std/encoder.0'
    """
    return f"{statistic}/{name}"


_FAST_CRC: bool | None = None  # None: not tried yet in this process


def fast_tensorboard_crc() -> bool:
    """Make TensorBoard's event writer checksum records with the ``crc32c`` C extension; whether it now does.

    TensorBoard (without TensorFlow) computes every record's CRC-32C in pure Python, ~0.15 us per byte, on its writer
    thread while holding the GIL: a logging step's ~13 kB of per-layer scalars and histograms cost the training
    thread ~2 ms there (measured on the MLP benchmark, half of the monitors' remaining cost). The C implementation
    gives the same checksums (checked here on a test vector before it is used) ~300x faster. Done once per process,
    when a monitor first writes to a TensorBoard logger; ``LIGHTNING_BN_FAST_CRC=0`` leaves TensorBoard untouched,
    and without the ``crc32c`` package nothing changes.
    """
    global _FAST_CRC
    if _FAST_CRC is not None:
        return _FAST_CRC
    _FAST_CRC = False
    if os.environ.get("LIGHTNING_BN_FAST_CRC", "1") == "0":
        return False
    try:
        import crc32c
        from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    probe = bytes(range(256)) * 3
    if crc32c.crc32c(probe) != pywrap_tensorflow.crc32c(probe):
        return False

    def masked_crc32c(data: bytes) -> int:
        x = crc32c.crc32c(data)
        return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    if masked_crc32c(probe) != pywrap_tensorflow.masked_crc32c(probe):
        return False
    record_writer.masked_crc32c = masked_crc32c
    _FAST_CRC = True
    return True


def tensorboard_writers(loggers: Iterable[Any]) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger among ``loggers`` (none for CSV, W&B, ...)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    writers = [logger.experiment for logger in loggers if isinstance(logger, TensorBoardLogger)]
    if writers:
        fast_tensorboard_crc()
    return writers


def log_scalars(loggers: Iterable[Any], metrics: Mapping[str, float], step: int) -> None:
    """Hand ``metrics`` to every logger (CSV, TensorBoard, W&B, ...).

    A TensorBoard logger gets all of them as one event (one summary with many values) instead of one event per
    scalar: with ~100 per-layer figures that is the difference between one queue hand-off and a hundred.
    """
    if not metrics:
        return
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            prefix = f"{logger._prefix}{logger.LOGGER_JOIN_CHAR}" if getattr(logger, "_prefix", "") else ""
            write_scalars(logger.experiment, {f"{prefix}{key}": value for key, value in metrics.items()}, step)
        else:
            logger.log_metrics(dict(metrics), step=step)


def write_scalars(writer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Write ``metrics`` to a ``SummaryWriter`` as one event (one summary with many values), after the merged
    Custom Scalars layout if it is not written yet."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    fast_tensorboard_crc()
    flush_layout([writer])
    values = [Summary.Value(tag=key, simple_value=float(value)) for key, value in metrics.items()]
    writer._get_file_writer().add_summary(Summary(value=values), step)


def log_histograms(writers: Sequence[Any], prefix: str, histograms: Sequence[Mapping[str, Any]], step: int) -> None:
    """Write pre-binned histograms (from :class:`lightning_bn.probes.ProbeResult`) as ``<prefix>/<name>``, all of a
    step's histograms in one event."""
    if not histograms:
        return
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary, SummaryMetadata

    def metadata(h: Mapping[str, Any]) -> SummaryMetadata | None:
        # what a histogram of part of a tensor covers (a sharded parameter: this process's shard), in its description
        covers = h.get("covers")
        return SummaryMetadata(summary_description=f"covers {covers}") if covers and covers != "all" else None

    values = [
        Summary.Value(
            tag=metric_key(prefix, h["name"]),
            metadata=metadata(h),
            histo=HistogramProto(
                min=h["min"],
                max=h["max"],
                num=h["num"],
                sum=h["sum"],
                sum_squares=h["sum_squares"],
                bucket_limit=h["bucket_limits"],
                bucket=h["bucket_counts"],
            ),
        )
        for h in histograms
    ]
    flush_layout(writers)
    for writer in writers:
        writer._get_file_writer().add_summary(Summary(value=values), step)


#: Per SummaryWriter: the custom-scalars sections registered so far, and whether the merged layout is written.
_LAYOUTS: weakref.WeakKeyDictionary[Any, tuple[dict[str, dict[str, list]], bool]] = weakref.WeakKeyDictionary()


def write_layout(writers: Sequence[Any], category: str, statistics: Sequence[str]) -> None:
    """Register a custom-scalars section: one chart per statistic overlaying every layer (``<statistic>/.*``).

    TensorBoard shows one layout per run (the first one written), so sections are not written here: every monitor
    registers its own when it starts, and the first figures written to the run (:func:`log_scalars`,
    :func:`flush_layout`) carry one layout with all of them, whichever monitors are present and in whatever order
    they started. A section registered after that rewrites the merged layout.
    """
    for writer in writers:
        sections, written = _LAYOUTS.get(writer, ({}, False))
        charts = {stat: ["Multiline", [f"^{stat}/.*"]] for stat in statistics}
        changed = sections.get(category) != charts
        sections[category] = charts
        _LAYOUTS[writer] = (sections, written and not changed)


def flush_layout(writers: Sequence[Any]) -> None:
    """Write the merged layout of each writer whose registered sections are not written yet (see :func:`write_layout`).

    Sections come in a fixed order (activations before gradients, then any others by title).
    """
    for writer in writers:
        sections, written = _LAYOUTS.get(writer, ({}, True))
        if written:
            continue
        order = sorted(sections, key=lambda title: (_SECTION_ORDER.get(title, len(_SECTION_ORDER)), title))
        writer.add_custom_scalars({title: sections[title] for title in order})
        _LAYOUTS[writer] = (sections, True)


def forget_layout(writers: Sequence[Any]) -> None:
    """Drop the sections registered for ``writers`` (a monitor's teardown: a closed writer is not kept alive)."""
    for writer in writers:
        _LAYOUTS.pop(writer, None)


_SECTION_ORDER = {"lightning-bn: activations": 0, "lightning-bn: gradients": 1}


def log_text(writers: Sequence[Any], tag: str, text: str, step: int = 0) -> None:
    for writer in writers:
        writer.add_text(tag, text, global_step=step)


def log_image(writers: Sequence[Any], tag: str, image: np.ndarray, step: int) -> None:
    """Write an ``(H, W, 3)`` uint8 image."""
    for writer in writers:
        writer.add_image(tag, image, global_step=step, dataformats="HWC")


_COLORMAP = np.array(  # viridis at 0, .25, .5, .75, 1
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)


def heatmap_image(values: np.ndarray, cell: int = 8) -> np.ndarray:
    """Render a ``(layers, steps)`` array of fractions in [0, 1] as an RGB image (dark = 0, yellow = 1).

    Non-finite entries are grey. Each value becomes a ``cell`` x ``cell`` square.

    Example::

        >>> heatmap_image(np.array([[0.0, 1.0]]), cell=2).shape
        (2, 4, 3)
    """
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    v = np.clip(np.where(finite, values, 0.0), 0.0, 1.0) * (len(_COLORMAP) - 1)
    low = np.floor(v).astype(int).clip(0, len(_COLORMAP) - 2)
    frac = (v - low)[..., None]
    rgb = _COLORMAP[low] * (1 - frac) + _COLORMAP[low + 1] * frac
    rgb[~finite] = 128
    rgb = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    return rgb.round().astype(np.uint8)
