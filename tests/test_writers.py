"""The TensorBoard writing path: the fast record checksum is TensorBoard's own checksum, and events still read back."""

from __future__ import annotations

import os
import random

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.summary.writer import record_writer

from lightning_bn import writers


def test_fast_crc_is_tensorboards_checksum():
    """After the swap, every record's masked CRC-32C equals TensorBoard's pure-Python one, on random payloads."""
    pytest.importorskip("crc32c")
    assert writers.fast_tensorboard_crc()
    assert record_writer.masked_crc32c is not pywrap_tensorflow.masked_crc32c
    rng = random.Random(0)
    for size in (0, 1, 7, 64, 1000, 13_000):
        data = bytes(rng.getrandbits(8) for _ in range(size))
        assert record_writer.masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data), size


def test_events_written_with_the_fast_crc_read_back(tmp_path):
    """A SummaryWriter after the swap writes files TensorBoard reads back, values intact."""
    pytest.importorskip("crc32c")
    from torch.utils.tensorboard import SummaryWriter

    writers.fast_tensorboard_crc()
    writer = SummaryWriter(str(tmp_path))
    for step in range(3):
        writer.add_scalar("act_std/fc1", 0.5 + step, step)
    writer.add_histogram("act_hist/fc1", torch.randn(100), 0)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("act_std/fc1")] == [0.5, 1.5, 2.5]
    assert acc.Histograms("act_hist/fc1")[0].histogram_value.num == 100
    assert os.listdir(tmp_path)


def test_histogram_of_a_shard_says_what_it_covers(tmp_path):
    """A histogram of part of a tensor (a sharded parameter's local shard) carries that in its description."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    common = {"min": 0.0, "max": 1.0, "num": 2, "sum": 1.0, "sum_squares": 1.0, "bucket_limits": [0.5, 1.0],
              "bucket_counts": [1.0, 1.0]}  # fmt: skip
    writers.log_histograms(
        [writer],
        "grad_hist",
        [{**common, "name": "w", "covers": "this process's shard (2 of 4)"}, {**common, "name": "b", "covers": "all"}],
        0,
    )
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    acc.Reload()
    assert acc.SummaryMetadata("grad_hist/w").summary_description == "covers this process's shard (2 of 4)"
    assert "grad_hist/b" in acc.Tags()["histograms"]  # a whole tensor: no description
