"""Checkpoints: exact round trip, atomic writes, and every bad file refused with a message naming it."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from metalr import CheckpointError, LRController, load_controller, save_controller
from metalr.checkpoint import METADATA_KEY, read_metadata
from metalr.controller import ArchConfig, PolicyConfig
from metalr.features import FeatureSpec


def _trained_like(kind: str = "mlp") -> LRController:
    torch.manual_seed(0)
    hidden = (64, 32) if kind == "mlp" else (32,)
    controller = LRController(FeatureSpec(groups=("loss", "grad", "progress")), PolicyConfig(base_schedule="cosine", max_lr=0.5), ArchConfig(kind, hidden))
    with torch.no_grad():
        for p in controller.parameters():
            p.normal_(0, 0.2)
    return controller


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_round_trip_is_exact(tmp_path: Path, kind: str) -> None:
    original = _trained_like(kind)
    path = save_controller(original, tmp_path / "c.safetensors", {"recipe": "unit"})
    loaded = load_controller(path)
    assert loaded.describe() == original.describe()
    for (name, a), (_, b) in zip(original.net.state_dict().items(), loaded.net.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.provenance["recipe"] == "unit"
    assert loaded.provenance["metalr_version"]
    assert not any(p.requires_grad for p in loaded.parameters())


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_controller(_trained_like(), tmp_path / "c.safetensors")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("metalr.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_controller(LRController(), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors"]


def test_missing_path_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no controller checkpoint at '.*nope.safetensors'"):
        load_controller(tmp_path / "nope.safetensors")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_files_are_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker  # type: ignore[attr-defined]
    blob = pickle.dumps(payload)
    pt = tmp_path / "evil.pt"
    pt.write_bytes(blob)
    with pytest.raises(CheckpointError, match="refusing a .pt file"):
        load_controller(pt)
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(blob)
    with pytest.raises(CheckpointError, match="evil.safetensors: not a readable safetensors file"):
        load_controller(disguised)
    assert not marker.exists()


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = save_controller(_trained_like(), tmp_path / "c.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="c.safetensors"):
        load_controller(path)


def _rewrite_metadata(path: Path, edit) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()[METADATA_KEY])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    edit(meta, tensors)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m, t: m.update(format_version=99), "unknown checkpoint format_version 99"),
        (lambda m, t: m["feature_spec"].update(groups=["loss", "telepathy"]), "unknown feature group"),
        (lambda m, t: m["feature_spec"].update(format=7), "feature format 7 cannot be computed"),
        (lambda m, t: m["feature_spec"]["names"].reverse(), "feature names .* do not match"),
        (lambda m, t: m["architecture"].update(input_dim=3), "input_dim 3 does not match"),
        (lambda m, t: m["architecture"].update(kind="transformer"), "unknown controller kind 'transformer'"),
        (lambda m, t: m["policy"].update(min_lr=-1.0), "need 0 < min_lr < max_lr"),
        (lambda m, t: m["policy"].update(exec="rm -rf /"), "unknown policy field"),
        (lambda m, t: m.pop("provenance"), "'provenance' missing"),
        (lambda m, t: t.update({"head.weight": torch.zeros(2, 32)}), "do not match the architecture's expected shapes"),
        (lambda m, t: t["head.bias"].fill_(float("nan")), "contains NaN or inf"),
    ],
)
def test_bad_metadata_and_tensors_are_refused_with_a_message(tmp_path: Path, edit, message: str) -> None:
    path = save_controller(_trained_like(), tmp_path / "c.safetensors")
    _rewrite_metadata(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_controller(path)


def test_safetensors_without_metalr_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a metalr controller"):
        read_metadata(path)


def test_oversized_header_is_refused_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_controller(path)


def test_shipped_names_resolve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    save_controller(_trained_like(), tmp_path / "mine.safetensors")
    monkeypatch.setenv("METALR_CHECKPOINTS", str(tmp_path))
    assert load_controller("mine").feature_spec.groups == ("loss", "grad", "progress")
    with pytest.raises(CheckpointError, match="shipped: mine"):
        load_controller("theirs")
