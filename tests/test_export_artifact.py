"""The artifact directory: round trip, and every way a damaged or foreign artifact must be refused, clearly.

A serving machine loads these without model code, so the loader is the last line of defence: it must name the bad
file, never unpickle anything, and never see a half-written directory.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from rqcompile.config import RQConfig
from rqcompile.export.artifact import (
    FORMAT_VERSION,
    MANIFEST,
    QUANT_STATE_FILE,
    ArtifactError,
    ArtifactIntegrityError,
    ArtifactVersionError,
    check_torch_compatibility,
    load_quant_states,
    quant_state_digest,
    read_artifact,
    save_quant_states,
    write_artifact,
)
from rqcompile.quant.quantizer import make_state

CONFIG = RQConfig(backend="iso", key_bits=4, value_bits=3)


def _states(config: RQConfig = CONFIG) -> dict[int, dict]:
    return {
        layer: {kind: make_state(config, layer_idx=layer, kind=kind, num_heads=2, head_dim=64) for kind in "kv"}
        for layer in (0, 3)
    }


@pytest.fixture
def artifact_dir(tmp_path) -> Path:
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"model": {}}')
    (tokenizer / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "out"
    write_artifact(
        out,
        target="onnx",
        rq_config=CONFIG,
        model_config=LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4),
        quant_states=_states(),
        tensors={"extra/weights.safetensors": {"w": torch.arange(6.0).reshape(2, 3)}},
        files={"model.onnx": b"onnx-bytes"},
        tokenizer_dir=tokenizer,
        extra={"entry": "model.onnx"},
    )
    return out


def _rewrite_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    manifest.update(changes)
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_round_trip(artifact_dir):
    artifact = read_artifact(artifact_dir)
    manifest = artifact.manifest
    assert manifest["format_version"] == FORMAT_VERSION and manifest["target"] == "onnx"
    assert manifest["torch"] == torch.__version__ and manifest["transformers"] and manifest["entry"] == "model.onnx"
    assert artifact.rq_config == CONFIG
    assert artifact.model_config["num_hidden_layers"] == 2
    assert set(manifest["files"]) == {
        "model.onnx",
        QUANT_STATE_FILE,
        "extra/weights.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
    }
    assert all(len(e["sha256"]) == 64 and e["size"] > 0 for e in manifest["files"].values())
    loaded = artifact.quant_states()
    original = _states()
    assert manifest["quant_state_digest"] == quant_state_digest(original) == quant_state_digest(loaded)
    for layer in original:
        for kind in "kv":
            a, b = original[layer][kind], loaded[layer][kind]
            assert (a.bits, a.group) == (b.bits, b.group)
            for name, tensor in a.tensors().items():
                assert torch.equal(tensor, getattr(b, name))
    assert torch.equal(artifact.load_tensors("extra/weights.safetensors")["w"], torch.arange(6.0).reshape(2, 3))
    assert (artifact.tokenizer_path / "tokenizer.json").read_text() == '{"model": {}}'


def test_tokenizer_copy_leaves_the_model_weights_behind(tmp_path):
    """The tokenizer directory is usually the model directory: only the tokenizer's files are copied, never the
    original weights (safetensors or a pickle-capable .bin) or other model files."""
    model_dir = tmp_path / "model"
    (model_dir / "additional_chat_templates").mkdir(parents=True)
    tokenizer = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"]
    tokenizer += ["vocab.json", "merges.txt", "chat_template.jinja", "additional_chat_templates/tool.jinja"]
    model = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "generation_config.json"]
    for name in tokenizer + model:
        (model_dir / name).write_text("{}")
    artifact = write_artifact(tmp_path / "out", target="onnx", tokenizer_dir=model_dir)
    assert set(artifact.manifest["files"]) == {f"tokenizer/{name}" for name in tokenizer}
    assert read_artifact(tmp_path / "out").unlisted == []


def test_quant_state_file_round_trip_and_digest_sensitivity(tmp_path):
    states = _states()
    path = save_quant_states(states, tmp_path / "qs.safetensors")
    assert quant_state_digest(load_quant_states(path)) == quant_state_digest(states)
    changed = {**states, 3: {**states[3], "v": replace(states[3]["v"], rotation=states[3]["v"].rotation * -1)}}
    assert quant_state_digest(changed) != quant_state_digest(states)
    assert quant_state_digest(_states(CONFIG.replace(seed=1))) != quant_state_digest(states)


def test_tampered_file_is_refused(artifact_dir):
    target = artifact_dir / "model.onnx"
    target.write_bytes(b"onnx-bytez")  # same size, different content
    with pytest.raises(ArtifactIntegrityError, match="'model.onnx'.*sha256.*tampered"):
        read_artifact(artifact_dir)


def test_truncated_file_is_refused(artifact_dir):
    target = artifact_dir / QUANT_STATE_FILE
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(ArtifactIntegrityError, match="quant_state.safetensors.*100 bytes.*truncated"):
        read_artifact(artifact_dir)


def test_missing_file_is_refused(artifact_dir):
    (artifact_dir / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ArtifactIntegrityError, match="'tokenizer/tokenizer.json' is missing"):
        read_artifact(artifact_dir)


def test_missing_or_broken_manifest_is_refused(artifact_dir):
    (artifact_dir / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_artifact(artifact_dir)
    (artifact_dir / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        read_artifact(artifact_dir)
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        read_artifact(artifact_dir / "nowhere")


@pytest.mark.parametrize("version,advice", [(FORMAT_VERSION + 1, "upgrade rqcompile"), (0, "re-export")])
def test_wrong_format_version_is_refused(artifact_dir, version, advice):
    _rewrite_manifest(artifact_dir, format_version=version)
    with pytest.raises(ArtifactVersionError, match=f"format version {version}.*{advice}"):
        read_artifact(artifact_dir)


@pytest.mark.parametrize("name", ["evil.pkl", "sub/model.pt", "weights.bin", "state.pth"])
def test_injected_pickle_payload_is_refused(artifact_dir, name):
    payload = artifact_dir / name
    payload.parent.mkdir(parents=True, exist_ok=True)
    payload.write_bytes(b"\x80\x04cos\nsystem\n.")  # never opened: refused by name
    with pytest.raises(ArtifactIntegrityError, match=f"unlisted file '{name}'.*pickled code"):
        read_artifact(artifact_dir)


def test_listed_pickle_payload_is_refused_too(artifact_dir):
    (artifact_dir / "evil.pkl").write_bytes(b"x")
    manifest = json.loads((artifact_dir / MANIFEST).read_text())
    manifest["files"]["evil.pkl"] = {"sha256": "0" * 64, "size": 1}
    (artifact_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactIntegrityError, match="forbidden file.*evil.pkl"):
        read_artifact(artifact_dir)


def test_harmless_unlisted_files_are_reported_not_loaded(artifact_dir):
    (artifact_dir / "NOTES.txt").write_text("hello")
    assert read_artifact(artifact_dir).unlisted == ["NOTES.txt"]


def test_writer_refuses_pickle_files_and_escaping_paths(tmp_path):
    for name in ("model.pt", "../outside.onnx", "/abs.onnx"):
        with pytest.raises(ValueError, match="refusing|relative path"):
            write_artifact(tmp_path / "a", target="onnx", files={name: b"x"})
        assert not (tmp_path / "a").exists()


def test_atomic_write_leaves_nothing_when_the_writer_raises(tmp_path):
    def build(staging: Path) -> None:
        (staging / "model.pt2").write_bytes(b"half a package")
        raise RuntimeError("compiler crashed midway")

    with pytest.raises(RuntimeError, match="midway"):
        write_artifact(tmp_path / "out", target="aoti", rq_config=CONFIG, quant_states=_states(), build=build)
    assert list(tmp_path.iterdir()) == []  # neither the artifact nor a staging directory


def test_existing_artifact_needs_overwrite_and_survives_a_failed_overwrite(artifact_dir):
    before = (artifact_dir / MANIFEST).read_text()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_artifact(artifact_dir, target="onnx", files={"model.onnx": b"new"})

    def fail(staging: Path) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_artifact(artifact_dir, target="onnx", files={"model.onnx": b"new"}, build=fail, overwrite=True)
    assert (artifact_dir / MANIFEST).read_text() == before
    read_artifact(artifact_dir)
    write_artifact(artifact_dir, target="onnx", files={"model.onnx": b"new"}, overwrite=True)
    assert (read_artifact(artifact_dir).file("model.onnx")).read_bytes() == b"new"
    assert sorted(p.name for p in artifact_dir.parent.iterdir()) == ["out", "tok"]


def test_build_hook_files_are_listed(tmp_path):
    def build(staging: Path) -> None:
        (staging / "model.pt2").write_bytes(b"package")

    artifact = write_artifact(tmp_path / "out", target="aoti", build=build)
    assert artifact.manifest["files"]["model.pt2"]["size"] == 7
    assert read_artifact(tmp_path / "out").file("model.pt2").read_bytes() == b"package"


def test_torch_version_rules(tmp_path):
    aoti = {"target": "aoti", "torch": "2.13.0+cpu"}
    check_torch_compatibility(aoti, "2.13.1+cu130")  # same major.minor: fine
    with pytest.raises(ArtifactVersionError, match="built with torch 2.13.0.*only be loaded by torch 2.13.x"):
        check_torch_compatibility(aoti, "2.11.0")
    inductor = {"target": "inductor", "torch": "2.13.0"}
    check_torch_compatibility(inductor, "2.11.0")  # quant state + config: any supported 2.x
    with pytest.raises(ArtifactVersionError, match="needs torch 2.x"):
        check_torch_compatibility(inductor, "3.0.0")
    check_torch_compatibility({"target": "onnx", "torch": "2.13.0"}, "1.0.0")  # ONNX runs without torch

    write_artifact(tmp_path / "aoti", target="aoti", files={"model.pt2": b"p"})
    _rewrite_manifest(tmp_path / "aoti", torch="2.99.0")
    with pytest.raises(ArtifactVersionError, match="AOTInductor package was built with torch 2.99.0"):
        read_artifact(tmp_path / "aoti")


# -- calibrated bit allocation: perm and widths travel with the quant state -------------------------------------------

ALLOC = RQConfig(backend="planar", key_bits=3.5, value_bits=3, bit_allocation=(2, 3, 4, 5, 6))


def _allocated_states() -> dict[int, dict]:
    gen = torch.Generator().manual_seed(0)
    return {
        layer: {
            kind: make_state(
                ALLOC,
                layer_idx=layer,
                kind=kind,
                num_heads=2,
                head_dim=64,
                weight=torch.exp(torch.randn(2, 64, generator=gen) * 2),
            )
            for kind in "kv"
        }
        for layer in (0, 1)
    }


def _write_quant_state(path: Path, states, *, digest: bool = True) -> None:
    """Replace an artifact's quant state file and re-list it in the manifest (a consistent re-write, so only the
    loader's own checks - and, with `digest=False`, the manifest's quant-state digest - stand between a bad layout
    and the runtime)."""
    from rqcompile.export.artifact import sha256_file

    target = path / QUANT_STATE_FILE
    save_quant_states(states, target)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][QUANT_STATE_FILE] = {"sha256": sha256_file(target), "size": target.stat().st_size}
    if digest:
        manifest["quant_state_digest"] = quant_state_digest(states)
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_bit_allocation_round_trip_keeps_perm_and_widths(tmp_path):
    states = _allocated_states()
    assert not states[0]["k"].uniform and len(set(states[0]["k"].widths)) > 1
    write_artifact(tmp_path / "a", target="onnx", rq_config=ALLOC, quant_states=states, files={"m.onnx": b"x"})
    artifact = read_artifact(tmp_path / "a")
    assert artifact.rq_config == ALLOC
    loaded = artifact.quant_states()
    for layer in states:
        for kind in "kv":
            a, b = states[layer][kind], loaded[layer][kind]
            assert b.widths == a.widths and b.group == a.group and b.perm.dtype == torch.int64
            for name, tensor in a.tensors().items():
                assert torch.equal(tensor, getattr(b, name)), name
    assert artifact.manifest["quant_state_digest"] == quant_state_digest(loaded)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / QUANT_STATE_FILE), framework="pt") as handle:
        meta = handle.metadata()
        assert "layers.0.k.perm" in handle.keys()
    assert "layers.0.k.bits" not in meta and meta["layers.0.k.widths"].count("x") >= 2  # e.g. "4x32,3x32"


def test_bit_allocation_digest_covers_perm_and_widths(tmp_path):
    states = _allocated_states()
    k = states[1]["k"]
    swapped = k.perm.clone()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]  # still a permutation: only the digest can tell
    tampered = {**states, 1: {**states[1], "k": replace(k, perm=swapped)}}
    assert quant_state_digest(tampered) != quant_state_digest(states)
    write_artifact(tmp_path / "a", target="onnx", quant_states=states, files={"m.onnx": b"x"})
    _write_quant_state(tmp_path / "a", tampered, digest=False)  # file hashes updated, the digest is the original
    with pytest.raises(ArtifactIntegrityError, match="quant state does not match the manifest's .*digest"):
        read_artifact(tmp_path / "a")
    shifted = k.widths[8:] + k.widths[:8]  # same bytes per vector, runs in another order
    if shifted != k.widths:
        assert quant_state_digest({1: {"k": replace(k, widths=shifted)}}) != quant_state_digest({1: {"k": k}})


def _one_ulp_up(levels: torch.Tensor, index: int) -> torch.Tensor:
    """levels with one value moved to the next float up: still ascending, no longer exactly symmetric (the v2
    encoder's search reads magnitudes from the upper half, so it must be exact)."""
    out = levels.clone()
    out[index] = torch.nextafter(out[index], torch.tensor(float("inf")))
    return out


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda s: replace(s, perm=torch.zeros_like(s.perm)), "perm of heads \\[0, 1\\] is not a permutation"),
        (lambda s: replace(s, perm=s.perm.to(torch.int32)), "perm is torch.int32 .* expected int64"),
        (lambda s: replace(s, levels=s.levels[:10]), "levels has 10 values, but the widths .* need"),
        (lambda s: replace(s, levels=_one_ulp_up(s.levels, 0)), "levels\\[0:.*\\] is not a .*-bit codebook"),
    ],
    ids=["not-a-permutation", "wrong-dtype", "levels-too-short", "codebook-one-ulp-off-symmetric"],
)
def test_artifact_with_an_inconsistent_layout_is_refused(tmp_path, corrupt, message):
    states = _allocated_states()
    write_artifact(tmp_path / "a", target="onnx", quant_states=states, files={"m.onnx": b"x"})
    bad = {**states, 0: {**states[0], "k": corrupt(states[0]["k"])}}
    _write_quant_state(tmp_path / "a", bad)
    with pytest.raises(ArtifactError, match=f"layers.0.k: {message}"):
        read_artifact(tmp_path / "a")


def test_wrong_perm_shape_and_widths_that_do_not_match_levels_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "qs.safetensors"
    save_quant_states(_allocated_states(), path)
    tensors, meta = load_file(str(path)), _metadata(path)
    save_file({**tensors, "layers.0.v.perm": tensors["layers.0.v.perm"][:, :32].contiguous()}, str(path), meta)
    with pytest.raises(ArtifactError, match="layers.0.v: perm is torch.int64 \\(2, 32\\), expected int64 \\(2, 64\\)"):
        load_quant_states(path)
    for widths, message in [
        ("6x56,5x8", "levels has 81 values, but the widths \\(6x56,5x8\\) need 96"),
        (
            "6x64",
            "levels after the 64 codebook levels .* not all positive scale candidates",
        ),  # stored codebooks left over
        ("2x32,6x32", "levels\\[0:4\\] is not a 2-bit codebook"),  # runs in another order: slices straddle codebooks
        ("4x60", "cover 60 coordinates, head_dim is 64"),
        ("3x4,2x60", "multiples of 8"),
        ("four", "not a run list"),
    ]:
        save_file(tensors, str(path), {**meta, "layers.1.k.widths": widths})
        with pytest.raises(ArtifactError, match=f"layers.1.k: .*{message}"):
            load_quant_states(path)


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()
