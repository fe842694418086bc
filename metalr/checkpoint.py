"""One self-describing ``.safetensors`` file per controller.

Tensors hold the weights; the safetensors metadata holds one JSON document (key ``metalr``) with the
format version, architecture, feature spec, policy (LR bounds, base schedule, guardrail), provenance and
``tensor_sha256``, a SHA-256 of the weights (:func:`tensor_digest`) that is verified on every load, so a
corrupted download or a flipped bit is an error rather than a silently different controller. The optional
``optimizer_family`` (``"adam"``, ``"sgd"`` or null) says which base optimizers the controller was
meta-trained for; :func:`default_controller_name` picks a shipped controller by it.
:func:`load_controller` needs nothing but that file, and loading never unpickles: the safetensors format is
a JSON header plus raw little-endian buffers, so a crafted file cannot execute code. The metadata and every
tensor name and shape are validated before any weight is used. Writes are atomic (temporary file in the
same directory, fsync, rename), so a crash never leaves a torn checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from metalr.controller import ArchConfig, LRController, PolicyConfig
from metalr.features import FeatureSpec
from metalr.io import atomic_write
from metalr.shipped import list_shipped as list_shipped_files
from metalr.shipped import resolve_shipped, shipped_dir, source_checkout

FORMAT_VERSION = 2  # 2: tensor_sha256 (required)
METADATA_KEY = "metalr"
_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}
_MAX_METADATA_BYTES = 1 << 20
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MAX_CONTROLLER_PARAMETERS = 10_000_000  # a [64, 32] MLP has ~3k; refuse anything absurd before allocating


# Base-optimizer names of the task families -> the controller family meta-trained for them. Heavy-ball
# momentum is SGD's family, not one of its own: the shipped SGD controller is meta-trained on both.
OPTIMIZER_FAMILY_OF_NAME: dict[str, str] = {"sgd": "sgd", "momentum": "sgd", "adam": "adam", "adamw": "adam"}
OPTIMIZER_FAMILIES = ("adam", "sgd")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def optimizer_family(optimizer: torch.optim.Optimizer) -> str:
    """The controller family for a ``torch.optim`` optimizer.

    ``torch.optim.Adam`` and ``AdamW`` (and their subclasses) are ``"adam"``; ``torch.optim.SGD``, with or
    without momentum, is ``"sgd"``.

    Raises:
        ValueError: any other optimizer (the message names its class and the supported families).
    """
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam"
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    kind = type(optimizer)
    raise ValueError(
        f"no controller family for {kind.__module__}.{kind.__qualname__}; supported: 'adam' (torch.optim.Adam, "
        "AdamW and their subclasses) and 'sgd' (torch.optim.SGD, with or without momentum)"
    )


def family_of_optimizer_names(names: Iterable[str]) -> str | None:
    """The one family of base-optimizer names (``sgd``, ``momentum``, ``adam``, ``adamw``), or ``None`` if mixed.

    Raises:
        ValueError: an unknown optimizer name.
    """
    families = set()
    for name in names:
        if name not in OPTIMIZER_FAMILY_OF_NAME:
            raise ValueError(f"unknown base optimizer {name!r}; expected one of {sorted(OPTIMIZER_FAMILY_OF_NAME)}")
        families.add(OPTIMIZER_FAMILY_OF_NAME[name])
    return families.pop() if len(families) == 1 else None


def shipped_checkpoint_dir() -> Path:
    """Where ``load_controller(name)`` looks for named controllers (``$METALR_CHECKPOINTS`` overrides)."""
    return shipped_dir("checkpoints")


def list_shipped() -> list[str]:
    """Names of the controllers ``load_controller(name)`` finds."""
    return list_shipped_files("checkpoints")


def git_commit() -> str | None:
    """The git commit of the source checkout metalr runs from, if any (provenance only).

    An installed copy records none, even when its environment happens to sit inside some git repository.
    """
    checkout = source_checkout()
    if checkout is None:
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def save_controller(
    controller: LRController,
    path: str | Path,
    provenance: dict[str, Any] | None = None,
    *,
    optimizer_family: str | None = None,
) -> Path:
    """Write ``controller`` to ``path`` (a ``.safetensors`` file), atomically.

    Args:
        controller: the controller to save (its weights are stored as float32).
        path: destination; must end in ``.safetensors``.
        provenance: free-form JSON-serialisable facts (recipe, task suite, meta-steps, ...). The package
            version and git commit are added.
        optimizer_family: ``"adam"`` or ``"sgd"``, the base optimizers it was meta-trained for; default: the
            controller's own ``optimizer_family`` attribute (set by the meta-trainer and by
            :func:`load_controller`), else ``None`` (mixed or unknown).
    """
    from metalr import __version__

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: controller checkpoints must end in .safetensors")
    family = optimizer_family if optimizer_family is not None else getattr(controller, "optimizer_family", None)
    if family is not None and family not in OPTIMIZER_FAMILIES:
        raise ValueError(f"optimizer_family must be one of {list(OPTIMIZER_FAMILIES)} or None, got {family!r}")
    meta = {
        "format_version": FORMAT_VERSION,
        **controller.describe(),
        "optimizer_family": family,
        "provenance": {"metalr_version": __version__, "git_commit": git_commit(), **(provenance or {})},
    }
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in controller.net.state_dict().items()}
    meta["tensor_sha256"] = tensor_digest(tensors)
    header = json.dumps(meta, sort_keys=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: header}))
    return path


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a canonical serialisation of ``tensors``, independent of the file layout.

    For each tensor in sorted name order: its name, dtype, shape and raw bytes, each preceded by its length
    (so no two different dicts serialise alike). The bytes are in native order, little-endian on every
    platform torch supports, as in safetensors itself.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        dtype = str(tensor.dtype).removeprefix("torch.")
        for part in (name.encode(), dtype.encode(), json.dumps(list(tensor.shape)).encode(), raw):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


def resolve_checkpoint(path_or_name: str | os.PathLike[str], revision: str | None = None) -> Path:
    """The local file of a controller: a path, a shipped name, or a ``hf://`` reference (downloaded, cached).

    Args:
        path_or_name: a ``.safetensors`` path (an existing one wins over a name), a shipped name, or
            ``hf://owner/repo[@revision][/file.safetensors]`` (see :mod:`metalr.hub`).
        revision: the Hub branch, tag or commit, for ``hf://`` references only.
    """
    if isinstance(path_or_name, str) and path_or_name.startswith("hf://"):
        from metalr.hub import download_controller  # the Hub client is imported only for Hub references

        return download_controller(path_or_name, revision)
    if revision is not None:
        raise CheckpointError(f"revision={revision!r} applies only to hf:// references, not to {str(path_or_name)!r}")
    return resolve_shipped("checkpoints", path_or_name, CheckpointError)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read and validate the JSON metadata of a checkpoint without touching its tensors."""
    path = Path(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: refusing a {path.suffix} file - pickle-based checkpoints can execute code on load; "
            "metalr loads only .safetensors controllers"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: {_unreadable(path, err)}") from None
    if raw is None:
        raise CheckpointError(f"{path}: safetensors file has no '{METADATA_KEY}' metadata; not a metalr controller")
    if len(raw) > _MAX_METADATA_BYTES:
        raise CheckpointError(f"{path}: metadata is {len(raw)} bytes, more than the {_MAX_METADATA_BYTES} allowed")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, over-long integers, absurd nesting
        raise CheckpointError(f"{path}: metadata is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata must be a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if version == 1:
        raise CheckpointError(
            f"{path}: checkpoint format_version 1 is no longer read; this metalr reads format_version "
            f"{FORMAT_VERSION}, which adds a checksum of the weights (re-create the controller with this metalr)"
        )
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unknown checkpoint format_version {version!r}; this metalr reads version {FORMAT_VERSION}"
        )
    if not (isinstance(meta.get("tensor_sha256"), str) and _SHA256_HEX.fullmatch(meta["tensor_sha256"])):
        raise CheckpointError(f"{path}: metadata field 'tensor_sha256' missing or not a lowercase hex SHA-256")
    if meta.get("optimizer_family") not in (None, *OPTIMIZER_FAMILIES):
        raise CheckpointError(
            f"{path}: unknown optimizer_family {meta['optimizer_family']!r}; expected one of "
            f"{list(OPTIMIZER_FAMILIES)} or null"
        )
    for key, kind in (("architecture", dict), ("feature_spec", dict), ("policy", dict), ("provenance", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path}: metadata field '{key}' missing or not a {kind.__name__}")
    return meta


def _unreadable(path: Path, err: Exception) -> str:
    """Why safetensors could not open ``path``, naming the likely format when it is a pickle in disguise."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        head = b""
    # torch.save writes a zip archive (PK..) or, with the legacy format, a raw pickle (PROTO opcode 0x80 and
    # a protocol number). Only consulted once safetensors has failed, so a valid header length can't match.
    if head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return (
            "not a safetensors file (looks like a PyTorch pickle/zip checkpoint, e.g. torch.save output; "
            "pickles can execute code on load, so metalr never opens them)"
        )
    return f"not a readable safetensors file ({err})"


def default_controller_name(optimizer: torch.optim.Optimizer) -> str:
    """The shipped controller meta-trained for ``optimizer``'s family (see :func:`optimizer_family`).

    The choice reads each shipped checkpoint's own ``optimizer_family`` metadata (no table of names), in
    :func:`shipped_checkpoint_dir`. When several match, the alphabetically first name wins.

    Example:
        >>> default_controller_name(torch.optim.AdamW(model.parameters()))   # doctest: +SKIP
        'adam-cpu'

    Raises:
        ValueError: an optimizer outside the supported families.
        CheckpointError: no shipped controller is meta-trained for that family (the message lists each
            shipped controller with its family), or a shipped checkpoint is unreadable.
    """
    family = optimizer_family(optimizer)
    directory = shipped_checkpoint_dir()
    families = {name: read_metadata(directory / f"{name}.safetensors").get("optimizer_family") for name in list_shipped()}
    matching = [name for name in sorted(families) if families[name] == family]
    if not matching:
        shipped = ", ".join(f"{name} ({families[name] or 'no family'})" for name in sorted(families)) or "none"
        raise CheckpointError(
            f"no shipped controller is meta-trained for {family!r} optimizers like {type(optimizer).__name__}; "
            f"shipped in {directory}: {shipped}"
        )
    return matching[0]


def _typed_config(cls: type, data: dict[str, Any], what: str) -> Any:
    allowed = {f.name: f.type for f in fields(cls)}
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; expected {sorted(allowed)}")
    converted: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, bool) or not isinstance(value, (int, float, str, tuple)):
            raise ValueError(f"{what} field '{key}' has unsupported value {value!r}")
        converted[key] = value
    return cls(**converted)


def controller_from_metadata(meta: dict[str, Any]) -> LRController:
    """Build an (untrained) controller exactly as described by checkpoint metadata."""
    arch_data = dict(meta["architecture"])
    input_dim = arch_data.pop("input_dim", None)
    spec = FeatureSpec.from_dict(meta["feature_spec"])
    if input_dim != spec.dim:
        raise ValueError(f"architecture input_dim {input_dim} does not match the {spec.dim} features of the spec")
    arch = _typed_config(ArchConfig, arch_data, "architecture")
    policy = _typed_config(PolicyConfig, dict(meta["policy"]), "policy")
    # Bound what a crafted file can make us allocate before any tensor is read.
    widths = [spec.dim, *arch.hidden, 1]
    size = sum(a * b + b for a, b in zip(widths, widths[1:], strict=False)) * (4 if arch.kind == "lstm" else 1)
    if size > MAX_CONTROLLER_PARAMETERS:
        raise ValueError(f"architecture {arch} has {size} parameters, more than the {MAX_CONTROLLER_PARAMETERS} allowed")
    return LRController(spec, policy, arch)


def load_controller(
    path_or_name: str | os.PathLike[str], device: str | torch.device = "cpu", *, revision: str | None = None
) -> LRController:
    """Load a frozen controller from a ``.safetensors`` file, a shipped name or the Hugging Face Hub.

    Example:
        >>> controller = load_controller("checkpoints/demo.safetensors")   # or load_controller("demo")
        >>> controller = load_controller("hf://owner/repo@v1")             # doctest: +SKIP

    Args:
        path_or_name: see :func:`resolve_checkpoint`.
        device: where the controller's weights go.
        revision: Hub branch, tag or commit (``hf://`` references only; or write ``hf://owner/repo@revision``).

    Raises:
        CheckpointError: the file is missing, not safetensors, corrupt (including a weight checksum that
            does not match), of an unknown format version, or describes features/architecture this version
            cannot build, or its tensors do not match; or a Hub reference cannot be resolved.
    """
    path = resolve_checkpoint(path_or_name, revision)
    meta = read_metadata(path)
    try:
        controller = controller_from_metadata(meta)
    except (ValueError, TypeError, OverflowError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    expected = {k: tuple(v.shape) for k, v in controller.net.state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as handle:
            found = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
            if found != expected:
                raise CheckpointError(
                    f"{path}: tensors {found} do not match the architecture's expected shapes {expected}"
                )
            state = {k: handle.get_tensor(k) for k in expected}
    except SafetensorError as err:
        raise CheckpointError(f"{path}: corrupt tensor data ({err})") from None
    if tensor_digest(state) != meta["tensor_sha256"]:
        raise CheckpointError(
            f"{path}: tensor data does not match the checksum in its metadata (tensor_sha256): "
            "the file is corrupt or was modified after it was written"
        )
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor '{key}' contains NaN or inf")
    controller.net.load_state_dict(state)
    controller.provenance = dict(meta["provenance"])  # type: ignore[assignment]
    controller.optimizer_family = meta.get("optimizer_family")  # type: ignore[assignment]
    controller.source_path = str(path)  # type: ignore[assignment]
    return controller.to(device).eval().requires_grad_(False)
