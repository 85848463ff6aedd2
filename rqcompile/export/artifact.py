"""The deployable artifact: a directory with `manifest.json`, safetensors tensors and the lowered program.

Layout (format version 1)::

    out/
      manifest.json               what, by which versions, and sha256 + size of every other file
      quant_state.safetensors     per-layer K/V rotation / mean / scale / codebook (+ perm and widths with a
                                  calibrated bit allocation; see `quant_states_to_tensors`)
      tokenizer/...               the tokenizer's files (if given; never the model weights beside them)
      <program files>             model.pt2 (aoti), model.onnx (+ .onnx.data), model.engine, ...

Why it is built this way:

- Written into a hidden temporary sibling directory and renamed into place, so a crash or an exception mid-write
  never leaves a half artifact at the destination (and an existing one is only replaced with `overwrite=True`).
- Everything is verified on read: each listed file's size and sha256, so a truncated copy or a tampered file is
  refused with the file's name; the manifest's format version; the torch version rules below.
- Loading never unpickles: tensors are safetensors, and pickle-capable payloads (.pkl, .pt, .pth, .bin, ...) are
  refused whether listed or not.

Torch compatibility rules (`check_torch_compatibility`):

- ``aoti``: the package holds C++/Triton code compiled against one torch; it loads only under the same torch
  major.minor it was built with (AOTInductor promises no cross-version ABI).
- ``inductor`` / ``eager`` (quant state + config, recompiled at load): torch major must match and the running torch
  must be at least the oldest this project supports (2.11).
- ``onnx`` / ``tensorrt``: the program runs without torch; no torch rule (the TensorRT engine, if present, is tied
  to its TensorRT version, recorded by the writer).
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rqcompile.config import RQConfig
from rqcompile.quant.packing import runs
from rqcompile.quant.quantizer import QuantState, codebook_size

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST = "manifest.json"
QUANT_STATE_FILE = "quant_state.safetensors"
TOKENIZER_DIR = "tokenizer"
# What a transformers tokenizer reads from its directory (config.json: the model type, where tokenizer_config.json
# names no tokenizer class). Everything else in a tokenizer directory - model weights above all - is left out.
TOKENIZER_PATTERNS = (
    "tokenizer*.json",
    "tokenizer.model",
    "*.tiktoken",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*.json",
    "vocab*.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "chat_template*",
    "additional_chat_templates/*",
    "config.json",
)
TARGETS = ("eager", "inductor", "aoti", "onnx", "tensorrt")
# Files that can carry pickled (i.e. executable) payloads: never written, never loaded.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".npy", ".npz")
MIN_TORCH = (2, 11)
_STATE_NAMES = ("rotation", "mean", "scale", "levels")
_KINDS = ("k", "v")

QuantStates = Mapping[int, Mapping[str, QuantState]]  # layer index -> {"k": state, "v": state}


class ArtifactError(ValueError):
    """An artifact directory is malformed, corrupted, or not loadable by this rqcompile / torch."""


class ArtifactIntegrityError(ArtifactError):
    """A file is missing, truncated, tampered with, or an unlisted executable payload is present."""


class ArtifactVersionError(ArtifactError):
    """The format version or the torch version rules do not allow loading this artifact here."""


@dataclass
class Artifact:
    """A verified artifact directory (from `read_artifact` or `write_artifact`)."""

    path: Path
    manifest: dict[str, Any]
    unlisted: list[str] = field(default_factory=list)  # harmless extra files, never loaded

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def rq_config(self) -> RQConfig | None:
        data = self.manifest.get("rq_config")
        if data is None:
            return None
        return RQConfig.from_dict(data)

    @property
    def model_config(self) -> dict[str, Any] | None:
        return self.manifest.get("model_config")

    def file(self, relpath: str) -> Path:
        """Path of a listed file (refuses names the manifest does not list)."""
        if relpath not in self.manifest["files"]:
            raise ArtifactError(f"{relpath!r} is not listed in {self.path / MANIFEST}")
        return self.path / relpath

    def load_tensors(self, relpath: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.file(relpath)), device=str(device))

    def quant_states(self, device: str | torch.device = "cpu") -> dict[int, dict[str, QuantState]]:
        if QUANT_STATE_FILE not in self.manifest["files"]:
            return {}
        return load_quant_states(self.file(QUANT_STATE_FILE), device=device)

    @property
    def tokenizer_path(self) -> Path | None:
        return self.path / TOKENIZER_DIR if self.manifest.get("tokenizer") else None


# --- hashing -----------------------------------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def quant_state_digest(states: QuantStates) -> str:
    """sha256 over every quant-state tensor in a fixed order (layer, K then V, rotation/mean/scale/levels[/perm]).

    Names, dtypes, shapes, bits (or a bit allocation's widths, as a run list) and group are hashed with the bytes, so
    two artifacts with the same digest compress the cache identically. Uniform states hash exactly as they always
    did, so existing artifacts keep their digest.
    """
    digest = hashlib.sha256()
    for layer in sorted(states):
        for kind in _KINDS:
            if kind not in states[layer]:
                continue
            state = states[layer][kind]
            layout = f"bits={state.bits}" if state.uniform else f"widths={format_widths(state.widths)}"
            digest.update(f"{layer}.{kind}:{layout}:group={state.group}\n".encode())
            for name, tensor in _state_tensors(state).items():
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
                digest.update(_tensor_bytes(tensor))
    return "sha256:" + digest.hexdigest()


def _state_tensors(state: QuantState) -> dict[str, torch.Tensor]:
    """The tensors stored per state, in order: rotation, mean, scale, levels, then perm when it has one."""
    out = {name: getattr(state, name) for name in _STATE_NAMES}
    if state.perm is not None:
        out["perm"] = state.perm
    return out


# --- bit-allocation layouts ----------------------------------------------------------------------------------------


def format_widths(widths: tuple[int, ...]) -> str:
    """Per-coordinate widths as a compact run list, `"4x48,2x16"` (width x count, in order): 64 numbers in one
    short metadata string, and readable in `rqcompile inspect`."""
    return ",".join(f"{width}x{count}" for width, _, count in runs(widths))


def parse_widths(text: str, dim: int, where: str = "") -> tuple[int, ...]:
    """Inverse of `format_widths`, checked: the runs must cover `dim` coordinates and be a valid packing layout."""
    try:
        pairs = [item.split("x") for item in text.split(",")]
        widths = tuple(int(w) for w, n in pairs for _ in range(int(n)))
    except ValueError:
        raise ArtifactError(f"{where}widths {text!r} is not a run list like '4x48,2x16' (width x count)") from None
    if len(widths) != dim:
        raise ArtifactError(f"{where}widths {text!r} cover {len(widths)} coordinates, head_dim is {dim}")
    try:
        runs(widths)
    except ValueError as exc:
        raise ArtifactError(f"{where}widths {text!r}: {exc}") from None
    return widths


# --- quant state as safetensors ------------------------------------------------------------------------------------


def quant_states_to_tensors(states: QuantStates) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten to safetensors form: tensors `layers.{i}.{k|v}.{name}` and string metadata for bits/group.

    A calibrated bit allocation's state also stores `perm` (int64 [H, d]) and, instead of `bits`, its per-coordinate
    widths as a run list (`{prefix}.widths`, `format_widths`); uniform states are written exactly as before."""
    tensors, metadata = {}, {}
    for layer in sorted(states):
        for kind, state in states[layer].items():
            if kind not in _KINDS:
                raise ValueError(f"quant state kind must be 'k' or 'v', got {kind!r} (layer {layer})")
            prefix = f"layers.{int(layer)}.{kind}"
            for name, tensor in _state_tensors(state).items():
                tensors[f"{prefix}.{name}"] = tensor.detach().cpu().contiguous().clone()
            if state.uniform:
                metadata[f"{prefix}.bits"] = str(state.bits)
            else:
                metadata[f"{prefix}.widths"] = format_widths(state.widths)
            metadata[f"{prefix}.group"] = str(state.group)
            if state.along_keys:  # RQConfig(value_layout="keys"); absent: packed per token, as before it existed
                metadata[f"{prefix}.along_keys"] = "1"
    metadata["format"] = f"rqcompile-quant-state-v{FORMAT_VERSION}"
    return tensors, metadata


def save_quant_states(states: QuantStates, path: str | Path) -> Path:
    """Write per-layer QuantStates to one safetensors file (no pickle)."""
    from safetensors.torch import save_file

    tensors, metadata = quant_states_to_tensors(states)
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def load_quant_states(path: str | Path, device: str | torch.device = "cpu") -> dict[int, dict[str, QuantState]]:
    """Inverse of `save_quant_states`."""
    from safetensors import safe_open

    states: dict[int, dict[str, QuantState]] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        metadata = handle.metadata() or {}
        keys = set(handle.keys())
        prefixes = sorted({k.rsplit(".", 1)[0] for k in keys}, key=lambda p: (int(p.split(".")[1]), p))
        for prefix in prefixes:
            _, layer, kind = prefix.split(".")
            missing = [n for n in _STATE_NAMES if f"{prefix}.{n}" not in keys]
            has_layout = f"{prefix}.bits" in metadata or f"{prefix}.widths" in metadata
            if missing or not has_layout or f"{prefix}.group" not in metadata:
                raise ArtifactError(f"{path}: incomplete quant state for {prefix} (missing {missing or 'bits/group'})")
            tensors = {n: handle.get_tensor(f"{prefix}.{n}") for n in _STATE_NAMES}
            perm = handle.get_tensor(f"{prefix}.perm") if f"{prefix}.perm" in keys else None
            state = _rebuild_state(tensors, perm, metadata, prefix, f"{path}: {prefix}: ")
            states.setdefault(int(layer), {})[kind] = state
    return states


def _rebuild_state(
    tensors: dict[str, torch.Tensor], perm: torch.Tensor | None, metadata: dict[str, str], prefix: str, where: str
) -> QuantState:
    """One QuantState from its stored tensors and metadata, refusing a layout that does not fit them (a perm that
    is not a per-head permutation of the channels, widths whose codebooks `levels` does not hold)."""
    dim = tensors["mean"].shape[-1]
    if f"{prefix}.widths" in metadata:
        widths: int | tuple[int, ...] = parse_widths(metadata[f"{prefix}.widths"], dim, where)
    else:
        widths = int(metadata[f"{prefix}.bits"])
    if perm is not None:
        _check_perm(perm, tuple(tensors["mean"].shape), where)
    _check_levels(tensors["levels"], (widths,) * dim if isinstance(widths, int) else widths, where)
    try:
        along_keys = metadata.get(f"{prefix}.along_keys", "0")
        if along_keys not in ("0", "1"):
            raise ValueError(f"along_keys must be '0' or '1', got {along_keys!r}")
        group = int(metadata[f"{prefix}.group"])
        return QuantState(**tensors, widths=widths, group=group, perm=perm, along_keys=along_keys == "1")
    except ValueError as exc:
        raise ArtifactError(f"{where}inconsistent quant state: {exc}") from None


def _check_perm(perm: torch.Tensor, shape: tuple[int, ...], where: str) -> None:
    if perm.dtype != torch.int64 or tuple(perm.shape) != shape:
        raise ArtifactError(
            f"{where}perm is {perm.dtype} {tuple(perm.shape)}, expected int64 {shape} ([heads, head_dim] like mean)"
        )
    expected = torch.arange(shape[-1], device=perm.device)
    bad = [h for h in range(shape[0]) if not torch.equal(perm[h].sort().values, expected)]
    if bad:
        raise ArtifactError(f"{where}perm of heads {bad} is not a permutation of the channels 0..{shape[-1] - 1}")


def _check_levels(levels: torch.Tensor, widths: tuple[int, ...], where: str) -> None:
    """`levels` must be one Lloyd-Max codebook per run of the widths (2**w levels, ascending, exactly symmetric
    about 0: the v2 encoder codes magnitudes from the upper half), then only positive scale candidates: so widths
    that claim more or fewer (or other) codebooks than were stored are caught by content, without knowing how many
    candidates there are."""
    try:
        need = codebook_size(widths)
    except ValueError as exc:
        raise ArtifactError(f"{where}{exc}") from None
    layout = format_widths(widths)
    if levels.dim() != 1 or levels.numel() < need:
        raise ArtifactError(
            f"{where}levels has {levels.numel()} values, but the widths ({layout}) need {need} codebook levels"
        )
    start = 0
    for width, _, _ in runs(widths):
        codebook = levels[start : start + 2**width].float()
        if not bool((codebook[1:] > codebook[:-1]).all()) or not torch.equal(codebook, -codebook.flip(0)):
            raise ArtifactError(
                f"{where}levels[{start}:{start + 2**width}] is not a {width}-bit codebook (ascending, symmetric): the "
                f"widths ({layout}) do not match levels"
            )
        start += 2**width
    if not bool((levels[need:] > 0).all()):
        raise ArtifactError(
            f"{where}levels after the {need} codebook levels of the widths ({layout}) are not all positive scale "
            "candidates: the widths do not match levels"
        )


# --- writing -----------------------------------------------------------------------------------------------------


def _check_relpath(relpath: str) -> str:
    parts = Path(relpath).parts
    if not relpath or Path(relpath).is_absolute() or ".." in parts or relpath == MANIFEST:
        raise ValueError(f"artifact file name {relpath!r} must be a relative path inside the artifact")
    if relpath.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(f"refusing {relpath!r}: {Path(relpath).suffix} files can carry pickled code; use safetensors")
    return Path(relpath).as_posix()


def tokenizer_files(tokenizer_dir: str | Path) -> list[Path]:
    """The files of `tokenizer_dir` a transformers tokenizer loads (`TOKENIZER_PATTERNS`), nothing else.

    The tokenizer directory is usually the model directory: copying all of it would put the original weights
    (model.safetensors, or a pickle-capable pytorch_model.bin) into every artifact.
    """
    root = Path(tokenizer_dir)
    return [
        src
        for src in sorted(root.rglob("*"))
        if src.is_file() and any(fnmatch.fnmatch(src.relative_to(root).as_posix(), p) for p in TOKENIZER_PATTERNS)
    ]


def _jsonable(config: Any) -> dict[str, Any] | None:
    """A model config as plain JSON: transformers configs via their own JSON writer, dicts as they are."""
    if config is None:
        return None
    if hasattr(config, "to_json_string"):
        return json.loads(config.to_json_string(use_diff=False))
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(dict(config), default=str))


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"rqcompile": version("rqcompile"), "torch": torch.__version__, "transformers": version("transformers")}


def _list_files(root: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel == MANIFEST:
                continue
            if full.is_symlink():
                raise ValueError(f"refusing symlink {rel!r} in an artifact")
            _check_relpath(rel)
            files[rel] = {"sha256": sha256_file(full), "size": full.stat().st_size}
    return dict(sorted(files.items()))


def write_artifact(
    path: str | Path,
    *,
    target: str,
    rq_config: RQConfig | Mapping[str, Any] | None = None,
    model_config: Any = None,
    quant_states: QuantStates | None = None,
    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    files: Mapping[str, str | Path | bytes] | None = None,
    tokenizer_dir: str | Path | None = None,
    build: Callable[[Path], None] | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Artifact:
    """Write an artifact atomically: stage in a hidden sibling directory, hash everything, rename into place.

    `tensors` maps relative paths to dicts saved as safetensors; `files` maps relative paths to a source file or
    bytes; `build(staging_dir)` may write more files (e.g. an AOTInductor package) before hashing. `extra` adds
    manifest fields (e.g. program entry points, input names). If anything raises, nothing appears at `path`.
    """
    path = Path(path)
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        manifest = _stage(staging, target, rq_config, model_config, quant_states, tensors, files, tokenizer_dir, build)
        manifest.update(dict(extra or {}))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        _swap_into_place(staging, path, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Artifact(path=path, manifest=manifest)


def _stage(staging, target, rq_config, model_config, quant_states, tensors, files, tokenizer_dir, build) -> dict:
    from safetensors.torch import save_file

    if quant_states:
        save_quant_states(quant_states, staging / QUANT_STATE_FILE)
    for relpath, group in (tensors or {}).items():
        out = staging / _check_relpath(relpath)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(out))
    for relpath, source in (files or {}).items():
        out = staging / _check_relpath(relpath)
        out.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            out.write_bytes(source)
        else:
            shutil.copyfile(source, out)
    if tokenizer_dir is not None:
        for src in tokenizer_files(tokenizer_dir):
            rel = f"{TOKENIZER_DIR}/{src.relative_to(tokenizer_dir).as_posix()}"
            (staging / _check_relpath(rel)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, staging / rel)
    if build is not None:
        build(staging)
    config = rq_config.to_dict() if isinstance(rq_config, RQConfig) else (dict(rq_config) if rq_config else None)
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **_versions(),
        "target": target,
        "model_config": _jsonable(model_config),
        "rq_config": config,
        "quant_state_digest": quant_state_digest(quant_states) if quant_states else None,
        "tokenizer": TOKENIZER_DIR if tokenizer_dir is not None else None,
        "files": _list_files(staging),
    }


def _swap_into_place(staging: Path, path: Path, overwrite: bool) -> None:
    """rename(2) is atomic on one filesystem; an existing artifact is moved aside first and removed after."""
    if not path.exists():
        os.rename(staging, path)  # fails (no clobber) if another writer created `path` meanwhile
        return
    if not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- reading -----------------------------------------------------------------------------------------------------


def _major_minor(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if not match:
        raise ArtifactVersionError(f"cannot parse torch version {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_torch_compatibility(manifest: Mapping[str, Any], torch_version: str | None = None) -> None:
    """Apply the torch version rules in this module's docstring; raise `ArtifactVersionError` with the reason."""
    running = _major_minor(torch_version or torch.__version__)
    target = manifest["target"]
    built_str = manifest.get("torch")
    if target in ("onnx", "tensorrt"):
        return
    if built_str is None:
        raise ArtifactVersionError(f"the manifest does not record the torch version a {target!r} artifact needs")
    built = _major_minor(built_str)
    if target == "aoti" and built != running:
        raise ArtifactVersionError(
            f"this AOTInductor package was built with torch {built_str} and can only be loaded by torch "
            f"{built[0]}.{built[1]}.x (running {torch_version or torch.__version__}); re-export it with this torch, "
            "or export target='onnx' for a torch-independent artifact"
        )
    if built[0] != running[0] or running < MIN_TORCH:
        raise ArtifactVersionError(
            f"artifact written by torch {built_str}; torch {torch_version or torch.__version__} cannot load it "
            f"(needs torch {built[0]}.x, at least {MIN_TORCH[0]}.{MIN_TORCH[1]})"
        )


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise ArtifactError(f"{path} is not an artifact directory (does not exist or is a file)")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} has no {MANIFEST}: not an rqcompile artifact, or its write was interrupted")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({exc}); the artifact is corrupted") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format_version"), int):
        raise ArtifactError(f"{manifest_path} has no integer 'format_version'; not an rqcompile manifest")
    version = manifest["format_version"]
    if version not in SUPPORTED_FORMAT_VERSIONS:
        newest = max(SUPPORTED_FORMAT_VERSIONS)
        advice = "upgrade rqcompile" if version > newest else "re-export it with this rqcompile"
        raise ArtifactVersionError(
            f"{path}: artifact format version {version}, this rqcompile reads {list(SUPPORTED_FORMAT_VERSIONS)}; "
            f"{advice}"
        )
    for key in ("target", "files"):
        if key not in manifest:
            raise ArtifactError(f"{manifest_path} lacks the required field {key!r}")
    if not isinstance(manifest["files"], dict):
        raise ArtifactError(f"{manifest_path}: 'files' must map relative paths to sha256 and size")
    return manifest


def read_artifact(path: str | Path, *, torch_version: str | None = None) -> Artifact:
    """Open an artifact after verifying manifest, format version, every file's size and sha256, and torch rules.

    Nothing is loaded or unpickled here; a pickle-capable file anywhere in the directory is refused.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    listed = manifest["files"]
    for relpath, entry in listed.items():
        try:
            _check_relpath(relpath)
        except ValueError as exc:
            raise ArtifactIntegrityError(f"{path}: manifest lists a forbidden file: {exc}") from None
        full = path / relpath
        if full.is_symlink() or not full.is_file():
            raise ArtifactIntegrityError(f"{path}: listed file {relpath!r} is missing (or not a regular file)")
        size = full.stat().st_size
        if size != entry.get("size"):
            raise ArtifactIntegrityError(
                f"{path}: {relpath!r} has {size} bytes, the manifest says {entry.get('size')}: truncated or replaced"
            )
        if sha256_file(full) != entry.get("sha256"):
            raise ArtifactIntegrityError(f"{path}: {relpath!r} does not match its sha256 in the manifest: tampered")
    unlisted = []
    for dirpath, _, names in os.walk(path):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(path).as_posix()
            if rel == MANIFEST or rel in listed:
                continue
            if name.lower().endswith(PICKLE_SUFFIXES):
                raise ArtifactIntegrityError(
                    f"{path}: unlisted file {rel!r} can carry pickled code; refusing to load this artifact "
                    "(rqcompile never unpickles)"
                )
            unlisted.append(rel)
    check_torch_compatibility(manifest, torch_version)
    artifact = Artifact(path=path, manifest=manifest, unlisted=sorted(unlisted))
    artifact.rq_config  # noqa: B018  (validates the config: a field no exported program supports is refused here)
    if manifest.get("quant_state_digest") and QUANT_STATE_FILE in listed:
        if quant_state_digest(artifact.quant_states()) != manifest["quant_state_digest"]:
            raise ArtifactIntegrityError(
                f"{path}: quant state does not match the manifest's quant_state_digest (tampered or inconsistent)"
            )
    return artifact
