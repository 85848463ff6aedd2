"""Quality harness as a library: deterministic corpora, decode-time metrics and a KIVI-style baseline cache."""

from .corpus import license_corpus, license_text, stdlib_corpus, stdlib_text
from .kivi import KiviFakeQuantCache, fake_quant_uniform
from .metrics import (
    DecodeResult,
    ForcedAgreement,
    GreedyAgreement,
    decode_time_ppl,
    forced_greedy_agreement,
    full_forward_ppl,
    greedy_agreement,
    greedy_tokens,
    kl_divergence,
    kl_vs_reference,
    reference_cache,
)

__all__ = [
    "DecodeResult",
    "ForcedAgreement",
    "GreedyAgreement",
    "KiviFakeQuantCache",
    "decode_time_ppl",
    "forced_greedy_agreement",
    "fake_quant_uniform",
    "full_forward_ppl",
    "greedy_agreement",
    "greedy_tokens",
    "kl_divergence",
    "kl_vs_reference",
    "license_corpus",
    "license_text",
    "reference_cache",
    "stdlib_corpus",
    "stdlib_text",
]
