"""Read the monitors' TensorBoard logs back: runs under a directory, their lightning-bn scalars and layers table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_bn.tags import LAYERS_TAG, is_monitor_tag

__all__ = ["damage", "find_runs", "read_layers", "read_run", "read_scalars"]

_EVENT_GLOB = "events.out.tfevents.*"
#: what ``SummaryWriter.add_text`` appends to a text tag
_TEXT_SUFFIX = "/text_summary"


def find_runs(logdir: Path) -> list[Path]:
    """Every directory at or below ``logdir`` that holds event files (one TensorBoard run each), sorted.

    ``logdir`` may also be a single event file.
    """
    if logdir.is_file():
        return [logdir]
    return sorted({path.parent for path in logdir.rglob(_EVENT_GLOB) if path.is_file()})


def _event_files(logdir: Path) -> list[Path]:
    return [logdir] if logdir.is_file() else sorted(p for p in logdir.rglob(_EVENT_GLOB) if p.is_file())


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
    import struct

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data = path.read_bytes()
    offset, index = 0, 0
    while offset + 12 <= len(data):
        index += 1
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        if masked_crc32c(header) != length_crc:
            return f"record {index}: the CRC of its length does not match"
        end = offset + 12 + length + 4
        if end > len(data):
            return None  # cut short: still being written
        (data_crc,) = struct.unpack("<I", data[end - 4 : end])
        if masked_crc32c(data[offset + 12 : end - 4]) != data_crc:
            return f"record {index}: the CRC of its data does not match"
        offset = end
    return None


def read_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """The lightning-bn scalars of one run (a directory of event files, or one file): tag -> [(step, value)].

    Tags keep the order of their first appearance, which the report takes as depth order without a layers table.
    """
    return _scalars(_load(run))


def read_run(run: Path) -> tuple[dict[str, list[tuple[int, float]]], list[dict[str, Any]] | None]:
    """:func:`read_scalars` and :func:`read_layers` of one run, from one read of its event files."""
    accumulator = _load(run)
    return _scalars(accumulator), _layers(accumulator)


def read_layers(run: Path) -> list[dict[str, Any]] | None:
    """The layers table of one run (``ActivationMonitor``'s TensorBoard text ``lightning_bn/layers``: the watched
    layers in forward order, ``{"name", "module_type", "activation", "hook"}`` each); the last one written when there
    are several; ``None`` for a run logged without it or whose table does not parse."""
    return _layers(_load(run))


def _load(run: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def _scalars(accumulator: Any) -> dict[str, list[tuple[int, float]]]:
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
        if is_monitor_tag(tag)
    }


def _layers(accumulator: Any) -> list[dict[str, Any]] | None:
    from tensorboard.util import tensor_util

    tags = [tag for tag in accumulator.Tags().get("tensors", []) if tag in (LAYERS_TAG, LAYERS_TAG + _TEXT_SUFFIX)]
    events = sorted((event for tag in tags for event in accumulator.Tensors(tag)), key=lambda event: event.wall_time)
    for event in reversed(events):  # the last table written (a fit may write it twice at step 0; resumes again)
        try:
            text = tensor_util.make_ndarray(event.tensor_proto).flat[0]
            table = json.loads(text.decode("utf-8") if isinstance(text, bytes) else str(text))
        except (ValueError, TypeError, IndexError, UnicodeDecodeError):
            continue
        if isinstance(table, list) and all(isinstance(entry, dict) and "name" in entry for entry in table):
            return table
    return None
