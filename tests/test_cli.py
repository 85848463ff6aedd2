"""The `rqcompile` command line, end to end on the tiny random hybrid Qwen3.5 (no downloads, no tokenizer)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rqcompile.cli import main
from rqcompile.config import RQConfig

REPO = Path(__file__).resolve().parents[1]
TINY = ["--tiny-qwen3_5"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_help_is_cheap_and_lists_every_command():
    done = subprocess.run(
        [sys.executable, "-m", "rqcompile.cli", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    for command in ("export", "apply", "generate", "eval", "bench", "inspect"):
        assert command in done.stdout
    sub = subprocess.run(
        [sys.executable, "-m", "rqcompile.cli", "export", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert "--target" in sub.stdout and "--tiny-qwen3_5" in sub.stdout and "--demo" in sub.stdout


def test_export_inspect_generate_compressed_onnx_artifact(tmp_path, capsys):
    """The product path end to end: export (rqcompile.apply, planar 4-bit) -> inspect -> generate from the artifact."""
    out = tmp_path / "art"
    argv = ["export", *TINY, "--bits", "4", "--target", "onnx", "--max-cache-len", "24", "-o", str(out)]
    assert main(argv) == 0
    assert (out / "manifest.json").is_file()
    capsys.readouterr()

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "target     onnx" in text and "k_codes_1" in text and "total state" in text and "bits/element" in text

    assert main(["inspect", str(out), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["program"]["max_cache_len"] == 24 and manifest["rq_config"]["bits"] == 4

    assert main(["generate", str(out), "--prompt-ids", "1,2,3,4", "--max-new-tokens", "5"]) == 0
    from_artifact = capsys.readouterr().out.strip().splitlines()[-1]
    assert len(from_artifact.split(",")) == 5

    # more new tokens than the cache holds: clamped to what fits (24 - 4 + 1), with a note, not an overflow error
    assert main(["generate", str(out), "--prompt-ids", "1,2,3,4", "--max-new-tokens", "50"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()[-1].split(",")) == 21 and "using 21" in captured.err

    # the same model with the eager compressed cache (RQCache, no export): runs and prints 5 ids
    assert main(["generate", *TINY, "--prompt-ids", "1,2,3,4", "--max-new-tokens", "5", "--bits", "4"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()[-1].split(",")) == 5


def test_staged_rotations_flow_into_the_artifact(tmp_path, capsys):
    """`--rotation-stages full`: the config and the folded dense rotations (one [g, g] block per norm group) are what
    the exported artifact carries, and the loaded program generates from them."""
    from rqcompile.export.artifact import QUANT_STATE_FILE, load_quant_states

    out = tmp_path / "staged"
    argv = ["export", *TINY, "--rotation-stages", "full", "--target", "onnx", "--max-cache-len", "24", "-o", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rq_config"]["rotation_stages"] == "full"
    for layer in load_quant_states(out / QUANT_STATE_FILE).values():
        for state in layer.values():
            heads, groups, g, g2 = state.rotation.shape
            assert g == g2 == state.group and groups * g == state.head_dim  # dense per group, not 4x4 blocks
    assert main(["generate", str(out), "--prompt-ids", "1,2,3,4", "--max-new-tokens", "5"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()[-1].split(",")) == 5
    with pytest.raises(SystemExit):
        main(["generate", *TINY, "--rotation-stages", "most", "--prompt-ids", "1,2"])


def test_the_exact_windows_are_command_line_options_with_the_library_defaults():
    """`--residual-window` / `--sink-tokens` reach the config; left out, they are `RQConfig()`'s (32 and 1); a
    negative window is refused with the config's message."""
    from rqcompile.cli import _rq_config, build_parser

    def config(*options):
        return _rq_config(build_parser().parse_args(["generate", *TINY, *options]))

    default = config()
    assert (default.residual_window, default.sink_tokens) == (RQConfig().residual_window, RQConfig().sink_tokens)
    assert default.residual_window == 32
    assert config("--residual-window", "0", "--sink-tokens", "4").residual_window == 0
    with pytest.raises(SystemExit, match="residual_window=-1"):
        config("--residual-window", "-1")


def test_bit_allocation_export_inspect_generate(tmp_path, capsys):
    """--bit-allocation calibrates first (the tiny random model has no tokenizer: random ids), exports mixed widths,
    `inspect` shows each layer's layout, and both the artifact and the eager cache generate."""
    out = tmp_path / "alloc"
    alloc = ["--bits", "3.5", "--bit-allocation", "2,3,4,5,6", "--calibration-tokens", "64"]
    argv = ["export", *TINY, *alloc, "--target", "onnx", "--max-cache-len", "24", "-o", str(out)]
    assert main(argv) == 0
    assert "calibrating on 64 tokens" in capsys.readouterr().err

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3.5 bits/code on average (widths 2-6)" in text
    assert "layout     layer 1 K: 3.5-bit avg (" in text and "perm" in text and "layer 3 V" in text

    assert main(["generate", str(out), "--prompt-ids", "1,2,3,4", "--max-new-tokens", "5"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()[-1].split(",")) == 5
    assert main(["generate", *TINY, *alloc, "--prompt-ids", "1,2,3,4", "--max-new-tokens", "5"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()[-1].split(",")) == 5


def test_bit_allocation_needs_calibration_text_and_fractional_bits_need_it():
    import argparse

    from rqcompile.cli import _calibration

    args = argparse.Namespace(tiny_qwen3_5=False, calibration_tokens=64, no_calibration=False)
    config = RQConfig(backend="iso", bits=3, bit_allocation=(2, 3, 4))
    with pytest.raises(SystemExit, match="--bit-allocation needs a calibration .* no tokenizer"):
        _calibration(args, config, model=None, tok=None)
    with pytest.raises(SystemExit, match="--bit-allocation needs a calibration; drop --no-calibration"):
        _calibration(argparse.Namespace(**{**vars(args), "no_calibration": True}), config, model=None, tok=None)
    with pytest.raises(SystemExit, match="bits=3.5 is not supported.*fractional averages need bit_allocation"):
        main(["eval", *TINY, "--bits", "3.5"])


@pytest.mark.parametrize(
    "backend,stages,scales", [("iso", 1, True), ("iso", "full", False), ("iso", None, False), ("hadamard", None, False)]
)
def test_calibration_measures_scales_only_where_they_help(backend, stages, scales):
    """QUALITY.md: per-channel RMS scales measured on sample text help one-stage block rotations and hurt rotations
    that mix a whole norm group (hadamard, staged), which get key scales from the queries instead (session 15) and no
    value scales; the key mean is measured for all."""
    import argparse

    import tiny_models

    from rqcompile.cli import _calibration

    args = argparse.Namespace(tiny_qwen3_5=True, calibration_tokens=32, no_calibration=False)
    config = RQConfig(backend=backend, rotation_stages=stages)
    calibration = _calibration(args, config, model=tiny_models.tiny_qwen3_5(), tok=None)
    names = {(kind, name) for _, kind, name in calibration.stats}
    assert ("k", "mean") in names and ("k", "scale") in names and (("v", "scale") in names) == scales


def test_rope_key_mean_reaches_the_eager_cache_the_calibration_and_the_artifact(tmp_path, capsys):
    """The pre-RoPE key offset is on by default (auto: export calibrates for it; the tiny random model has no
    tokenizer, so random ids) and the artifact's manifest holds the resolved choice; `--no-rope-key-mean` gives the
    format without it; `--rope-key-mean` insists. Eval runs with it, and the artifact generates."""
    import rqcompile
    from rqcompile.cli import _rq_config, build_parser

    def parsed(*flags):
        return _rq_config(build_parser().parse_args(["generate", *TINY, *flags])).rope_key_mean

    assert parsed() is None and parsed("--rope-key-mean") is True and parsed("--no-rope-key-mean") is False
    assert main(["eval", *TINY, "--prefill", "16", "--decode", "8", "--json", "--rope-key-mean"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["compressed_ppl"] > 0
    for flags, want in (([], True), (["--no-rope-key-mean"], False)):
        out = tmp_path / f"rope-{want}"
        export = ["export", *TINY, *flags, "--calibration-tokens", "64", "--target", "onnx", "--max-cache-len", "24"]
        assert main([*export, "-o", str(out)]) == 0
        assert "calibrating on 64 tokens" in capsys.readouterr().err
        assert rqcompile.load(out).artifact.rq_config.rope_key_mean is want
    assert main(["inspect", str(tmp_path / "rope-True")]) == 0
    assert "rope_key_mean" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "rope-True"), "--prompt-ids", "1,2,3,4", "--max-new-tokens", "5"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()[-1].split(",")) == 5


def test_eval_and_bench_on_the_tiny_model(capsys):
    assert main(["eval", *TINY, "--prefill", "16", "--decode", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["uncompressed_ppl"] > 0 and result["compressed_ppl"] > 0

    assert main(["bench", *TINY, "--prefill", "8", "--steps", "3"]) == 0
    text = capsys.readouterr().out
    assert "uncompressed" in text and "ms/step" in text


def test_prompt_means_reaches_the_eager_cache_and_is_refused_where_it_cannot_apply(tmp_path, monkeypatch, capsys):
    """`--prompt-means` builds `RQCache(prompt_means=True)` for generate / eval / bench; without a calibration, or
    with an artifact (its calibration is compiled in), it is a clear error."""
    import rqcompile.cli as cli

    built = []
    real = cli._eager_caches

    def recording(*args):
        make = real(*args)
        return lambda: built.append(make()) or built[-1]

    monkeypatch.setattr(cli, "_eager_caches", recording)
    flags = ["--calibration-tokens", "32", "--prompt-means"]
    assert main(["eval", *TINY, *flags, "--prefill", "16", "--decode", "8", "--json"]) == 0
    assert built and built[-1].prompt_means and built[-1].rq_config.rope_key_mean is True
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["compressed_ppl"] > 0
    assert main(["generate", *TINY, *flags, "--prompt-ids", "1,2,3,4,5,6,7,8,9,10,11,12", "--max-new-tokens", "3"]) == 0
    assert built[-1].prompt_means
    with pytest.raises(SystemExit, match="--prompt-means .* there is no calibration"):
        main(["eval", *TINY, "--no-calibration", "--prompt-means", "--prefill", "16", "--decode", "4"])
    with pytest.raises(SystemExit, match="--prompt-means applies to the eager cache"):
        main(["generate", str(tmp_path), "--prompt-means", "--prompt-ids", "1,2"])


def test_wide_keys_gives_the_probed_layers_4_bit_keys(monkeypatch, capsys):
    """`--wide-keys N` runs `key_sensitivity` and widens the keys of the N layers it ranks first, in the config the
    eager cache (and `apply`) is built with; more layers than the model has attention layers, or keys that are 4-bit
    already, are clear errors."""
    import rqcompile.cli as cli

    built = []
    real = cli._eager_caches
    monkeypatch.setattr(cli, "_eager_caches", lambda *args: built.append(args[1]) or real(*args))
    flags = ["--calibration-tokens", "32", "--prefill", "16", "--decode", "4", "--json"]
    assert main(["eval", *TINY, "--wide-keys", "1", *flags]) == 0
    (layer, key_bits, value_bits), *more = built[-1].layer_bits
    assert not more and key_bits == 4 and value_bits == 3
    assert f"4-bit keys in layers [{layer}]" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--wide-keys: layers must be in 0..2"):
        main(["eval", *TINY, "--wide-keys", "5", *flags])
    with pytest.raises(SystemExit, match="--bit-allocation sets widths per coordinate"):
        main(["eval", *TINY, "--wide-keys", "1", "--bits", "3.5", "--bit-allocation", "2,3,4,5,6", *flags])
    with pytest.raises(SystemExit, match="4-bit keys; these keys are 4-bit already"):
        main(["eval", *TINY, "--wide-keys", "1", "--bits", "4", *flags])
    with pytest.raises(SystemExit):
        main(["eval", *TINY, "--wide-keys", "-1", *flags])
    assert "is not a count" in capsys.readouterr().err


def test_inspect_refuses_a_tampered_artifact(tmp_path):
    from rqcompile.export.artifact import ArtifactIntegrityError, write_artifact

    write_artifact(tmp_path / "a", target="onnx", files={"x.onnx": b"graph"})
    (tmp_path / "a" / "x.onnx").write_bytes(b"grapH")
    with pytest.raises(ArtifactIntegrityError, match="x.onnx"):
        main(["inspect", str(tmp_path / "a")])


@pytest.mark.slow
def test_uncompressed_export_inspect_generate(tmp_path, capsys):
    """`--uncompressed` exports the captured program (float K/V cache) without rqcompile.apply (~30 s)."""
    out = tmp_path / "u"
    argv = ["export", *TINY, "--uncompressed", "--target", "onnx", "--max-cache-len", "24", "-o", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "k_cache_1" in text and "uncompressed cache" in text
    assert main(["generate", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()[-1].split(",")) == 4
