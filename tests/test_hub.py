"""Controllers on the Hugging Face Hub, offline: ``hf://`` references are read from a cache laid out as
``huggingface_hub`` itself lays it out, and pushing goes to a fake ``HfApi`` that records what it was sent."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

from metalr import CheckpointError, LRController, load_controller, save_controller
from metalr.checkpoint import read_metadata
from metalr.cli import main
from metalr.controller import PolicyConfig
from metalr.features import FeatureSpec
from metalr.hub import CARD_TAGS, parse_hub_reference, push_controller

REPO = "owner/controllers"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache; the client reads it at call time and may not touch the network."""
    directory = tmp_path / "hf-cache"
    directory.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(directory))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return directory


def _cache_file(cache: Path, filename: str, content: bytes, ref: str = "main", commit: str = COMMIT, repo: str = REPO) -> None:
    """Store ``content`` as ``filename`` of ``repo`` at ``commit`` (``refs/<ref>`` points there), as a download would."""
    root = cache / f"models--{repo.replace('/', '--')}"
    blob = root / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    snapshot = root / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.unlink(missing_ok=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))


def _controller(seed: int = 0) -> LRController:
    torch.manual_seed(seed)
    controller = LRController(FeatureSpec(groups=("loss", "grad", "progress")), PolicyConfig(base_schedule="cosine", max_lr=0.5))
    with torch.no_grad():
        for p in controller.parameters():
            p.normal_(0, 0.2)
    return controller


def _saved(tmp_path: Path, seed: int = 0, **kwargs: Any) -> Path:
    return save_controller(_controller(seed), tmp_path / f"c{seed}.safetensors", {"recipe": "unit", "seed": seed}, **kwargs)


def _same_weights(a: LRController, b: LRController) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_repo_reference_loads_its_default_file_from_the_cache(cache: Path, tmp_path: Path) -> None:
    _cache_file(cache, "controller.safetensors", _saved(tmp_path).read_bytes())
    loaded = load_controller(f"hf://{REPO}")
    assert _same_weights(loaded, _controller(0))
    assert Path(loaded.source_path).is_relative_to(cache / "models--owner--controllers" / "snapshots" / COMMIT)


def test_revisions_and_files_inside_the_repo(cache: Path, tmp_path: Path) -> None:
    other = "fedcba9876543210fedcba9876543210fedcba98"
    _cache_file(cache, "controller.safetensors", _saved(tmp_path, 0).read_bytes())
    _cache_file(cache, "controller.safetensors", _saved(tmp_path, 1).read_bytes(), ref="v1", commit=other)
    _cache_file(cache, "sgd/fast.safetensors", _saved(tmp_path, 2).read_bytes(), ref="v1", commit=other)
    assert _same_weights(load_controller(f"hf://{REPO}@v1"), _controller(1))
    assert _same_weights(load_controller(f"hf://{REPO}", revision="v1"), _controller(1))
    assert _same_weights(load_controller(f"hf://{REPO}@{other}"), _controller(1))  # a commit, no ref needed
    assert _same_weights(load_controller(f"hf://{REPO}@v1/sgd/fast.safetensors"), _controller(2))
    assert _same_weights(load_controller(f"hf://{REPO}"), _controller(0))
    with pytest.raises(CheckpointError, match="names revision 'v1' but revision='main' was also given"):
        load_controller(f"hf://{REPO}@v1", revision="main")


def test_a_file_not_in_the_cache_while_offline_is_a_clear_error(cache: Path) -> None:
    with pytest.raises(CheckpointError, match=rf"hf://{REPO}@v9: controller.safetensors at revision v9 of {REPO} is not in the local Hugging Face cache"):
        load_controller(f"hf://{REPO}@v9")


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("hf://../../x", r"'hf://../../x' is not a usable Hub reference \(.*Repo id must"),
        ("hf://owner", "is not a usable Hub reference"),
        ("hf://owner/repo/../../../etc/passwd.safetensors", r"the file path '../../../etc/passwd.safetensors' must stay inside the repository"),
        ("hf://owner/repo/a//b.safetensors", "is not a usable Hub reference .*empty segments"),
        ("hf://owner/repo/model.pt", r"'model.pt' is not a .safetensors file"),
        ("hf://datasets/owner/repo", "controllers live in model repositories, not a dataset"),
    ],
)
def test_hostile_or_malformed_references_are_refused(cache: Path, reference: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        load_controller(reference)


def test_a_downloaded_file_gets_the_same_validation_as_a_local_one(cache: Path, tmp_path: Path) -> None:
    _cache_file(cache, "pickle.safetensors", pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="pickle.safetensors: not a safetensors file \\(looks like a PyTorch pickle"):
        load_controller(f"hf://{REPO}/pickle.safetensors")
    corrupt = bytearray(_saved(tmp_path).read_bytes())
    corrupt[-5] ^= 0x01
    _cache_file(cache, "corrupt.safetensors", bytes(corrupt))
    with pytest.raises(CheckpointError, match="corrupt.safetensors: tensor data does not match the checksum"):
        load_controller(f"hf://{REPO}/corrupt.safetensors")


def test_learned_lr_takes_a_hub_reference(cache: Path, tmp_path: Path) -> None:
    from metalr import LearnedLR

    _cache_file(cache, "controller.safetensors", _saved(tmp_path).read_bytes())
    model = torch.nn.Linear(2, 1)
    scheduler = LearnedLR(torch.optim.SGD(model.parameters(), lr=0.1), f"hf://{REPO}", total_steps=10)
    assert _same_weights(scheduler.controller, _controller(0))


def test_revision_applies_only_to_hub_references(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="revision='v1' applies only to hf:// references"):
        load_controller(_saved(tmp_path), revision="v1")


def test_a_missing_hub_client_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(CheckpointError, match="need the huggingface_hub package: pip install huggingface_hub"):
        load_controller(f"hf://{REPO}")


# ---------------------------------------------------------------------------------------------------------
# Pushing, to a fake HfApi that commits into the offline cache (so what was pushed can be loaded back).


class _FakeApi:
    calls: list[tuple[str, Any]] = []
    cache: Path
    fail: Exception | None = None

    def __init__(self, **kwargs: Any) -> None:
        _FakeApi.calls.append(("init", kwargs))

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        _FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if _FakeApi.fail is not None:
            raise _FakeApi.fail

    def create_commit(self, repo_id: str, operations: list[Any], **kwargs: Any) -> Any:
        files = {}
        for op in operations:
            content = op.path_or_fileobj
            files[op.path_in_repo] = Path(content).read_bytes() if isinstance(content, str) else content
            _cache_file(_FakeApi.cache, op.path_in_repo, files[op.path_in_repo], repo=repo_id)
        _FakeApi.calls.append(("create_commit", {"repo_id": repo_id, "files": files, **kwargs}))
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{COMMIT}", commit_message="", commit_description="", oid=COMMIT
        )


@pytest.fixture
def fake_api(cache: Path, monkeypatch: pytest.MonkeyPatch) -> type[_FakeApi]:
    _FakeApi.calls, _FakeApi.cache, _FakeApi.fail = [], cache, None
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    return _FakeApi


def test_push_uploads_the_file_and_a_model_card_in_one_commit(fake_api: type[_FakeApi], tmp_path: Path) -> None:
    path = _saved(tmp_path, optimizer_family="sgd")
    url = push_controller(path, "me/sgd-lr", private=True)
    assert url == f"https://huggingface.co/me/sgd-lr/commit/{COMMIT}"
    assert [name for name, _ in fake_api.calls] == ["init", "create_repo", "create_commit"]
    assert fake_api.calls[1][1] == {"repo_id": "me/sgd-lr", "repo_type": "model", "private": True, "exist_ok": True}
    commit = fake_api.calls[2][1]
    assert commit["repo_type"] == "model" and commit["commit_message"] == "Upload metalr controller controller.safetensors"
    assert set(commit["files"]) == {"controller.safetensors", "README.md"}
    assert commit["files"]["controller.safetensors"] == path.read_bytes()

    card = huggingface_hub.ModelCard(commit["files"]["README.md"].decode())
    assert card.data.tags == CARD_TAGS and card.data.library_name == "metalr"
    assert card.data.to_dict()["optimizer_family"] == "sgd"
    meta = read_metadata(path)
    for text in (
        "| Optimizer family | SGD, with or without momentum",
        f"| Feature format | {meta['feature_spec']['format']}: {len(meta['feature_spec']['names'])} features from the groups loss, grad, progress |",
        "| LR bounds | 1e-06 to 0.5 |",
        "| Factor bounds | 0.0001x to 100x the `cosine` base schedule |",
        f"tensor SHA-256 `{meta['tensor_sha256']}`",
        "- recipe: `unit`",
        f"- metalr_version: `{meta['provenance']['metalr_version']}`",
        'controller = load_controller("hf://me/sgd-lr")',
        "scheduler.step(loss)",
    ):
        assert text in card.text, text


def test_what_was_pushed_loads_back(fake_api: type[_FakeApi], tmp_path: Path) -> None:
    push_controller(_saved(tmp_path, 3, optimizer_family="adam"), "me/adam-lr", filename="adam/best.safetensors")
    card = fake_api.calls[-1][1]["files"]["README.md"].decode()
    assert 'load_controller("hf://me/adam-lr/adam/best.safetensors")' in card
    loaded = load_controller("hf://me/adam-lr/adam/best.safetensors")
    assert _same_weights(loaded, _controller(3)) and loaded.optimizer_family == "adam"


def test_push_refuses_a_checkpoint_that_does_not_load_before_calling_the_hub(fake_api: type[_FakeApi], tmp_path: Path) -> None:
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        push_controller(path, "me/x")
    for repo_id in ("not/a/repo", "me", "../x"):
        with pytest.raises(CheckpointError, match=f"repository id '{re.escape(repo_id)}' must be owner/name|is not a usable Hub reference"):
            push_controller(_saved(tmp_path, 1), repo_id)
    with pytest.raises(CheckpointError, match="must stay inside the repository"):
        push_controller(_saved(tmp_path, 1), "me/x", filename="../x.safetensors")
    assert fake_api.calls == []


def test_metalr_push(fake_api: type[_FakeApi], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _saved(tmp_path)
    assert main(["push", str(path), "me/lr", "--filename", "v2.safetensors"]) == 0
    assert f"pushed {path} to me/lr: https://huggingface.co/me/lr/commit/{COMMIT}" in capsys.readouterr().out
    assert set(fake_api.calls[-1][1]["files"]) == {"v2.safetensors", "README.md"}
    assert fake_api.calls[1][1]["private"] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["push", "nope", "me/lr"], "no controller checkpoint at 'nope'"),
        (["push", "CHECKPOINT", "me"], "repository id 'me' must be owner/name"),
        (["push", "CHECKPOINT", "me/lr"], "pushing CHECKPOINT to me/lr failed: 401 Unauthorized"),
    ],
)
def test_metalr_push_user_errors_are_one_line(
    argv: list[str], message: str, fake_api: type[_FakeApi], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(_saved(tmp_path))
    fake_api.fail = OSError("401 Unauthorized\nmore detail")  # what HfHubHTTPError (an OSError) looks like
    assert main([path if a == "CHECKPOINT" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert message.replace("CHECKPOINT", path) in err and len(err.strip().splitlines()) == 1, err


def test_parse_hub_reference_defaults() -> None:
    location = parse_hub_reference(f"hf://{REPO}")
    assert (location.repo_id, location.filename, location.revision) == (REPO, "controller.safetensors", None)
