"""Controllers on the Hugging Face Hub: load ``hf://`` references, push checkpoints with a model card.

A reference follows ``huggingface_hub``'s own URI grammar (parsed by its ``parse_hf_uri``)::

    hf://owner/repo                              controller.safetensors at the default branch
    hf://owner/repo@v1.0                         ... at a branch, tag or commit
    hf://owner/repo/sgd/controller.safetensors   another file of the repository
    hf://owner/repo@v1.0/sgd/controller.safetensors

Downloads go through ``hf_hub_download`` and its cache (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``); the file then
goes through exactly the validation of a local file (:func:`metalr.checkpoint.load_controller`). Pushing
uploads the checkpoint and a model card built from its metadata in one commit.

``huggingface_hub`` is imported only here, and only when a Hub function runs, so deploying a local
controller never imports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from metalr.checkpoint import CheckpointError, load_controller, read_metadata, resolve_checkpoint

HF_SCHEME = "hf://"
DEFAULT_FILENAME = "controller.safetensors"
CARD_TAGS = ["metalr", "learning-rate-scheduler"]
_REFERENCE_FORMAT = "hf://owner/repo[@revision][/file.safetensors]"


def is_hub_reference(path_or_name: str | os.PathLike[str]) -> bool:
    """Whether ``path_or_name`` names a controller on the Hub (``hf://...``) rather than a file or name."""
    return isinstance(path_or_name, str) and path_or_name.startswith(HF_SCHEME)


def _huggingface_hub() -> ModuleType:
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            "controllers on the Hugging Face Hub need the huggingface_hub package: pip install huggingface_hub"
        ) from None
    return huggingface_hub


@dataclass(frozen=True)
class HubLocation:
    """One file of a Hub model repository."""

    repo_id: str  # "owner/name"
    filename: str  # path inside the repository
    revision: str | None  # branch, tag or commit; None = the default branch


def parse_hub_reference(reference: str, revision: str | None = None) -> HubLocation:
    """Split ``hf://owner/repo[@revision][/file.safetensors]`` into repository, file and revision.

    Args:
        reference: the ``hf://`` reference.
        revision: a revision given separately (``load_controller(..., revision=...)``); it must agree with
            one written after ``@``.

    Raises:
        CheckpointError: a malformed reference or repository id, a non-model repository, a file path that
            leaves the repository (``..``) or is not ``.safetensors``, or two different revisions.
    """
    hub = _huggingface_hub()
    try:
        uri = hub.parse_hf_uri(reference)
    except ValueError as err:  # HfUriError: names what is wrong with the id, revision or path
        raise CheckpointError(f"{reference!r} is not a usable Hub reference ({err}); expected {_REFERENCE_FORMAT}") from None
    if uri.type != "model":
        raise CheckpointError(f"{reference!r}: controllers live in model repositories, not a {uri.type}; expected {_REFERENCE_FORMAT}")
    filename = uri.path_in_repo or DEFAULT_FILENAME
    if any(part in ("", ".", "..") for part in filename.split("/")):
        raise CheckpointError(f"{reference!r}: the file path {filename!r} must stay inside the repository (no '.', '..' or empty parts)")
    if not filename.endswith(".safetensors"):
        raise CheckpointError(f"{reference!r}: {filename!r} is not a .safetensors file; metalr loads only .safetensors controllers")
    if revision is not None and uri.revision is not None and revision != uri.revision:
        raise CheckpointError(f"{reference!r} names revision {uri.revision!r} but revision={revision!r} was also given")
    return HubLocation(uri.id, filename, revision if revision is not None else uri.revision)


def download_controller(reference: str, revision: str | None = None) -> Path:
    """The local (cached) path of the controller file a ``hf://`` reference names, downloading it if needed.

    Raises:
        CheckpointError: a bad reference (see :func:`parse_hub_reference`), or the file cannot be had: no such
            repository, revision or file, or not cached while offline.
    """
    from metalr import __version__

    hub = _huggingface_hub()
    location = parse_hub_reference(reference, revision)
    at = f"{location.filename} at revision {location.revision or 'main'} of {location.repo_id}"
    errors = hub.errors
    try:
        path = hub.hf_hub_download(
            location.repo_id,
            location.filename,
            revision=location.revision,
            library_name="metalr",
            library_version=__version__,
        )
    except errors.LocalEntryNotFoundError:  # offline, or the Hub unreachable, and not in the cache
        problem = f"{at} is not in the local Hugging Face cache and the Hub could not be reached (HF_HUB_OFFLINE or no network)"
    except errors.RepositoryNotFoundError:
        problem = f"no model repository {location.repo_id!r} on the Hub (or it is private or gated and you are not logged in)"
    except errors.RevisionNotFoundError:
        problem = f"no revision {location.revision!r} in {location.repo_id}"
    except errors.EntryNotFoundError:
        problem = f"no file {at}"
    except (errors.HfHubHTTPError, OSError) as err:
        problem = f"downloading {at} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    else:
        return Path(path)
    raise CheckpointError(f"{reference}: {problem}")


def model_card(meta: dict[str, Any], repo_id: str, filename: str = DEFAULT_FILENAME) -> Any:
    """A ``huggingface_hub.ModelCard`` describing a controller from its checkpoint metadata."""
    hub = _huggingface_hub()
    family = meta.get("optimizer_family")
    data = hub.ModelCardData(library_name="metalr", tags=list(CARD_TAGS), optimizer_family=family)
    spec, arch, policy, provenance = meta["feature_spec"], meta["architecture"], meta["policy"], meta["provenance"]
    reference = f"hf://{repo_id}" + ("" if filename == DEFAULT_FILENAME else f"/{filename}")
    families = {"adam": "Adam / AdamW (`torch.optim.Adam`, `torch.optim.AdamW`)", "sgd": "SGD, with or without momentum (`torch.optim.SGD`)"}
    rows = [
        ("Optimizer family", families.get(family, f"`{family}`") if family else "none recorded (meta-trained on a mix of optimizers)"),
        ("Feature format", f"{spec['format']}: {len(spec['names'])} features from the groups {', '.join(spec['groups'])}"),
        ("Network", f"{arch['kind']}, hidden {arch['hidden']}"),
        ("LR bounds", f"{policy['min_lr']:g} to {policy['max_lr']:g}"),
        ("Factor bounds", f"{policy['min_factor']:g}x to {policy['max_factor']:g}x the `{policy['base_schedule']}` base schedule"),
        ("Largest step", f"{policy['max_log_step']:g} in log LR per step; divergence guard divides the LR by {policy['guard_cut']:g}"),
        ("Checkpoint", f"`{filename}`, metalr format {meta['format_version']}, tensor SHA-256 `{meta['tensor_sha256']}`"),
    ]
    body = "\n".join(
        [
            f"# {repo_id}",
            "",
            "A meta-learned learning-rate controller for PyTorch, made with metalr (`pip install metalr`).",
            "It runs as a `torch.optim.lr_scheduler.LRScheduler` that sets the learning rate from what it observes",
            "(loss, gradients, progress) at every step.",
            "",
            "## Usage",
            "",
            "```python",
            "from metalr import LearnedLR, load_controller",
            "",
            f'controller = load_controller("{reference}")  # add @<revision> after the repo id to pin a version',
            "scheduler = LearnedLR(optimizer, controller, total_steps=num_steps)",
            "for batch in batches:",
            "    loss = compute_loss(model, batch)",
            "    optimizer.zero_grad()",
            "    loss.backward()",
            "    optimizer.step()",
            "    scheduler.step(loss)",
            "```",
            "",
            "## Controller",
            "",
            "| | |",
            "|---|---|",
            *(f"| {key} | {value} |" for key, value in rows),
            "",
            "## Provenance",
            "",
            *(f"- {key}: `{value}`" for key, value in sorted(provenance.items())),
            "",
        ]
    )
    return hub.ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def push_controller(
    path_or_name: str | os.PathLike[str],
    repo_id: str,
    *,
    filename: str = DEFAULT_FILENAME,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a controller checkpoint and its model card (``README.md``) to a Hub model repository.

    The file is validated exactly as :func:`metalr.checkpoint.load_controller` does first, so nothing that
    would not load is published. The repository is created when missing; both files go in one commit.

    Example:
        >>> push_controller("runs/demo/controller/best.safetensors", "me/demo-lr")   # doctest: +SKIP
        'https://huggingface.co/me/demo-lr/commit/...'

    Returns:
        The URL of the commit.

    Raises:
        CheckpointError: the checkpoint does not load, or ``repo_id``/``filename`` is malformed.
    """
    hub = _huggingface_hub()
    path = resolve_checkpoint(path_or_name)
    load_controller(path)
    meta = read_metadata(path)
    # The rules of loading it back; a repo id that is not owner/name would re-split ("me" + "c.safetensors").
    location = parse_hub_reference(f"{HF_SCHEME}{repo_id}/{filename}")
    if (location.repo_id, location.filename) != (repo_id, filename):
        raise CheckpointError(f"repository id {repo_id!r} must be owner/name (and the file a path inside it, got {filename!r})")
    api = hub.HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    operations = [
        hub.CommitOperationAdd(path_in_repo=filename, path_or_fileobj=str(path)),
        hub.CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(model_card(meta, repo_id, filename)).encode()),
    ]
    commit = api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or f"Upload metalr controller {filename}",
        repo_type="model",
    )
    return str(commit.commit_url)
