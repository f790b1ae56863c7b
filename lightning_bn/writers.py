"""Write monitor figures to any Lightning logger; TensorBoard extras only when a TensorBoard logger is present.

Scalars go to every logger through ``log_metrics``. With a :class:`~lightning.pytorch.loggers.TensorBoardLogger`
(or any logger whose ``experiment`` is a ``SummaryWriter``) the per-layer figures go as one compact record per
logging step (below; ``per_layer_scalars=True``: as scalars too, with a Custom Scalars layout that overlays all layers
in one chart per statistic), and we also write histograms, text, and images such as the saturation heatmap.

The compact record (``per_layer_scalars=False``, the default)
---------------------------------------------------------------
With ``per_layer_scalars=False`` a TensorBoard writer gets a logging step's per-layer figures (every monitor tag but
``grad_norm/total`` and the loss, see :func:`lightning_bn.tags.is_row_tag`) as ONE tensor summary instead of one
scalar each; its Scalars tab keeps the model-wide figures only: ``grad_norm/total``, ``lightning_bn/loss``,
``lightning_bn/skipped_steps`` (once there is one), ``lightning_bn/nonfinite_layers`` and
``lightning_bn/nonfinite_parameters`` (activation rows, parameter rows of the step with a non-finite figure or
``act_nonfinite`` > 0; each written by the monitor whose record has such rows). Other loggers (CSV, W&B, ...) get
every figure as a scalar, as always. The record, in the same event as those scalars (``Event.step`` is the logging
step, the record the event's first value):

* tag ``lightning_bn/rows`` (through a prefixed Lightning logger: ``<prefix>-lightning_bn/rows``);
* ``value.metadata.plugin_data.plugin_name == "lightning_bn"``; ``value.metadata.plugin_data.content`` is UTF-8 JSON
  ``{"version": 1, "figures": [statistic, ...], "rows": [layer or parameter, ...], "present": [int, ...]}``, written
  with every record (the rows can change from step to step: a skipped optimizer step drops ``grad_norm`` and
  ``update_ratio``). ``figures`` are the statistics (``act_std``, ``grad_norm``, ... in order of first appearance in
  the step), ``rows`` the layers and parameters (``net.0``, ``net.0.weight``, ... forward order, activation layers
  first, then parameters); ``present[i]`` is a bit mask: bit ``j`` set when row ``i`` has figure ``j``;
* ``ActivationMonitor`` and ``GradientMonitor`` each write their own record: a step can have two (disjoint
  figures: ``act_*`` rows are layers, ``grad_norm``/``update_ratio``/``weight_norm``/``grad_rms_eps`` rows are
  parameters); ``Monitor`` writes one with both;
* ``value.tensor``: ``dtype`` ``DT_FLOAT`` (float32), shape ``[len(rows), len(figures)]``, row-major little-endian
  bytes in ``tensor_content``; cell ``[i, j]`` is the scalar ``<figures[j]>/<rows[i]>`` would have had (the same
  float32 as a scalar's ``simple_value``), NaN where absent (a real value may be NaN too: ``present`` tells them
  apart).

:func:`lightning_bn.report.reading.read_rows` gives every figure of a run as a rows x steps matrix;
:func:`~lightning_bn.report.reading.read_scalars` reads both forms into the same ``tag -> [(step, value)]``.
TensorBoard's own data provider keeps one metadata per tag (the first), so a reader of several steps should take the
names from each event's record (as ``read_rows`` does).
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lightning_bn.tags import (
    ACT_NONFINITE,
    ACTIVATION_STATISTICS,
    LAYERS_TAG,
    LAYOUT_STATISTICS,
    NONFINITE_LAYERS_TAG,
    NONFINITE_PARAMETERS_TAG,
    ROWS_PLUGIN,
    ROWS_TAG,
    is_row_tag,
    split_tag,
    tag,
)

__all__ = [
    "Destination",
    "fast_tensorboard_crc",
    "flush_layout",
    "forget_layout",
    "log_histograms",
    "log_image",
    "log_scalars",
    "log_text",
    "rows_record",
    "tensorboard_writers",
    "write_layout",
    "write_scalars",
]


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


def log_scalars(loggers: Iterable[Any], metrics: Mapping[str, float], step: int, per_layer: bool = True) -> None:
    """Hand ``metrics`` to every logger (CSV, TensorBoard, W&B, ...).

    A TensorBoard logger gets all of them as one event (one summary with many values) instead of one event per
    scalar: with ~100 per-layer figures that is the difference between one queue hand-off and a hundred. Without
    ``per_layer`` it gets the per-layer figures as one compact record (see the module docstring).
    """
    if not metrics:
        return
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            prefix = f"{logger._prefix}{logger.LOGGER_JOIN_CHAR}" if getattr(logger, "_prefix", "") else ""
            write_scalars(logger.experiment, metrics, step, per_layer, prefix)
        else:
            logger.log_metrics(dict(metrics), step=step)


def write_scalars(writer: Any, metrics: Mapping[str, float], step: int, per_layer: bool = True, prefix: str = ""):
    """Write ``metrics`` to a ``SummaryWriter`` as one event (one summary with many values), after the merged
    Custom Scalars layout if it is not written yet; each tag after ``prefix``. Without ``per_layer`` the per-layer
    figures go to one compact record in that event (see the module docstring)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    fast_tensorboard_crc()
    flush_layout([writer])
    record = None
    if not per_layer:
        record, metrics = rows_record(metrics)
    values = [Summary.Value(tag=f"{prefix}{key}", simple_value=float(value)) for key, value in metrics.items()]
    if record is not None:  # first: a reader meets the per-layer figures before the model-wide ones, as in metrics
        values.insert(0, Summary.Value(tag=f"{prefix}{ROWS_TAG}", metadata=record[0], tensor=record[1]))
    writer._get_file_writer().add_summary(Summary(value=values), step)


def rows_record(metrics: Mapping[str, float]) -> tuple[tuple[Any, Any] | None, dict[str, float]]:
    """The compact record of a step's per-layer figures ``(SummaryMetadata, TensorProto)`` (``None`` without any)
    and the scalars that stay: the model-wide ones and ``lightning_bn/nonfinite_layers``.

    Example::

        >>> record, kept = rows_record({"act_std/a": 1.0, "act_std/b": 2.0, "grad_norm/a.weight": float("nan"),
        ...                             "grad_norm/total": 3.0})
        >>> kept
        {'grad_norm/total': 3.0, 'lightning_bn/nonfinite_layers': 0.0, 'lightning_bn/nonfinite_parameters': 1.0}
        >>> record[1].tensor_shape.dim[0].size, record[1].tensor_shape.dim[1].size
        (3, 2)
    """
    from tensorboard.compat.proto.summary_pb2 import SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.compat.proto.types_pb2 import DT_FLOAT

    kept: dict[str, float] = {}
    figures: dict[str, int] = {}
    rows: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        if not is_row_tag(key):
            kept[key] = value
            continue
        statistic, name = split_tag(key)
        rows.setdefault(name, {})[figures.setdefault(statistic, len(figures))] = value
    if not rows:
        return None, kept
    matrix = np.full((len(rows), len(figures)), np.nan, dtype="<f4")
    present = []
    for i, cells in enumerate(rows.values()):
        matrix[i, list(cells)] = list(cells.values())
        present.append(sum(1 << j for j in cells))
    with np.errstate(invalid="ignore"):
        nonfinite = ~np.isfinite(matrix) & _present_mask(present, len(figures))
        if ACT_NONFINITE in figures:
            nonfinite[:, figures[ACT_NONFINITE]] |= matrix[:, figures[ACT_NONFINITE]] > 0
    act = np.array([figure in _ACTIVATION_FIGURES for figure in figures])
    is_layer = (_present_mask(present, len(figures)) & act).any(axis=1)  # else a parameter's row
    bad = nonfinite.any(axis=1)
    if is_layer.any():
        kept[NONFINITE_LAYERS_TAG] = float((bad & is_layer).sum())
    if not is_layer.all():
        kept[NONFINITE_PARAMETERS_TAG] = float((bad & ~is_layer).sum())
    content = {"version": 1, "figures": list(figures), "rows": list(rows), "present": present}
    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name=ROWS_PLUGIN, content=json.dumps(content).encode()),
    )
    shape = TensorShapeProto(dim=[TensorShapeProto.Dim(size=n) for n in matrix.shape])
    return (metadata, TensorProto(dtype=DT_FLOAT, tensor_shape=shape, tensor_content=matrix.tobytes())), kept


_ACTIVATION_FIGURES = frozenset(ACTIVATION_STATISTICS.values())


def _present_mask(present: Sequence[int], figures: int) -> np.ndarray:
    """The ``present`` bit masks of a compact record as a boolean rows x figures matrix."""
    bits = np.array(present, dtype=np.int64)[:, None] >> np.arange(figures)[None, :]
    return (bits & 1).astype(bool)


def log_histograms(writers: Sequence[Any], prefix: str, histograms: Sequence[Mapping[str, Any]], step: int) -> None:
    """Write pre-binned histograms (from :class:`lightning_bn.monitoring.ProbeResult`) as ``<prefix>/<name>``, all of a
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
            tag=tag(prefix, h["name"]),
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


_SECTION_ORDER = {title: i for i, title in enumerate(LAYOUT_STATISTICS)}


def log_text(writers: Sequence[Any], tag: str, text: str, step: int = 0) -> None:
    for writer in writers:
        writer.add_text(tag, text, global_step=step)


def log_image(writers: Sequence[Any], tag: str, image: np.ndarray, step: int) -> None:
    """Write an ``(H, W, 3)`` uint8 image."""
    for writer in writers:
        writer.add_image(tag, image, global_step=step, dataformats="HWC")


def _is_summary_writer(writer: Any) -> bool:
    return hasattr(writer, "_get_file_writer") and hasattr(writer, "add_scalar")


class Destination:
    r"""Where a monitor's figures go: scalars to ``scalars(metrics, step)`` (any logger), and the TensorBoard extras
    (histograms, the Custom Scalars layout, the layers table, images) to the ``SummaryWriter``\ s in ``tensorboard``.

    Build one with :meth:`of_loggers` (a Trainer's loggers) or :meth:`of_writer` (what ``Monitor(writer=...)`` takes).

    Example::

        >>> seen = []
        >>> destination = Destination.of_writer(lambda metrics, step: seen.append((step, metrics)))
        >>> destination.publish({"act_std/fc": 0.5}, [], step=3)
        >>> seen
        [(3, {'act_std/fc': 0.5})]
    """

    def __init__(
        self,
        scalars: Callable[[Mapping[str, float], int], None] | None,
        tensorboard: Sequence[Any] = (),
        per_layer_scalars: bool = False,
    ):
        self.scalars = scalars
        self.tensorboard = list(tensorboard)
        #: ``False``: TensorBoard gets the per-layer figures as one compact record a step (no Custom Scalars layout)
        self.per_layer_scalars = per_layer_scalars

    @classmethod
    def of_loggers(cls, loggers: Sequence[Any], per_layer_scalars: bool = False) -> Destination:
        """Every Lightning logger; TensorBoard extras for the TensorBoard ones (without ``per_layer_scalars``, the
        compact record instead of per-layer scalars: see the module docstring)."""
        loggers = list(loggers)
        return cls((lambda metrics, step: log_scalars(loggers, metrics, step, per_layer_scalars)) if loggers else None,
                   tensorboard_writers(loggers), per_layer_scalars)  # fmt: skip

    @classmethod
    def of_writer(cls, writer: Any, per_layer_scalars: bool = False) -> Destination:
        """A ``SummaryWriter``, a Lightning ``Fabric`` (``log_dict``), a Lightning logger (``log_metrics``), a callable
        ``(metrics, step)`` or ``None``; raises ``ValueError`` naming a writer of no known kind.
        ``per_layer_scalars=False`` concerns a ``SummaryWriter`` only (the others always get scalars)."""
        if writer is None:
            return cls(None)
        if _is_summary_writer(writer):
            fast_tensorboard_crc()
            return cls(lambda metrics, step: write_scalars(writer, metrics, step, per_layer_scalars), [writer],
                       per_layer_scalars)  # fmt: skip
        if hasattr(writer, "log_dict"):  # Lightning Fabric: every logger it holds
            return cls(lambda metrics, step: writer.log_dict(dict(metrics), step=step))
        if hasattr(writer, "log_metrics"):  # a Lightning logger
            return cls(lambda metrics, step: writer.log_metrics(dict(metrics), step=step))
        if callable(writer):
            return cls(lambda metrics, step: writer(dict(metrics), step))
        raise ValueError(
            "Expected `writer` to be a SummaryWriter, a Lightning Fabric, a Lightning logger, a callable "
            f"(metrics, step) or None but got {type(writer).__name__}"
        )

    def register(self, sections: Mapping[str, Sequence[str]]) -> None:
        """Register Custom Scalars sections (title -> statistics; see :func:`write_layout`); none with the compact
        record (their charts would be empty)."""
        if not self.per_layer_scalars:
            return
        for title, statistics in sections.items():
            write_layout(self.tensorboard, title, statistics)

    def write_layers(self, layers: Sequence[Mapping[str, Any]] | None) -> None:
        """The layers table ``lightning-bn report`` reads (TensorBoard text at step 0)."""
        if layers is not None:
            log_text(self.tensorboard, LAYERS_TAG, json.dumps(list(layers)), step=0)

    def publish(self, metrics: Mapping[str, float], histograms: Sequence[tuple[str, Sequence[Mapping]]], step: int):
        """One logging step: the scalars to every logger, histograms (``(prefix, records)`` pairs) to TensorBoard."""
        if metrics and self.scalars is not None:
            self.scalars(metrics, step)
        for prefix, records in histograms:
            log_histograms(self.tensorboard, prefix, records, step)

    def image(self, name: str, image: np.ndarray, step: int) -> None:
        log_image(self.tensorboard, name, image, step)
