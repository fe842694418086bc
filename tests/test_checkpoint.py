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
from metalr.checkpoint import (
    FORMAT_VERSION,
    METADATA_KEY,
    default_controller_name,
    family_of_optimizer_names,
    optimizer_family,
    read_metadata,
    tensor_digest,
)
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
    with pytest.raises(CheckpointError, match=r"evil.safetensors: not a safetensors file \(looks like a PyTorch pickle/zip"):
        load_controller(disguised)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_torch_save_output_renamed_safetensors_is_named_as_such(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "renamed.safetensors"
    torch.save(LRController().state_dict(), path, _use_new_zipfile_serialization=not legacy)
    assert path.read_bytes().startswith(b"\x80" if legacy else b"PK\x03\x04")
    with pytest.raises(CheckpointError, match=r"renamed.safetensors: not a safetensors file \(looks like a PyTorch pickle/zip checkpoint"):
        load_controller(path)


def _tensor_data_offset(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_flipped_bytes_in_the_tensor_data_fail_the_checksum(tmp_path: Path) -> None:
    path = save_controller(_trained_like(), tmp_path / "c.safetensors")
    data = bytearray(path.read_bytes())
    start = _tensor_data_offset(path)
    for i in range(60):  # the report: 60 flipped bytes loaded silently
        data[start + 37 * i] ^= 0x01  # lowest mantissa bit: the weights stay finite and plausible
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"c.safetensors: tensor data does not match the checksum"):
        load_controller(path)


def test_one_flipped_bit_fails_the_checksum(tmp_path: Path) -> None:
    path = save_controller(_trained_like(), tmp_path / "c.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_controller(path)


def test_the_digest_covers_names_dtypes_shapes_and_bytes_not_the_layout() -> None:
    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(4)
    reference = tensor_digest({"a": a, "b": b})
    assert tensor_digest({"b": b, "a": a}) == reference  # insertion order is not part of it
    assert tensor_digest({"a": a.t().contiguous().t(), "b": b}) == reference  # nor memory layout
    for changed in (
        {"a": b, "b": a},  # names
        {"a": a.double(), "b": b},  # dtype
        {"a": a.reshape(3, 2), "b": b},  # shape, same bytes
        {"a": a, "b": b * (1 + 1e-7)},  # bytes
        {"ab": a, "": b},  # boundaries between fields
    ):
        assert tensor_digest(changed) != reference


def test_the_digest_ignores_safetensors_layout(tmp_path: Path) -> None:
    path = save_controller(_trained_like(), tmp_path / "c.safetensors")
    meta = read_metadata(path)

    def reorder(m, tensors):  # same tensors, written in the opposite order with other metadata spacing
        items = list(tensors.items())[::-1]
        tensors.clear()
        tensors.update(items)

    _rewrite_metadata(path, reorder, rehash=False)
    assert read_metadata(path)["tensor_sha256"] == meta["tensor_sha256"]
    load_controller(path)


def test_version_1_files_are_refused_naming_both_versions(tmp_path: Path) -> None:
    path = save_controller(_trained_like(), tmp_path / "old.safetensors")
    _rewrite_metadata(path, lambda m, t: (m.update(format_version=1), m.pop("tensor_sha256")))
    assert FORMAT_VERSION == 2
    with pytest.raises(CheckpointError, match="old.safetensors: checkpoint format_version 1 is no longer read; this metalr reads format_version 2"):
        load_controller(path)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = save_controller(_trained_like(), tmp_path / "c.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="c.safetensors"):
        load_controller(path)


def _rewrite_metadata(path: Path, edit, rehash: bool = True) -> None:
    """Apply ``edit(meta, tensors)`` and rewrite the file; ``rehash`` keeps the checksum valid, as a forger would."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()[METADATA_KEY])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    digest = meta.get("tensor_sha256")
    edit(meta, tensors)
    if rehash and digest is not None and meta.get("tensor_sha256") == digest:  # unless the edit is to the digest
        meta["tensor_sha256"] = tensor_digest(tensors)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m, t: m.update(format_version=99), "unknown checkpoint format_version 99"),
        (lambda m, t: m["feature_spec"].update(groups=["loss", "telepathy"]), "unknown feature group"),
        (lambda m, t: m["feature_spec"].update(format=7), "meta-trained on feature format 7; this version of metalr computes feature format 2"),
        (lambda m, t: m["feature_spec"]["names"].reverse(), "feature names .* do not match"),
        (lambda m, t: m["architecture"].update(input_dim=3), "input_dim 3 does not match"),
        (lambda m, t: m["architecture"].update(kind="transformer"), "unknown controller kind 'transformer'"),
        (lambda m, t: m["policy"].update(min_lr=-1.0), "need 0 < min_lr < max_lr"),
        (lambda m, t: m["policy"].update(exec="rm -rf /"), "unknown policy field"),
        (lambda m, t: m.pop("provenance"), "'provenance' missing"),
        (lambda m, t: m.pop("tensor_sha256"), "'tensor_sha256' missing"),
        (lambda m, t: m.update(tensor_sha256="0" * 63), "'tensor_sha256' missing or not a lowercase hex SHA-256"),
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


# ---------------------------------------------------------------------------------------------------------
# Optimizer families: which base optimizers a controller was meta-trained for, and the default by family.


class _MyAdam(torch.optim.Adam):
    pass


@pytest.mark.parametrize(
    ("make", "family"),
    [
        (lambda p: torch.optim.Adam(p), "adam"),
        (lambda p: torch.optim.AdamW(p), "adam"),
        (lambda p: _MyAdam(p), "adam"),
        (lambda p: torch.optim.SGD(p, lr=0.1), "sgd"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "sgd"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "sgd"),
    ],
)
def test_optimizer_family_of_torch_optimizers(make, family: str) -> None:
    assert optimizer_family(make(torch.nn.Linear(2, 1).parameters())) == family


@pytest.mark.parametrize("make", [torch.optim.RMSprop, torch.optim.NAdam, torch.optim.Adagrad])
def test_other_optimizers_have_no_family(make) -> None:
    optimizer = make(torch.nn.Linear(2, 1).parameters())
    with pytest.raises(ValueError, match=rf"no controller family for torch\.optim\..*{make.__name__}; supported: 'adam' .* 'sgd'"):
        optimizer_family(optimizer)


def test_family_of_base_optimizer_names() -> None:
    assert family_of_optimizer_names(["adam", "adamw"]) == "adam"
    assert family_of_optimizer_names(["sgd", "momentum"]) == "sgd"
    assert family_of_optimizer_names(["sgd", "momentum", "adam"]) is None
    assert family_of_optimizer_names([]) is None
    with pytest.raises(ValueError, match="unknown base optimizer 'lion'"):
        family_of_optimizer_names(["adam", "lion"])


def test_the_family_is_saved_loaded_and_kept_when_resaved(tmp_path: Path) -> None:
    path = save_controller(_trained_like(), tmp_path / "a.safetensors", optimizer_family="adam")
    assert read_metadata(path)["optimizer_family"] == "adam"
    loaded = load_controller(path)
    assert loaded.optimizer_family == "adam"
    assert load_controller(save_controller(loaded, tmp_path / "again.safetensors")).optimizer_family == "adam"
    assert load_controller(save_controller(_trained_like(), tmp_path / "none.safetensors")).optimizer_family is None
    with pytest.raises(ValueError, match=r"optimizer_family must be one of \['adam', 'sgd'\] or None, got 'momentum'"):
        save_controller(_trained_like(), tmp_path / "bad.safetensors", optimizer_family="momentum")


def test_a_file_without_the_family_field_loads_as_none(tmp_path: Path) -> None:
    path = save_controller(_trained_like(), tmp_path / "c.safetensors", optimizer_family="sgd")
    _rewrite_metadata(path, lambda m, t: m.pop("optimizer_family"))
    assert load_controller(path).optimizer_family is None


def test_an_unknown_family_in_a_file_is_refused(tmp_path: Path) -> None:
    path = save_controller(_trained_like(), tmp_path / "c.safetensors")
    _rewrite_metadata(path, lambda m, t: m.update(optimizer_family="rmsprop"))
    with pytest.raises(CheckpointError, match=r"c.safetensors: unknown optimizer_family 'rmsprop'; expected one of \['adam', 'sgd'\] or null"):
        load_controller(path)


def _params() -> list[torch.nn.Parameter]:
    return list(torch.nn.Linear(2, 1).parameters())


def test_the_default_controller_is_chosen_by_the_checkpoints_own_family(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, family in [("zz-adam", "adam"), ("b-adam", "adam"), ("a-mixed", None), ("sgd-x", "sgd")]:
        save_controller(_trained_like(), tmp_path / f"{name}.safetensors", optimizer_family=family)
    monkeypatch.setenv("METALR_CHECKPOINTS", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    Path("b-adam").write_text("a file in the working directory is not a shipped controller")
    assert default_controller_name(torch.optim.AdamW(_params())) == "b-adam"  # alphabetical among the adam ones
    assert default_controller_name(torch.optim.SGD(_params(), lr=0.1, momentum=0.9)) == "sgd-x"
    assert load_controller(default_controller_name(torch.optim.SGD(_params(), lr=0.1))).optimizer_family == "sgd"


def test_no_matching_controller_lists_the_shipped_ones_and_their_families(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    save_controller(_trained_like(), tmp_path / "mixed.safetensors")
    save_controller(_trained_like(), tmp_path / "adam-only.safetensors", optimizer_family="adam")
    monkeypatch.setenv("METALR_CHECKPOINTS", str(tmp_path))
    with pytest.raises(CheckpointError, match=rf"no shipped controller is meta-trained for 'sgd' optimizers like SGD; shipped in {tmp_path}: adam-only \(adam\), mixed \(no family\)"):
        default_controller_name(torch.optim.SGD(_params(), lr=0.1))
    with pytest.raises(ValueError, match="no controller family"):
        default_controller_name(torch.optim.RMSprop(_params()))
