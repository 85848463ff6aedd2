"""RQConfig: everything that decides the compressed format, validated once, up front.

A config is a frozen dataclass so it can be hashed, stored in artifact manifests and compared; every error a user
can make with it is raised here, with the allowed values, rather than deep inside a kernel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rqcompile.quant.rotations import FULL_MIXING, STAGED_BACKENDS, stage_radices

BACKENDS = ("planar", "iso", "rotor", "hadamard", "none")
SUPPORTED_BITS = (2, 3, 4)
ALLOCATION_BITS = (1, 2, 3, 4, 5, 6, 7, 8)  # widths a calibrated bit allocation may give single coordinates
ISO_MODES = ("full", "fast")
# Scale factors tried per norm group with `RQConfig(scale_search=SCALE_SEARCH)` (measured: QUALITY.md, Presets).
SCALE_SEARCH = (0.85, 1.0, 1.15, 1.3, 1.5)
# Values that reproduce the format of configs written before a field existed (read by `RQConfig.from_dict`):
# rotation_stages came in session 7 with 1 as its default (manifests before it hold one block layer); session 8 made
# the default None ("full" where blocks compose).
# rope_key_mean came in session 13 as False; session 15 made the default None ("auto"), which manifests never hold.
# value_layout came in session 20 (V per token before it; None, "auto", is resolved before anything is stored).
FORMAT_BEFORE_FIELD: dict[str, Any] = {"rotation_stages": 1, "rope_key_mean": False, "value_layout": "coordinates"}
VALUE_LAYOUTS = ("coordinates", "keys")
KEY_LAYOUT_BITS = (2, 3)  # V widths value_layout="keys" packs (4 bits would need its own block order)
MAX_ROTATION_STAGES = 8  # iso mixes 4**s coordinates: 4 stages cover a 128-wide norm group; planar needs 7


@dataclass(frozen=True)
class RQConfig:
    """How K/V head vectors are compressed.

    Args:
        backend: rotation applied before quantizing: ``planar`` (2D Givens), ``iso`` (4D quaternion, the default:
            the best measured block backend at 3 bits, QUALITY.md "Defaults"), ``rotor`` (3D Clifford rotor),
            ``hadamard`` (dense baseline inside each norm group) or ``none``. The decode kernels attend in the rotated
            space, so the backend changes the quality and the encoder's work, not the attention's speed.
        bits: bits per coordinate for keys and values, unless ``key_bits`` / ``value_bits`` override it.
        key_bits, value_bits: per-tensor overrides of ``bits``.
        norm_group: coordinates sharing one fp16 norm; ``None`` means ``min(head_dim, 128)``.
        seed: rotations are random but deterministic from (seed, layer, kv-head, K-or-V).
        iso_mode: ``full`` uses ``q_L v conj(q_R)`` (all of SO(4)), ``fast`` only ``q_L v``.
        residual_window: most recent tokens kept exact in the model dtype (eager caches, `apply`'s programs and
            their exports); default 32, 0 disables it. At long contexts the largest quality lever measured: 32 tokens
            cut SmolLM2's KL at 8K tokens 2.4x for +0.013 bits/element at 32K (QUALITY.md "Session 10"), at no
            measured cost in the compiled GPU decode step. It costs its tokens' bytes whatever the length: +0.5
            bits/element in bf16 at 1K tokens, +0.016 at 32K (`memory_report()` counts them).
        sink_tokens: first tokens of the sequence kept uncompressed (default 1). The first token is usually an
            attention "sink" with an atypical key that every query attends to; quantizing it costs block backends
            most of their error (measured: QUALITY.md). It costs one token's K/V in the model dtype per layer
            (+0.001 bits/element at 32K tokens); 0 disables it.
        check_finite: raise on NaN/inf K/V in the eager caches (one host sync per layer and step when on a GPU).
        scale_search: candidate scale factors the quantizer tries per norm group (keys and values), keeping the one
            whose codes reconstruct the group best (docs/FORMAT.md, "Scale search"). Default ``SCALE_SEARCH``, the
            measured set (QUALITY.md: attention-output KL -17% to -44% for the block backends, -8% for hadamard);
            ``()`` quantizes at the group's own norm only. Costs no bytes: it changes which codes and norm are
            written (~5x the encoder's work), not the format the decoders read.
        bit_allocation: code widths a calibrated bit allocation may use, e.g. ``(2, 3, 4, 5, 6)``; ``()`` (default)
            gives every coordinate the same width. With it, each (layer, K|V) spends its average width (``bits`` /
            ``key_bits`` / ``value_bits``, which may then be fractional, e.g. 3.5) unevenly: more bits for the
            rotated coordinates whose error costs attention most, measured by ``rqcompile.calibrate`` (required).
            Whole rotation blocks are reordered so equal widths are contiguous; rotations stay block-diagonal
            (``rqcompile.quant.allocation``, docs/FORMAT.md "Bit allocation").
        layer_bits: per-layer overrides ``((layer_idx, key_bits, value_bits), ...)`` of ``key_bits`` /
            ``value_bits``, e.g. 4-bit keys only in the layers whose key error costs most. ``()``: every layer uses
            ``k_bits`` / ``v_bits``. Report the resulting average bits/element (the caches measure it). Every state
            built by ``make_state`` follows it: eager caches, ``rqcompile.apply``'s buffers, kernels and exports.
        rotation_stages: layers of blocks composed with a perfect shuffle between them inside each norm group
            (block backends). ``"full"``: the fewest layers that mix the whole norm group (iso: 3 at ``g = 64``; 4 at
            128, the last one 2D; planar log2(g); rotor until ``3**s >= g``). Staged 2D / 4D blocks have
            equal-magnitude entries with random signs, so a fully mixed group spreads every coordinate evenly, like a
            randomized Hadamard transform (QUALITY.md "Staged rotations"). ``1`` is the plain block-diagonal
            rotation (the only choice for ``hadamard``, ``none`` and ``bit_allocation``). ``None`` (default):
            ``"full"`` for planar / iso / rotor without ``bit_allocation``, else 1 (``resolved_rotation_stages``).
            More than one layer is stored as one dense block per norm group (docs/FORMAT.md "Staged rotations"):
            decoders read it like hadamard's (q rotated once per step by its own kernel, the output un-rotated in
            the attention's combine step), the encoder does ``g`` FMAs per coordinate. Why "full" is the default:
            KL of the drop-in cache -53% / -42% (QUALITY.md), for a compiled decode step within -6% / +4% of one
            layer's on the H200 (BENCHMARKS.md, session 8); ``1`` keeps the block kernels (planar's encoder is then
            the fastest).
        rope_key_mean: also remove each layer's *pre-RoPE* key mean, turned to each key's position, before quantizing
            (added back exactly after dequantizing; no bytes per token; ``rqcompile.quant.rope_offset``). Most of the
            keys' offset is constant before RoPE and turns with the position after it, so the post-RoPE key mean
            misses it: on SmolLM2 KL falls 13-45% at every width from 2.5 to 4.25 bits, for every backend (QUALITY.md
            "Session 13" / "Session 14"). ``None`` (default, "auto"): on wherever the RoPE and the mean are known,
            off elsewhere (``resolve_rope_key_mean``): a drop-in cache measuring its prompt turns it on when given
            ``model_config``; a Calibration measured with it (``rqcompile.calibrate`` does by default, for models
            with a static RoPE) turns it on in the caches and in ``rqcompile.apply``, whose fused attention then adds
            its term to each score. ``True`` insists (a clear error where it cannot be done); ``False`` is the format
            without it. Caches and ``apply`` store the resolved bool, and artifacts carry it.
        value_layout: how V's codes are laid out in memory (the same codes and bytes either way). ``"coordinates"``:
            each token's codes together (docs/FORMAT.md "Bit packing"). ``"keys"``: each block of 16 tokens holds, per
            coordinate, the 16 tokens' codes together (docs/FORMAT.md "V packed along keys"), the order the decode
            kernel's tensor-core operand wants, so it decodes V without a trip through shared memory: -13 to -15%
            attention time on the H200 (BENCHMARKS.md "Session 20"). V at 2 or 3 bits without ``bit_allocation``;
            ``rqcompile.apply``'s programs and their AOTInductor exports only (the eager caches refuse it; the ONNX /
            TensorRT exports store the same codes per token). ``None`` (default, "auto"): ``"keys"`` in ``apply``'s
            fused programs on CUDA wherever the decode kernel reads it in place (norm groups of 128, <= 16 query
            heads per KV head, ``max_cache_len`` a multiple of 16), ``"coordinates"`` everywhere else (eager caches,
            CPU), where a reader would re-pack a copy first. ``apply`` stores the resolved value (``lm.config``).
    """

    backend: str = "iso"
    bits: float = 3
    key_bits: float | None = None
    value_bits: float | None = None
    norm_group: int | None = None
    seed: int = 0
    iso_mode: str = "full"
    residual_window: int = 32
    sink_tokens: int = 1
    check_finite: bool = True
    scale_search: tuple[float, ...] = SCALE_SEARCH
    layer_bits: tuple[tuple[int, int, int], ...] = ()
    bit_allocation: tuple[int, ...] = ()
    rotation_stages: int | str | None = None
    rope_key_mean: bool | None = None
    value_layout: str | None = None

    def __post_init__(self) -> None:
        self._check_layer_bits()
        self._check_bit_allocation()
        if isinstance(self.scale_search, list):  # from_dict of a JSON round trip
            object.__setattr__(self, "scale_search", tuple(self.scale_search))
        if not isinstance(self.scale_search, tuple) or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and 0 < c < float("inf") for c in self.scale_search
        ):
            raise ValueError(f"scale_search={self.scale_search!r} must be a tuple of positive finite numbers")
        object.__setattr__(self, "scale_search", tuple(float(c) for c in self.scale_search))
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        for name in ("bits", "key_bits", "value_bits"):
            value = getattr(self, name)
            if value is None and name != "bits":
                continue
            if self.bit_allocation:
                lo, hi = self.bit_allocation[0], self.bit_allocation[-1]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                    raise ValueError(
                        f"{name}={value!r} must be an average width within bit_allocation={self.bit_allocation}"
                    )
            elif isinstance(value, bool) or not isinstance(value, int) or value not in SUPPORTED_BITS:
                raise ValueError(
                    f"{name}={value!r} is not supported; choose one of {SUPPORTED_BITS} (fractional averages need "
                    "bit_allocation)"
                )
        if self.iso_mode not in ISO_MODES:
            raise ValueError(f"unknown iso_mode {self.iso_mode!r}; choose one of {ISO_MODES}")
        if self.norm_group is not None and (self.norm_group <= 0 or self.norm_group % 8):
            raise ValueError(f"norm_group={self.norm_group} must be a positive multiple of 8")
        if self.residual_window < 0:
            raise ValueError(f"residual_window={self.residual_window} must be >= 0")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens={self.sink_tokens} must be >= 0")
        self._check_rotation_stages()
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {type(self.seed).__name__}")
        if self.rope_key_mean is not None and not isinstance(self.rope_key_mean, bool):
            raise ValueError(f"rope_key_mean must be None (auto) or a bool, got {self.rope_key_mean!r}")
        self._check_value_layout()

    def packs_along_keys(self, kind: str) -> bool:
        """Whether `kind`'s codes ("k" or "v") are packed along keys: V's, with value_layout="keys"."""
        return kind == "v" and self.value_layout == "keys"

    def _check_value_layout(self) -> None:
        if self.value_layout is not None and self.value_layout not in VALUE_LAYOUTS:
            raise ValueError(
                f"unknown value_layout {self.value_layout!r}; choose one of {VALUE_LAYOUTS} or None (auto)"
            )
        if self.value_layout != "keys":
            return
        if self.bit_allocation:
            raise ValueError("value_layout='keys' packs uniform 2- or 3-bit codes; it cannot take bit_allocation")
        widths = {self.v_bits} | {value_bits for _, _, value_bits in self.layer_bits}
        if not widths <= set(KEY_LAYOUT_BITS):
            raise ValueError(
                f"value_layout='keys' packs V at {KEY_LAYOUT_BITS} bits; this config has V at {sorted(widths)} "
                "(value_bits / layer_bits)"
            )

    def _check_layer_bits(self) -> None:
        entries = self.layer_bits
        if isinstance(entries, list):  # from_dict of a JSON round trip
            entries = tuple(tuple(e) if isinstance(e, list) else e for e in entries)
        ok = isinstance(entries, tuple) and all(
            isinstance(e, tuple)
            and len(e) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) for v in e)
            and e[0] >= 0
            and e[1] in SUPPORTED_BITS
            and e[2] in SUPPORTED_BITS
            for e in entries
        )
        if not ok:
            raise ValueError(
                f"layer_bits={self.layer_bits!r} must be a tuple of (layer_idx >= 0, key_bits, value_bits) with bits"
                f" in {SUPPORTED_BITS}"
            )
        layers = [e[0] for e in entries]
        if len(set(layers)) != len(layers):
            raise ValueError(f"layer_bits={self.layer_bits!r} names a layer more than once")
        object.__setattr__(self, "layer_bits", tuple(sorted(entries)))

    @property
    def resolved_rotation_stages(self) -> int | str:
        """`rotation_stages` with the default decided: full mixing wherever blocks can be composed, else 1."""
        if self.rotation_stages is not None:
            return self.rotation_stages
        return FULL_MIXING if self.backend in STAGED_BACKENDS and not self.bit_allocation else 1

    @property
    def calibrates_scales(self) -> bool:
        """Whether calibration measures per-channel K/V scales for this rotation, or the key mean only. Scales help
        one layer of blocks, whose coordinates stay apart; once a norm group is mixed (hadamard, staged rotations) they
        hurt: on sample text (QUALITY.md "Staged rotations in the format") and on the prompt at 8K tokens (KL 0.422
        vs 0.293 with the prompt's key mean only, QUALITY.md "Session 10")."""
        return self.backend != "hadamard" and self.resolved_rotation_stages == 1

    def _check_rotation_stages(self) -> None:
        if self.rotation_stages is None:
            return
        stages = self.rotation_stages
        if stages != FULL_MIXING and (
            isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= MAX_ROTATION_STAGES
        ):
            raise ValueError(
                f"rotation_stages={stages!r} must be {FULL_MIXING!r} (mix the whole norm group) or an int in "
                f"1..{MAX_ROTATION_STAGES}"
            )
        if stages == 1:
            return
        if stages != FULL_MIXING and self.backend not in STAGED_BACKENDS:
            raise ValueError(
                f"rotation_stages={stages} composes block rotations; backend {self.backend!r} has none to compose "
                "(use planar, iso or rotor)"
            )
        if self.bit_allocation:
            raise ValueError(
                "bit_allocation reorders whole rotation blocks, which a staged rotation (rotation_stages > 1) mixes "
                "together; use one or the other (rotation_stages=1 or None with bit_allocation)"
            )

    def stage_count(self, head_dim: int) -> int:
        """How many block layers the rotation has at this head dimension ("full": enough to mix the norm group)."""
        if self.backend not in STAGED_BACKENDS:
            return 1
        return len(stage_radices(self.backend, self.group_for(head_dim), self.resolved_rotation_stages))

    def _check_bit_allocation(self) -> None:
        widths = self.bit_allocation
        if isinstance(widths, list):  # from_dict of a JSON round trip
            widths = tuple(widths)
        if not isinstance(widths, tuple) or not all(
            isinstance(w, int) and not isinstance(w, bool) and w in ALLOCATION_BITS for w in widths
        ):
            raise ValueError(f"bit_allocation={self.bit_allocation!r} must be a tuple of widths from {ALLOCATION_BITS}")
        object.__setattr__(self, "bit_allocation", tuple(sorted(set(widths))))

    def bits_for(self, layer_idx: int, kind: str) -> float:
        """Bits of layer `layer_idx`'s keys (`kind="k"`) or values (`"v"`), `layer_bits` overrides included."""
        if kind not in ("k", "v"):
            raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
        for layer, key_bits, value_bits in self.layer_bits:
            if layer == layer_idx:
                return key_bits if kind == "k" else value_bits
        return self.k_bits if kind == "k" else self.v_bits

    @property
    def k_bits(self) -> float:
        return self.key_bits if self.key_bits is not None else self.bits

    @property
    def v_bits(self) -> float:
        return self.value_bits if self.value_bits is not None else self.bits

    def group_for(self, head_dim: int) -> int:
        """The norm group for a head dimension; it must divide head_dim so every vector has whole groups."""
        group = self.norm_group if self.norm_group is not None else min(head_dim, 128)
        if head_dim % 8:
            raise ValueError(f"head_dim={head_dim} must be a multiple of 8 for bit packing")
        if head_dim % group:
            raise ValueError(f"norm_group={group} must divide head_dim={head_dim}")
        return group

    def replace(self, **changes: Any) -> RQConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RQConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown RQConfig fields {sorted(unknown)}")
        # Fields added after a dict was written mean what the format did before them, not today's default.
        return cls(**{**FORMAT_BEFORE_FIELD, **data})
