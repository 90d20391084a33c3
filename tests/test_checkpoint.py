"""checkpoint: one atomic writer, one verified reader; the checksum comes from the bytes as
written, and a file that no longer matches it is refused on every path that reads weights."""

import hashlib
import os
import re
import warnings

import pytest
import torch

from mtl import checkpoint
from mtl.builders import ConfigError, init_from
from mtl.model import MultiTaskModel
from mtl.registry import ComponentError
from mtl.results import write_json, write_text
from mtl.trunks import build_trunk


def test_save_fsyncs_once_and_its_checksum_matches_the_file(tmp_path, monkeypatch):
    fsyncs = []
    real = os.fsync
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (fsyncs.append(fd), real(fd)))
    checkpoint.save({"x": torch.arange(3.0)}, tmp_path / "a.pt")
    assert len(fsyncs) == 1  # 13 ms each on this machine: checkpoint.save took 23 ms with two, 12 ms with one
    assert (tmp_path / "a.pt.sha256").read_text() == hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest()
    assert torch.equal(checkpoint.load(tmp_path / "a.pt")["x"], torch.arange(3.0))


def test_results_go_through_the_atomic_writer_with_fsync(tmp_path, monkeypatch):
    fsyncs = []
    real = os.fsync
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (fsyncs.append(fd), real(fd)))
    write_text("α\n", tmp_path / "report.md")
    write_json({"loss": float("nan")}, tmp_path / "results.json")
    assert len(fsyncs) == 2
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == "α\n"
    assert (tmp_path / "results.json").read_text() == '{\n  "loss": null\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json"]  # no .tmp left


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "results.json"
    write_text("old", path)

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_atomic(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# --- a file that no longer matches its checksum, on every path that reads one ---------------------


def seed_net(seed: int):
    torch.manual_seed(seed)
    return build_trunk({"name": "seed_net"})


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def replace_with_other_weights(path):
    # A valid checkpoint of the same trunk, written over the file: only the checksum can tell.
    torch.save({"model": {f"trunk.{k}": v for k, v in seed_net(7).state_dict().items()}}, path)


def read_with_load(path):
    checkpoint.load(path)


def read_with_latest(path):
    checkpoint.latest(path.parent)


def read_with_init_from(path):
    init_from(MultiTaskModel(seed_net(1), {}), str(path))


def read_with_trunk_checkpoint(path):
    build_trunk({"name": "seed_net", "checkpoint": str(path)})


READERS = {
    "checkpoint.load": (read_with_load, checkpoint.CheckpointError),
    "checkpoint.latest": (read_with_latest, checkpoint.CheckpointError),
    "init_from": (read_with_init_from, (ComponentError, ConfigError)),
    "trunk.checkpoint": (read_with_trunk_checkpoint, ComponentError),
}


@pytest.mark.parametrize("damage", [flip_a_byte, replace_with_other_weights], ids=["flipped", "replaced"])
@pytest.mark.parametrize("reader", list(READERS))
def test_a_file_that_fails_its_checksum_is_refused_naming_it(tmp_path, reader, damage):
    read, error = READERS[reader]
    path = tmp_path / "step-000000003.pt"
    checkpoint.save({"model": {f"trunk.{k}": v for k, v in seed_net(0).state_dict().items()}}, path)
    read(path)  # intact: it reads
    damage(path)
    with pytest.raises(error) as err, warnings.catch_warnings():
        warnings.simplefilter("error")
        read(path)
    message = str(err.value)
    assert str(path) in message and "is corrupt" in message and "step-000000003.pt.sha256" in message, message
    if reader in ("init_from", "trunk.checkpoint"):
        assert message.startswith(reader), message


def test_timm_pretrained_file_is_checked_too(tmp_path):
    timm = pytest.importorskip("timm")
    path = tmp_path / "weights.pth"
    checkpoint.save(timm.create_model("resnet10t").state_dict(), path)
    flip_a_byte(path)
    with pytest.raises(ComponentError, match=r"^trunk\.pretrained_file: checkpoint .*" + re.escape(path.name) + ".* is corrupt"):
        build_trunk({"name": "timm", "model_name": "resnet10t", "pretrained_file": str(path)})


def test_a_file_without_a_checksum_is_read_unchecked(tmp_path):
    path = tmp_path / "trunk.pt"
    torch.save({"trunk": seed_net(0).state_dict()}, path)
    trunk = build_trunk({"name": "seed_net", "checkpoint": str(path)})
    assert torch.equal(trunk.fc.weight, seed_net(0).fc.weight)
