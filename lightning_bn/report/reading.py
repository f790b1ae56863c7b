"""Read the monitors' TensorBoard logs back: runs under a directory, their lightning-bn scalars and layers table.

One pass over each event file: every record's CRC-32C is checked once (the ``crc32c`` C extension), the events are
decoded with TensorBoard's protos and only the lightning-bn scalars and the layers table are kept. Tags written
through a prefixed logger (Lightning's ``TensorBoardLogger(prefix="train")``: ``train-act_std/net.1``) are read
without their prefix. What cannot be trusted is refused with a :class:`ReportWarning` naming the file, and the rest is
read: a damaged record (:class:`DamagedFile`; what precedes it is read) or a malformed layers table (the layers then
keep their logged order); no size written in a file is allocated.

Both forms of the per-layer figures are read: one scalar per figure and layer (``act_std/net.1``, the default) and the
compact record of ``per_layer_scalars=False`` (one tensor summary ``lightning_bn/rows`` per logging step, a float32
matrix rows x figures with plugin name ``lightning_bn``; its format is documented in :mod:`lightning_bn.writers`).
:func:`read_scalars` and :func:`read_run` give the same ``tag -> [(step, value)]`` for both, so the report, the CLI and
``lightning_bn.plot`` judge a compact run as they judge a per-layer one; :func:`read_rows` gives every figure of a run
(either form) as a rows x steps matrix.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lightning_bn.tags import LAYERS_TAG, ROWS_PLUGIN, ROWS_TAG, is_monitor_tag, is_row_tag, split_tag

__all__ = [
    "DamagedFile",
    "ReportWarning",
    "damage",
    "find_runs",
    "read_layers",
    "read_rows",
    "read_run",
    "read_scalars",
]

_EVENT_GLOB = "events.out.tfevents.*"
#: what ``SummaryWriter.add_text`` appends to a text tag
_TEXT_SUFFIX = "/text_summary"
_TABLE_TAGS = (LAYERS_TAG, LAYERS_TAG + _TEXT_SUFFIX)
#: what Lightning's loggers put between their ``prefix`` and a tag (``LOGGER_JOIN_CHAR``)
_PREFIX_JOIN = "-"
_HEADER = struct.Struct("<QI")
_CRC = struct.Struct("<I")
_DT_STRING = 7  # tensorflow DataType of text tensors (tensorboard.compat.proto.types_pb2.DT_STRING)
_DT_FLOAT = 1  # ... of float32 tensors (the compact record)
_UNSEEN, _TABLE = "\0unseen", "\0table"  # markers in _load (no logged tag is read with a NUL)


class ReportWarning(UserWarning):
    """Something in a log that the report refuses and reads past; the message names the file."""


class DamagedFile(ReportWarning):
    """An event file with a record whose length or data fails its CRC; what precedes that record is read."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def find_runs(logdir: Path) -> list[Path]:
    """Every directory at or below ``logdir`` that holds event files (one TensorBoard run each), sorted.

    ``logdir`` may also be a single event file.
    """
    if logdir.is_file():
        return [logdir]
    return sorted({path.parent for path in logdir.rglob(_EVENT_GLOB) if path.is_file()})


def _run_files(run: Path) -> list[Path]:
    """The event files of one run: ``run`` itself, or those directly in it, in name (= creation time) order."""
    return [run] if run.is_file() else sorted(p for p in run.glob(_EVENT_GLOB) if p.is_file())


def _masked_crc() -> Any:
    try:
        from crc32c import crc32c
    except ImportError:  # pragma: no cover - a dependency; TensorBoard's pure-Python CRC as a last resort
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

        return masked_crc32c

    def masked_crc32c(data: Any) -> int:
        x = crc32c(data)
        return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    return masked_crc32c


def _records(data: bytes) -> tuple[list[memoryview], str | None]:
    """The records of one event file, each checked once against its CRCs, and why the file is damaged (``None``: it
    is intact). Reading stops at the first damaged record; a record cut short at the end is a run still being written,
    not damage. A length is never allocated: records are views of ``data``."""
    masked_crc32c = _masked_crc()
    view = memoryview(data)
    records: list[memoryview] = []
    offset, size = 0, len(data)
    while offset + 12 <= size:
        length, length_crc = _HEADER.unpack_from(data, offset)
        if masked_crc32c(view[offset : offset + 8]) != length_crc:
            return records, f"record {len(records) + 1}: the CRC of its length does not match"
        end = offset + 12 + length + 4
        if end > size:
            break  # cut short: still being written
        record = view[offset + 12 : end - 4]
        if masked_crc32c(record) != _CRC.unpack_from(data, end - 4)[0]:
            return records, f"record {len(records) + 1}: the CRC of its data does not match"
        records.append(record)
        offset = end
    return records, None


def damage(path: Path) -> str | None:
    """Why an event file is damaged (a record whose length or data fails its CRC), or ``None`` if it is intact.

    A record cut short at the end is a run still being written, not damage.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> bad = Path(tempfile.mkdtemp()) / "events.out.tfevents.0"
        >>> _ = bad.write_bytes(b"\\x05" + b"\\x00" * 7 + b"\\x00\\x00\\x00\\x00" + b"hello" + b"\\x00" * 4)
        >>> damage(bad)
        'record 1: the CRC of its length does not match'
    """
    return _records(Path(path).read_bytes())[1]


def read_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """The lightning-bn scalars of one run (a directory of event files, or one file): tag -> [(step, value)].

    Tags keep the order of their first appearance, which the report takes as depth order without a layers table.
    The cells of compact records (``lightning_bn/rows``) are read as the scalars they stand for.
    """
    return _load(run)[0]


def read_run(run: Path) -> tuple[dict[str, list[tuple[int, float]]], list[dict[str, Any]] | None]:
    """:func:`read_scalars` and :func:`read_layers` of one run, from one read of its event files."""
    scalars, tables, _ = _load(run)
    return scalars, _layers(tables)


def read_layers(run: Path) -> list[dict[str, Any]] | None:
    """The layers table of one run (``ActivationMonitor``'s TensorBoard text ``lightning_bn/layers``: the watched
    layers in forward order, ``{"name", "module_type", "activation", "hook"}`` each, other keys kept); the last one
    written when there are several; ``None`` for a run logged without it or whose tables are malformed (each refused
    with a :class:`ReportWarning`)."""
    return _layers(_load(run)[1])


def _unprefixed(tag: str) -> tuple[str, str] | None:
    """``(prefix, tag)`` of a lightning-bn scalar tag, the prefix ``""`` when it has none; ``None`` for other tags.

    Example::

        >>> _unprefixed("train-act_std/net.1"), _unprefixed("act_std/net.1"), _unprefixed("train_loss")
        (('train', 'act_std/net.1'), ('', 'act_std/net.1'), None)
    """
    if _is_read(tag):
        return "", tag
    start = tag.find(_PREFIX_JOIN)
    while start >= 0:
        if _is_read(tag[start + 1 :]):
            return tag[:start], tag[start + 1 :]
        start = tag.find(_PREFIX_JOIN, start + 1)
    return None


def _is_read(tag: str) -> bool:
    return tag == ROWS_TAG or is_monitor_tag(tag)


def _is_table_tag(tag: str) -> bool:
    return any(tag == table or tag.endswith(_PREFIX_JOIN + table) for table in _TABLE_TAGS)


def read_rows(run: Path) -> dict[str, tuple[list[int], list[str], np.ndarray]]:
    """Every per-layer figure of one run as a matrix: statistic (``act_std``, ``grad_norm``, ...) -> ``(steps, rows,
    values)``, ``values`` a float64 ``len(rows) x len(steps)`` array, NaN where a row has no value at a step; steps
    ascending, rows (layers or parameters) in order of first appearance. Reads compact records
    (``per_layer_scalars=False``) without making a scalar of each cell, and per-layer scalars as well; a step
    written twice (a resumed run) keeps its last value.

    Example::

        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> from lightning_bn.writers import write_scalars
        >>> run = tempfile.mkdtemp()
        >>> with SummaryWriter(run) as writer:
        ...     for step in (0, 10):
        ...         write_scalars(writer, {"act_std/a": 1.0 + step, "act_std/b": 2.0}, step, per_layer=False)
        >>> steps, rows, values = read_rows(run)["act_std"]
        >>> steps, rows, values.tolist()
        ([0, 10], ['a', 'b'], [[1.0, 11.0], [2.0, 2.0]])
    """
    scalars, _, records = _load(Path(run), expand=False)
    cells: dict[str, dict[str, dict[int, float]]] = {}  # statistic -> row -> step -> value
    for logged, series in scalars.items():
        if is_row_tag(logged):
            statistic, name = split_tag(logged)
            cells.setdefault(statistic, {}).setdefault(name, {}).update(series)
    for step, figures, rows, present, matrix in records:
        for j, statistic in enumerate(figures):
            by_row = cells.setdefault(statistic, {})
            for i in np.flatnonzero(present[:, j]).tolist():
                by_row.setdefault(rows[i], {})[step] = float(matrix[i, j])
    out: dict[str, tuple[list[int], list[str], np.ndarray]] = {}
    for statistic, by_row in cells.items():
        steps = sorted({step for series in by_row.values() for step in series})
        column = {step: k for k, step in enumerate(steps)}
        values = np.full((len(by_row), len(steps)), np.nan)
        for i, series in enumerate(by_row.values()):
            values[i, [column[step] for step in series]] = list(series.values())
        out[statistic] = (steps, list(by_row), values)
    return out


_Record = tuple[int, list[str], list[str], np.ndarray, np.ndarray]  # step, figures, rows, present (bool), matrix


def _record(
    value: Any, parsed: dict[bytes, Any] | None = None
) -> tuple[tuple[list[str], list[str], np.ndarray, np.ndarray] | None, str]:
    """``(figures, rows, present, matrix)`` of a compact record, or ``None`` and why it is refused; nothing the
    record claims is allocated before it is checked against the bytes that are there. ``parsed`` remembers each
    metadata's checked ``(figures, rows, present)`` by its bytes (every step of a run repeats the same)."""
    if value.metadata.plugin_data.plugin_name != ROWS_PLUGIN:
        return None, f"plugin name {value.metadata.plugin_data.plugin_name!r}, not {ROWS_PLUGIN!r}"
    raw = value.metadata.plugin_data.content
    known = parsed.get(raw) if parsed is not None else None
    if known is None:
        known = _metadata(raw)
        if parsed is not None:
            parsed[raw] = known
    if known[0] is None:
        return None, known[1]
    figures, rows, mask = known[0]
    tensor = value.tensor
    dims = [dim.size for dim in tensor.tensor_shape.dim]
    if tensor.dtype != _DT_FLOAT or dims != [len(rows), len(figures)]:
        return None, f"a tensor of data type {tensor.dtype} and shape {dims}, not float32 {[len(rows), len(figures)]}"
    if len(tensor.tensor_content) != 4 * len(rows) * len(figures):
        return None, f"{len(tensor.tensor_content)} bytes of data for {len(rows) * len(figures)} float32 values"
    matrix = np.frombuffer(tensor.tensor_content, dtype="<f4").reshape(len(rows), len(figures))
    return (figures, rows, mask, matrix), ""


def _metadata(raw: bytes) -> tuple[tuple[list[str], list[str], np.ndarray] | None, str]:
    """``(figures, rows, present)`` of a compact record's metadata, or ``None`` and why it is refused."""
    try:
        content = json.loads(raw.decode("utf-8"))
        figures, rows, present = content["figures"], content["rows"], content["present"]
    except (UnicodeDecodeError, ValueError, RecursionError, TypeError, KeyError) as err:
        return None, f"its metadata is not the record's JSON ({str(err)[:80]})"
    if not (isinstance(figures, list) and isinstance(rows, list) and isinstance(present, list)):
        return None, "its figures, rows or present are not lists"
    if not all(isinstance(x, str) for x in (*figures, *rows)) or len(present) != len(rows) or len(figures) > 62:
        return None, "its figures or rows are not names, or present is not one mask per row"
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << len(figures) for x in present):
        return None, "a present mask is not a bit mask of the figures"
    mask = ((np.array(present, dtype=np.int64)[:, None] >> np.arange(len(figures))[None, :]) & 1).astype(bool)
    return (figures, rows, mask), ""


def _load(
    run: Path, expand: bool = True
) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[float, int, str, Path, Any]], list[_Record]]:
    """The lightning-bn scalars of a run (under one prefix: the first one met), its layers-table candidates
    ``(wall time, step, tag, file, tensor)`` and its compact records, from one pass over each event file. With
    ``expand`` the cells of compact records are read into the scalars (where they stand), else kept as records."""
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    tables: list[tuple[float, int, str, Path, Any]] = []
    records_read: list[_Record] = []
    known: dict[str, str | None] = {}  # logged tag -> what it is read as (_TABLE: a layers table); None: not read
    prefix: str | None = None
    parsed: dict[bytes, Any] = {}  # a record's metadata -> its checked (figures, rows, present)
    targets: dict[bytes, tuple[Any, list[list[tuple[int, float]]]]] = {}  # -> its present cells and their series
    for path in _run_files(Path(run)):
        records, why = _records(path.read_bytes())
        if why is not None:
            warnings.warn(
                DamagedFile(f"damaged event file '{path}': {why}; what precedes the damage is read", path),
                stacklevel=3,
            )
        for record in records:
            try:
                event = Event.FromString(record)
            except DecodeError:  # a record that passed its CRC but holds no Event
                continue
            if not event.HasField("summary"):
                continue
            step = event.step
            for value in event.summary.value:
                logged = value.tag
                target = known.get(logged, _UNSEEN)
                if target is _UNSEEN:
                    found = None if _is_table_tag(logged) else _unprefixed(logged)
                    if found is not None and prefix is None:
                        prefix = found[0]  # the run's prefix: the first one met
                    target = _TABLE if found is None and _is_table_tag(logged) else None
                    if found is not None and found[0] == prefix:
                        target = found[1]
                    known[logged] = target
                if target is None:
                    continue
                if target is _TABLE:
                    if value.HasField("tensor"):
                        tables.append((event.wall_time, step, logged, path, value.tensor))
                elif target == ROWS_TAG:
                    found_record, why = _record(value, parsed)
                    if found_record is None:
                        warnings.warn(
                            ReportWarning(f"'{path}': the record {logged} of step {step} is malformed: {why}; ignored"),
                            stacklevel=3,
                        )
                    elif expand:  # the present cells, row by row, each appended to its tag's series
                        figures, rows, present, matrix = found_record
                        key = value.metadata.plugin_data.content
                        cells = targets.get(key)
                        if cells is None:  # first met: the series of its cells, created in row-major order
                            where = np.nonzero(present)
                            cells = targets[key] = (
                                where,
                                [scalars.setdefault(f"{figures[j]}/{rows[i]}", []) for i, j in zip(*map(list, where))],
                            )
                        for series, cell in zip(cells[1], matrix[cells[0]].tolist()):
                            series.append((step, cell))
                    else:
                        records_read.append((step, *found_record))
                elif value.HasField("simple_value"):
                    scalars.setdefault(target, []).append((step, value.simple_value))
    return scalars, tables, records_read


def _layers(tables: list[tuple[float, int, str, Path, Any]]) -> list[dict[str, Any]] | None:
    """The last well-formed table written (a fit may write it twice at step 0; resumes again); each malformed one
    met before it is refused with a :class:`ReportWarning`."""
    for _, step, tag, path, tensor in reversed(sorted(tables, key=lambda table: table[0])):
        table, why = _table(tensor)
        if table is not None:
            return table
        warnings.warn(
            ReportWarning(
                f"'{path}': the layers table ({tag}, step {step}) is malformed: {why}; ignored (layers are taken in "
                "the order they were logged unless an earlier table is well-formed)"
            ),
            stacklevel=3,
        )
    return None


def _table(tensor: Any) -> tuple[list[dict[str, Any]] | None, str]:
    """A layers table from its text tensor, or ``None`` and why not; nothing the tensor claims is allocated."""
    if tensor.dtype != _DT_STRING:
        return None, f"a tensor of data type {tensor.dtype}, not text"
    dims = [dim.size for dim in tensor.tensor_shape.dim]
    elements = 1
    for size in dims:
        elements *= size
    if elements != 1 or any(size < 0 for size in dims):
        return None, f"its tensor claims {elements} elements (shape {dims}), a table is one text"
    if len(tensor.string_val) != 1:
        return None, f"its tensor holds {len(tensor.string_val)} texts, a table is one"
    try:
        table = json.loads(tensor.string_val[0].decode("utf-8"))
    except UnicodeDecodeError:
        return None, "its text is not UTF-8"
    except (ValueError, RecursionError) as err:
        return None, f"its text is not JSON ({str(err)[:80]})"
    if not isinstance(table, list):
        return None, f"not a list of layers but a JSON {type(table).__name__}"
    for index, entry in enumerate(table):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            return None, f'entry {index} is not an object with a string "name"'
    return table, ""
