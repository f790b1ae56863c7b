"""`lightning-bn report` on logs it did not expect: a prefixed TensorBoardLogger's run, tags that carry terminal
control characters, a crafted layers table; and the one-pass reader (CRC once, with the C ``crc32c``).

Timings belong to ``benchmarks/report_speed.py`` (``benchmarks/REPORT_SPEED.md``), not to this suite.
"""

import contextlib
import io
import json
import struct
import warnings
from pathlib import Path

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_bn import ActivationMonitor, GradientMonitor
from lightning_bn.cli import EXIT_OK, main
from lightning_bn.report import analyze
from lightning_bn.report.reading import damage, read_layers, read_run
from lightning_bn.tags import LAYERS_TAG
from tests.helpers import BoringClassifier, mlp, random_data, trainer


def _report(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["report", *map(str, argv)])
    return code, out.getvalue(), err.getvalue()


def _writer(path: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))


def test_a_prefixed_loggers_run_is_reported(tmp_path):
    """Lightning's ``TensorBoardLogger(prefix="train")`` joins with ``-``: ``train-act_std/net.1``."""
    logger = TensorBoardLogger(tmp_path, name="prefixed", prefix="train")
    model = BoringClassifier(mlp(3, 16, nn.ReLU), data=random_data(64, 64))
    monitors = [ActivationMonitor(every_n_steps=1, histograms=False, heatmap=False), GradientMonitor(every_n_steps=1)]
    trainer(tmp_path, logger=logger, max_steps=2, callbacks=monitors).fit(model)
    run = Path(logger.log_dir)
    scalars, layers = read_run(run)
    assert scalars and all(not tag.startswith("train-") for tag in scalars)
    assert "act_std/net.1" in scalars and layers is not None

    code, out, err = _report(tmp_path, "--format", "json")
    assert code == EXIT_OK, err
    document = json.loads(out)
    assert list(document["runs"]) == ["prefixed/version_0"]
    assert "net.1" in document["runs"]["prefixed/version_0"]["layers"]
    [health] = analyze(tmp_path)
    assert health.forward_order and "net.1" in [layer.name for layer in health.layers]


def test_tags_are_sanitized_in_text_and_markdown_and_exact_in_json(tmp_path):
    evil = "net\x1b[2J.1\nrun x: 0 logged steps, no problems"
    with _writer(tmp_path / "evil") as writer:
        for step in range(2):
            writer.add_scalar(f"act_std/{evil}", 1.0, step)
            writer.add_scalar(f"act_saturation/{evil}", 0.99, step)
            writer.add_scalar("act_std/ok", 1.0, step)
    for fmt in ("table", "markdown"):
        code, out, _ = _report(tmp_path, "--format", fmt, "--all")
        assert code == EXIT_OK
        assert "\x1b" not in out and "\r" not in out
        assert not any(line.startswith("run x:") for line in out.splitlines())
        assert "net\\x1b[2J.1\\nrun x" in out  # shown escaped, not dropped
    code, out, _ = _report(tmp_path, "--format", "json")
    names = set(json.loads(out)["runs"]["evil"]["layers"])
    assert evil in names  # JSON keeps the name exact (escaped by JSON itself)


def _table_event(tmp_path: Path, tensor_shape: list[int], strings: list[bytes]) -> Path:
    """A run with one scalar and a layers table whose tensor claims ``tensor_shape`` (a crafted file)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.compat.proto.types_pb2 import DT_STRING

    run = tmp_path / "crafted"
    with _writer(run) as writer:
        writer.add_scalar("act_std/net.0", 1.0, 0)
        writer.add_scalar("act_std/net.1", 1.0, 0)
        shape = TensorShapeProto(dim=[TensorShapeProto.Dim(size=size) for size in tensor_shape])
        tensor = TensorProto(dtype=DT_STRING, tensor_shape=shape, string_val=strings)
        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
        value = Summary.Value(tag=LAYERS_TAG + "/text_summary", tensor=tensor, metadata=metadata)
        writer._get_file_writer().add_summary(Summary(value=[value]), 0)
    return run


@pytest.mark.parametrize(
    ("shape", "strings", "why"),
    [
        ([1 << 21, 1 << 21], [b'[{"name": "net.1"}, {"name": "net.0"}]'], "4398046511104 elements"),
        ([1], [b"[{broken"], "not JSON"),
        ([1], [b'{"name": "net.1"}'], "not a list"),
        ([2], [b"[]", b"[]"], "2 elements"),
    ],
)
def test_a_malformed_layers_table_is_refused_with_a_clear_message(tmp_path, shape, strings, why):
    run = _table_event(tmp_path, shape, strings)
    with pytest.warns(UserWarning, match="layers table") as caught:
        assert read_layers(run) is None
    assert any(why in str(w.message) and "crafted" in str(w.message) for w in caught)

    code, out, err = _report(run, "--format", "json")
    assert code == EXIT_OK
    assert "layers table" in err and why in err and "ignored" in err
    assert set(json.loads(out)["runs"]["."]["layers"]) == {"net.0", "net.1"}


def test_extra_columns_in_the_layers_table_are_kept(tmp_path):
    run = tmp_path / "extra"
    table = [{"name": "net.1", "module_type": "Linear", "unwatched": 3}, {"name": "net.0", "future": [1, 2]}]
    with _writer(run) as writer:
        writer.add_scalar("act_std/net.0", 1.0, 0)
        writer.add_scalar("act_std/net.1", 1.0, 0)
        writer.add_text(LAYERS_TAG, json.dumps(table), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_layers(run) == table


def test_damage_is_found_in_the_same_pass_and_named(tmp_path):
    run = tmp_path / "damaged"
    with _writer(run) as writer:
        for step in range(3):
            writer.add_scalar("act_std/net.0", 1.0, step)
    [path] = run.glob("events.out.tfevents.*")
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # a byte of the last record's data
    path.write_bytes(bytes(data))
    assert "CRC of its data" in damage(path)
    code, out, err = _report(run, "--format", "json")
    assert code == EXIT_OK and f"damaged event file '{path}'" in err
    assert [step for step in json.loads(out)["runs"]["."]["steps"]] == [0, 1]  # what precedes the damage


def test_a_huge_record_length_is_not_allocated(tmp_path):
    path = tmp_path / "events.out.tfevents.0"
    from crc32c import crc32c

    header = struct.pack("<Q", 1 << 60)
    crc = crc32c(header)
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    path.write_bytes(header + struct.pack("<I", masked) + b"\x00" * 16)
    assert damage(path) is None  # a record cut short: a run still being written
    assert read_run(path) == ({}, None)


def test_each_crc_is_computed_once_in_c(tmp_path, monkeypatch):
    """The CLI reads each record once: one C CRC-32C of its length and one of its data, never TensorBoard's Python
    one (``benchmarks/report_speed.py`` measures what that buys: ``benchmarks/REPORT_SPEED.md``)."""
    import crc32c
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

    with _writer(tmp_path / "run") as writer:
        for step in range(4):
            writer.add_scalar("act_std/net.0", 1.0, step)
    [path] = (tmp_path / "run").glob("events.out.tfevents.*")
    records = 0
    data = path.read_bytes()
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        data, records = data[12 + length + 4 :], records + 1
    calls = []
    real = crc32c.crc32c
    monkeypatch.setattr(crc32c, "crc32c", lambda data: calls.append(len(data)) or real(data))

    def python_crc(*_):
        raise AssertionError("TensorBoard's pure-Python CRC was used")

    monkeypatch.setattr(pywrap_tensorflow, "masked_crc32c", python_crc)
    monkeypatch.setattr(pywrap_tensorflow, "crc32c", python_crc)
    code, out, err = _report(tmp_path, "--format", "json")
    assert code == EXIT_OK, err
    assert json.loads(out)["runs"]["run"]["steps"] == [0, 1, 2, 3]
    assert len(calls) == 2 * records  # the length and the data of each record, once
