"""Read the monitors' TensorBoard logs back: runs under a directory, their lightning-bn scalars and layers table.

One pass over each event file: every record's CRC-32C is checked once (the ``crc32c`` C extension), the events are
decoded with TensorBoard's protos and only the lightning-bn scalars and the layers table are kept. Tags written
through a prefixed logger (Lightning's ``TensorBoardLogger(prefix="train")``: ``train-act_std/net.1``) are read
without their prefix. What cannot be trusted is refused with a :class:`ReportWarning` naming the file, and the rest is
read: a damaged record (:class:`DamagedFile`; what precedes it is read) or a malformed layers table (the layers then
keep their logged order); no size written in a file is allocated.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any

from lightning_bn.tags import LAYERS_TAG, is_monitor_tag

__all__ = ["DamagedFile", "ReportWarning", "damage", "find_runs", "read_layers", "read_run", "read_scalars"]

_EVENT_GLOB = "events.out.tfevents.*"
#: what ``SummaryWriter.add_text`` appends to a text tag
_TEXT_SUFFIX = "/text_summary"
_TABLE_TAGS = (LAYERS_TAG, LAYERS_TAG + _TEXT_SUFFIX)
#: what Lightning's loggers put between their ``prefix`` and a tag (``LOGGER_JOIN_CHAR``)
_PREFIX_JOIN = "-"
_HEADER = struct.Struct("<QI")
_CRC = struct.Struct("<I")
_DT_STRING = 7  # tensorflow DataType of text tensors (tensorboard.compat.proto.types_pb2.DT_STRING)
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
    """
    return _load(run)[0]


def read_run(run: Path) -> tuple[dict[str, list[tuple[int, float]]], list[dict[str, Any]] | None]:
    """:func:`read_scalars` and :func:`read_layers` of one run, from one read of its event files."""
    scalars, tables = _load(run)
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
    if is_monitor_tag(tag):
        return "", tag
    start = tag.find(_PREFIX_JOIN)
    while start >= 0:
        if is_monitor_tag(tag[start + 1 :]):
            return tag[:start], tag[start + 1 :]
        start = tag.find(_PREFIX_JOIN, start + 1)
    return None


def _is_table_tag(tag: str) -> bool:
    return any(tag == table or tag.endswith(_PREFIX_JOIN + table) for table in _TABLE_TAGS)


def _load(run: Path) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[float, int, str, Path, Any]]]:
    """The lightning-bn scalars of a run (under one prefix: the first one met) and its layers-table candidates
    ``(wall time, step, tag, file, tensor)``, from one pass over each event file."""
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    tables: list[tuple[float, int, str, Path, Any]] = []
    known: dict[str, str | None] = {}  # logged tag -> what it is read as (_TABLE: a layers table); None: not read
    prefix: str | None = None
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
                elif value.HasField("simple_value"):
                    scalars.setdefault(target, []).append((step, value.simple_value))
    return scalars, tables


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
