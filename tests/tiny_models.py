"""Tiny random-weight causal LMs shared by the tests.

Each factory returns an eval-mode fp32 model built with a fixed seed, so two calls give identical weights. They are
small enough (2-4 layers, hidden 64-128, head_dim 64, vocab 160) that a forward pass takes milliseconds on CPU, yet
keep the structure that matters to rqcompile: GQA (more query heads than KV heads), RoPE, and for Qwen3.5 the hybrid
layout of gated-delta-net linear-attention layers and gated full-attention layers.

`initializer_range` is larger than the usual 0.02 so that attention patterns are far from uniform and a wrong mask
or cache position shows up clearly in the logits.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

VOCAB = 160
SEED = 0
INIT_RANGE = 0.1


def _finish(model: PreTrainedModel) -> PreTrainedModel:
    return model.to(torch.float32).eval()


def tiny_llama(**overrides) -> PreTrainedModel:
    """Llama: 2 layers, 4 query heads / 2 KV heads of dim 64 (SmolLM2 is this architecture); `overrides`: config
    fields to change."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **{
            "vocab_size": VOCAB,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "max_position_embeddings": 512,
            "initializer_range": INIT_RANGE,
            "tie_word_embeddings": False,
            **overrides,
        }
    )
    torch.manual_seed(SEED)
    return _finish(LlamaForCausalLM(config))


def tiny_llama_head_dim_128() -> PreTrainedModel:
    """Llama with the GPU decode kernel's shape (head_dim 128: one norm group of 128; 4 query heads per KV head)."""
    return tiny_llama(hidden_size=256, num_attention_heads=8, head_dim=128)


def tiny_qwen3() -> PreTrainedModel:
    """Qwen3: 2 layers, q/k RMS norms, 4 query heads / 2 KV heads of dim 64."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        initializer_range=INIT_RANGE,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    return _finish(Qwen3ForCausalLM(config))


def _qwen3_5_text_kwargs() -> dict:
    # 4 layers with full_attention_interval=2: linear, full, linear, full.
    return dict(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        max_position_embeddings=512,
        initializer_range=INIT_RANGE,
        tie_word_embeddings=False,
    )


def tiny_qwen3_5() -> PreTrainedModel:
    """Text-only Qwen3.5 (hybrid): layers 0, 2 gated delta net, layers 1, 3 gated full attention (partial RoPE)."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig(intermediate_size=256, **_qwen3_5_text_kwargs())
    torch.manual_seed(SEED)
    return _finish(Qwen3_5ForCausalLM(config))


def tiny_qwen3_5_moe() -> PreTrainedModel:
    """Text-only Qwen3.5-MoE (hybrid + sparse MoE MLP with a shared expert): 4 experts, top-2."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    config = Qwen3_5MoeTextConfig(
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        **_qwen3_5_text_kwargs(),
    )
    torch.manual_seed(SEED)
    return _finish(Qwen3_5MoeForCausalLM(config))


ALL = {
    "llama": tiny_llama,
    "qwen3": tiny_qwen3,
    "qwen3_5": tiny_qwen3_5,
    "qwen3_5_moe": tiny_qwen3_5_moe,
}
