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
