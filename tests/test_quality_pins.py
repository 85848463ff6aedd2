"""Quality pins on the real SmolLM2-135M: fail when compression quality regresses, cheap enough for every CI run.

Decode-time ppl and KL over one window of the license corpus (prefill 512, then 256 teacher-forced steps fed in one
forward: `decode_time_ppl(chunk=256)`, the same as one token at a time; a cache with a recent window is scored through
`rqcompile.eval.window_view`, which keeps that so)
for the plain format (planar, 3 bits, no search), the default config with and without calibration, and the presets of
QUALITY.md: calibrated (`calibrate(...,
value_scale=True)` on 2048 stdlib tokens, never the evaluation text), one exact sink token, scale search. Each delta
must stay below a bound ~25% above the value measured when the pin was set (and KL likewise), and above a floor; KL
must stay above a quarter of its bound, which shows the cache really quantizes. Measured at pin time (torch 2.13 CPU,
transformers 5.24, one thread): see PINS.
A few codes flipped by float-rounding differences (another machine's sums) move a block preset's ppl delta on this
window by several points, far more than its KL: session 35 measured every pin with a few dozen codes flipped per run
(`benchmarks/ppl_noise.py --pins --seeds 6`, QUALITY.md "Session 35"), and where a run crossed a bound the bound was
widened to 15% outside the runs' range (KL bounds to 10% above it). Session 41 made the encoder's rotation
accumulate in float64 (a token's codes no longer depend on how many tokens it is quantized with), which moved codes
on this window; it reran the seeds (`ppl_noise.py --pins --comparisons --seeds 6`, benchmarks/results/
ppl_noise_pins_s41.json) and gave *every* pin that headroom, crossed or not: two pins' runs crossed their ceiling
(iso-K4/3V3-rope-prompt at +11.85% unjittered against 10, iso-K3V3/2-rope-prompt-means) and eleven more had less
headroom than that. The comparisons' bounds sit 10% above their runs' worst ratio (CI had failed bit allocation at
0.853 against 0.85 before the change). Session 42's machine (a 2-core AMD EPYC; the same torch, transformers and
code) moved every pin's unjittered value by -18% to +28% of KL against session 41's (`ppl_noise.py --pins --seeds
0`, benchmarks/results/ppl_noise_pins_s42_unjittered.json; the model's fp ppl the same, 12.1735): another CPU's
float rounding in the model's own matmuls reaches codes all over the cache, more than the jitter's few dozen. CI
failed default-no-window-prompt-calibrated there (KL 0.1250 against 0.122); it and iso-K3V3/2-rope-prompt (0.1665
against 0.175) now have their KL ceilings 15% above the larger of the two machines' values, and
rotor-K3/2V2-rope-prompt (+45.08% against 49) its ppl ceiling 15% above it; every other bound already had session
41's headroom (ppl 15%, KL 10%) over both machines' values.

The full-length numbers come from benchmarks/presets.py; tests/test_quality_bench.py runs benchmarks/quality.py (slow).
"""

from __future__ import annotations

import pytest
import torch

from rqcompile import models
from rqcompile.cache import RQCache
from rqcompile.calibrate import calibrate
from rqcompile.config import SCALE_SEARCH, RQConfig
from rqcompile.eval import decode_time_ppl, kl_divergence, license_corpus, stdlib_corpus
from rqcompile.eval.metrics import cache_kwarg

PREFILL, DECODE = 512, 256
# the one-layer block presets (measured without the recent window, as QUALITY.md's tables)
PRESET = dict(sink_tokens=1, scale_search=SCALE_SEARCH, rotation_stages=1, residual_window=0)
ALLOCATION = (2, 3, 4, 5, 6)

# name: (config, calibrated? (True: the stdlib calibration, "key mean": its key mean only, "prompt": the cache's own,
# "default": calibrate()'s defaults, "prompt means": those with the key means measured on the prompt,
# `prompt_means=True`), (ppl delta % floor, ceiling), KL ceiling). Measured at pin time (fp ppl 12.173):
# planar-3 +970.3% KL 2.346; iso-K4V3-preset +10.3% KL 0.091 (without the scale search +13.7% KL 0.141);
# iso-K3V3-preset +28.2% KL 0.251 (without the search +32.3% KL 0.305); rotor-K3V2-preset +65.3% KL 0.459.
# Bit allocation (session 3): iso-K3.5V3-alloc +8.1% KL 0.094 at 3.54 bits/element (eval length);
# planar-K3V2.5-alloc +25.1% KL 0.195 at 3.04; iso K3V3 allocated +27.3% KL 0.186 (uniform: KL 0.251).
# Session 4: the default RQConfig() (iso, 3 bits, sink 1, search) uncalibrated +126.8% KL 0.819 (calibrated it is
# iso-K3V3-preset); the old default (planar, search, no sink) uncalibrated was +304.3% KL 1.374.
# calibration="prompt" (each layer measures the statistics on the 512-token prompt): +34.8% KL 0.275.
# Session 7, staged rotations (rotation_stages="full": 3 iso stages at head_dim 64, equal-magnitude blocks): iso K3V3
# + sink + search, uncalibrated +38.2% KL 0.391, calibration="prompt" +12.1% KL 0.130, calibrated +9.9% KL 0.170;
# hadamard with calibration="prompt" +18.7% KL 0.158. Session 8: that is the default RQConfig() (one block layer,
# the session-4 default, is pinned as iso-K3V3-block-*).
# Session 9: rotor's stages from the flattest 3D rotation (QUALITY.md "Session 9"): rotor K3V3 full mixing,
# calibration="prompt" +13.1% KL 0.151 (the Haar-random stages with a fixed leftover slot: +23.2% KL 0.182).
# The full-mixing presets of README / QUALITY.md "Session 9" at 3.5 and 3.0 bits/element, calibrated with the stdlib
# key mean only (as measured there): rotor K4/3 V3 +11.1% KL 0.088, iso K3 V3/2 +18.6% KL 0.190 on this harness.
# Session 10: the default plus an exact window of the 32 most recent tokens (`residual_window=32`; scored chunked
# through rqcompile.eval.window_view, equal to one token at a time), calibration="prompt": +3.00% KL 0.0305 (iso K3V3
# full mixing, stdlib key mean, w32: +5.31% KL 0.0276). At this short harness the window is 32 of ~768 tokens, so its
# bytes are not negligible here (+0.7 bits/element); QUALITY.md "Session 10" measures it at 8K tokens.
# Session 11: the default RQConfig() keeps that 32-token window, and calibration="prompt" measures the key mean only
# for rotations that mix the norm group (RQConfig.calibrates_scales). Default: uncalibrated +8.26% KL 0.0605,
# calibration="prompt" +5.23% KL 0.0288, calibrated (key mean + scales) +2.26% KL 0.0421; without the window,
# calibration="prompt" +14.74% KL 0.1407 (with the prompt's scales it was +12.14% KL 0.1296); rotor K3V3 without
# the window, calibration="prompt" +16.49% KL 0.1945 (with the prompt's scales +13.11% KL 0.1512; QUALITY.md
# "Session 11" has both windows: the scales' loss is rotor's alone, and only without the window).
# Session 13: the pre-RoPE key mean removed too (`rope_key_mean=True`, measured on the prompt; QUALITY.md "Session
# 13"): the default without the window +3.86% KL 0.0952 (without it +14.74% KL 0.1407), with the window +4.40% KL
# 0.0252 (without it +5.23% KL 0.0288).
# Session 15: the default removes the pre-RoPE key mean wherever it is known (RQConfig.rope_key_mean=None, "auto"):
# the drop-in cache given model_config (as _measure builds it) +4.40% KL 0.0252 (no window +3.86% KL 0.0952), and
# apply's default calibration, calibrate(model, tokenizer=tok) (2048 stdlib tokens, both key means), +7.42% KL
# 0.0271 on this window; with key scales from the queries, calibrate's default since later in session 15, +5.12% KL
# 0.0210 (three windows, 4096 tokens: QUALITY.md "Session 15"). The earlier pins keep their format with
# rope_key_mean=False.
K4_LAYERS = tuple(range(0, 5)) + tuple(range(10, 20))  # benchmarks/presets.py: the half of the layers with 4-bit keys
PINS = {
    "rotor-K4/3V3-full-keymean": (
        RQConfig(backend="rotor", bits=3, layer_bits=tuple((i, 4, 3) for i in K4_LAYERS), residual_window=0),
        "key mean",
        (3.0, 19.0),
        0.116,
    ),
    "iso-K3V3/2-full-keymean": (
        RQConfig(key_bits=3, value_bits=2, layer_bits=tuple((i, 3, 3) for i in range(15)), residual_window=0),
        "key mean",
        (6.0, 28.5),
        0.25,
    ),
    # QUALITY.md "Session 14": each width's best block preset with the offset (1K harness, prompt calibration, no
    # window); at pin time on this window: iso K4/3 V3 +5.19% KL 0.0633, iso K3 V3/2 +7.18% KL 0.1397, rotor
    # K3/2 V2 +38.64% KL 0.3122 (benchmarks/results/prerope_mean_s13_*.log / _s14_*.log)
    "iso-K4/3V3-rope-prompt": (
        RQConfig(bits=3, layer_bits=tuple((i, 4, 3) for i in K4_LAYERS), residual_window=0),
        "prompt",
        (2.0, 14.5),
        0.083,
    ),
    # Session 35: the format's tie rule (exact ties toward zero: 4 negative ties among this run's 44M coded units
    # changed code) moved this row from +7.18% KL 0.1397 to +10.90% KL 0.1418. With 2-bit V this window's ppl is
    # chaotic in a handful of codes (per-token NLL moved by up to 2.3 nats, 64 nats summed over the 256 steps);
    # coding those 4 ties away from zero instead gives +7.18% again, and runs with a few dozen codes flipped reach
    # +6.22% .. +13.18% (the module docstring); KL barely moves, so its pin stays.
    "iso-K3V3/2-rope-prompt": (
        RQConfig(key_bits=3, value_bits=2, layer_bits=tuple((i, 3, 3) for i in range(15)), residual_window=0),
        "prompt",
        (3.0, 15.5),
        0.19,  # KL 0.143 .. 0.152 on session 41's machine (jittered), 0.1665 on session 42's
    ),
    "rotor-K3/2V2-rope-prompt": (
        RQConfig(backend="rotor", bits=2, layer_bits=tuple((i, 3, 2) for i in K4_LAYERS), residual_window=0),
        "prompt",
        (20.0, 52.0),  # ppl +45.08% on session 42's machine (the module docstring)
        0.39,
    ),
    # Session 16: prompt_means=True, calibrate()'s defaults with the key means measured on the prompt (QUALITY.md
    # "Session 16"); at pin time on this window: the default +4.50% KL 0.0252, iso K4/3 V3 +1.66% KL 0.0561, iso
    # K3 V3/2 +5.81% KL 0.1243
    "default-prompt-means": (RQConfig(), "prompt means", (1.0, 8.5), 0.034),
    "iso-K4/3V3-rope-prompt-means": (
        RQConfig(bits=3, layer_bits=tuple((i, 4, 3) for i in K4_LAYERS), residual_window=0),
        "prompt means",
        (-3.0, 4.0),
        0.070,
    ),
    "iso-K3V3/2-rope-prompt-means": (
        RQConfig(key_bits=3, value_bits=2, layer_bits=tuple((i, 3, 3) for i in range(15)), residual_window=0),
        "prompt means",
        (2.0, 14.0),
        0.155,
    ),
    "default-uncalibrated": (RQConfig(), False, (2.0, 14.0), 0.09),
    # what the drop-in cache does given model_config: the pre-RoPE key mean removed too (session 15's default)
    "default-prompt-calibrated": (RQConfig(), "prompt", (1.0, 8.0), 0.034),
    "default-prompt-calibrated-post-rope-mean-only": (RQConfig(rope_key_mean=False), "prompt", (1.0, 8.0), 0.037),
    # what rqcompile.apply carries by default: calibrate()'s key means (post- and pre-RoPE) on stdlib text
    "default-stdlib-calibrated": (RQConfig(), "default", (1.5, 8.0), 0.027),
    "default-calibrated-key-and-value-scales": (RQConfig(rope_key_mean=False), True, (0.0, 5.0), 0.053),
    # KL 0.096 .. 0.110 on session 41's machine (jittered), 0.1250 on session 42's (the module docstring)
    "default-no-window-prompt-calibrated": (RQConfig(residual_window=0), "prompt", (0.5, 11.5), 0.144),
    "default-no-window-post-rope-mean-only": (
        RQConfig(residual_window=0, rope_key_mean=False),
        "prompt",
        (5.0, 20.0),
        0.19,
    ),
    "rotor-K3V3-full-prompt-calibrated": (
        RQConfig(backend="rotor", residual_window=0, rope_key_mean=False),
        "prompt",
        (5.0, 24.5),
        0.245,
    ),
    "iso-K3V3-block-uncalibrated": (RQConfig(**PRESET), False, (60.0, 175.0), 1.052),
    "iso-K3V3-block-prompt-calibrated": (RQConfig(**PRESET, rope_key_mean=False), "prompt", (12.0, 44.0), 0.34),
    "planar-3": (
        RQConfig(backend="planar", bits=3, scale_search=(), rotation_stages=1, residual_window=0),
        False,
        (500.0, 1300.0),
        3.0,
    ),
    "iso-K4V3-preset": (
        RQConfig(backend="iso", key_bits=4, value_bits=3, **PRESET),
        True,
        (3.0, 18.0),
        0.125,
    ),
    "iso-K3V3-preset": (RQConfig(backend="iso", bits=3, **PRESET), True, (12.0, 37.5), 0.31),
    "rotor-K3V2-preset": (
        RQConfig(backend="rotor", key_bits=3, value_bits=2, **PRESET),
        True,
        (25.0, 82.0),
        0.57,
    ),
    "iso-K3.5V3-alloc": (
        RQConfig(backend="iso", key_bits=3.5, value_bits=3, bit_allocation=ALLOCATION, **PRESET),
        True,
        (3.0, 12.5),
        0.12,
    ),
    "planar-K3V2.5-alloc": (
        RQConfig(backend="planar", key_bits=3, value_bits=2.5, bit_allocation=ALLOCATION, **PRESET),
        True,
        (12.0, 36.5),
        0.245,
    ),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2()


@pytest.fixture(scope="module")
def ids(smollm2):
    return license_corpus(smollm2[1], PREFILL + DECODE + 1)


def make_calibration(kind, smollm2):
    """A pin's calibration from its PINS kind (never from the evaluation text): True, the presets' (measured before
    the pre-RoPE key mean existed: key mean + K/V scales on 2048 stdlib tokens); "key mean", its key mean only;
    "default" / "prompt means", `calibrate(model, tokenizer=tok)` as a user calls it (2048 stdlib tokens, the key
    means post- and pre-RoPE, key scales from the queries); "prompt" as it is (the cache measures its prompt); False,
    none. benchmarks/ppl_noise.py --pins builds them here too."""
    model, tok = smollm2
    if kind is True or kind == "key mean":
        scales = kind is True
        text = stdlib_corpus(tok, 2048)
        return calibrate(model, text, key_scale=scales, value_scale=scales, rope_key_mean=False, source="stdlib 2048")
    if kind in ("default", "prompt means"):
        return calibrate(model, tokenizer=tok)
    return None if kind is False else kind


@pytest.fixture(scope="module")
def calibration(smollm2):
    return make_calibration(True, smollm2)


@pytest.fixture(scope="module")
def key_mean_calibration(smollm2):
    return make_calibration("key mean", smollm2)


@pytest.fixture(scope="module")
def default_calibration(smollm2):
    return make_calibration("default", smollm2)


@pytest.fixture(scope="module")
def reference(smollm2, ids):
    return decode_time_ppl(smollm2[0], ids, prefill=PREFILL, decode=DECODE, chunk=DECODE)


def _calibration(kind, request):
    """The module's fixture for a PINS calibration kind (each built once), or the kind itself ("prompt", None)."""
    fixture = {True: "calibration", "key mean": "key_mean_calibration", "default": "default_calibration"}
    fixture["prompt means"] = "default_calibration"
    return request.getfixturevalue(fixture[kind]) if kind in fixture else (None if kind is False else kind)


def _measure(smollm2, ids, reference, config, calibration, prompt_means=False):
    caches: list[RQCache] = []

    def make():  # given model_config, as the README builds the drop-in caches
        caches.append(
            RQCache(config, calibration=calibration, model_config=smollm2[0].config, prompt_means=prompt_means)
        )
        return caches[-1]

    result = decode_time_ppl(smollm2[0], ids, make, PREFILL, DECODE, chunk=DECODE)
    delta = 100 * (result.ppl / reference.ppl - 1)
    return delta, kl_divergence(reference, result).mean().item(), caches[0]


@pytest.mark.parametrize("name", sorted(PINS))
def test_decode_time_quality_pin(name, smollm2, ids, reference, request):
    config, calibrated, (low, high), kl_high = PINS[name]
    cal = _calibration(calibrated, request)
    delta, kl, cache = _measure(smollm2, ids, reference, config, cal, prompt_means=calibrated == "prompt means")
    assert low < delta < high, f"{name}: ppl delta {delta:+.2f}% (KL {kl:.4f}), pinned to ({low}, {high})%"
    assert kl_high / 4 < kl < kl_high, f"{name}: KL {kl:.4f} (ppl delta {delta:+.2f}%), pinned below {kl_high}"
    if not config.sink_tokens:
        assert _bits_per_element(cache, smollm2[0].config) == pytest.approx(3.25)


def test_the_default_config_is_the_pinned_staged_iso_3_bit_preset():
    """QUALITY.md "Defaults": `RQConfig()` is iso, 3 bits, one sink token, the 32 most recent tokens exact, the scale
    search, and rotations that mix the whole norm group (the pinned default-* rows); `rotation_stages=1` without the
    window is the pinned one-layer iso K3V3 preset."""
    default = RQConfig()
    assert default.resolved_rotation_stages == "full" and not default.calibrates_scales
    assert default.replace(rotation_stages="full") == RQConfig(
        backend="iso", bits=3, sink_tokens=1, residual_window=32, scale_search=SCALE_SEARCH, rotation_stages="full"
    )
    assert default.replace(rotation_stages=1, residual_window=0) == PINS["iso-K3V3-preset"][0]


# What each method buys at the same bytes, on the pins' window: name -> (with it, without it, calibration kind as in
# PINS, the bound on KL with / KL without). Measured at pin time (KL with / without): full mixing against one block
# layer and against Hadamard (session 8, prompt calibration, before the pre-RoPE key mean): 0.1407 / 0.2196 and
# / 0.158; the pre-RoPE key mean removed too (session 13): 0.0952 / 0.1407; the scale search on the calibrated iso
# K4V3 preset: 0.091 / 0.141; calibrated bit allocation (2-6 bits at iso K3V3's bytes): 0.186 / 0.251. Session 41's
# ratios, unjittered run (and the jittered seeds' range): one block layer 0.364 (0.360 .. 0.413), Hadamard 0.773
# (0.729 .. 0.857), pre-RoPE key mean 0.690 (0.628 .. 0.762), scale search 0.662 (0.625 .. 0.788), bit allocation
# 0.818 (0.714 .. 0.829); bounds 10% above the worst ratio where the old ones were closer.
_NO_ROPE_MEAN = RQConfig(rope_key_mean=False)  # as measured in session 8, before the pre-RoPE key mean
_WITHOUT_WINDOW = RQConfig(residual_window=0, rope_key_mean=False)
COMPARISONS = {
    "full mixing against one block layer": (
        _NO_ROPE_MEAN,
        _NO_ROPE_MEAN.replace(rotation_stages=1),
        "prompt",
        0.75,
    ),
    # across presets and windows the two are level (QUALITY.md "Staged rotations in the format"); on this one window
    # full mixing is lower
    "full mixing against hadamard": (_NO_ROPE_MEAN, _NO_ROPE_MEAN.replace(backend="hadamard"), "prompt", 1.0),
    # the positional offset removed before quantizing cuts KL by about a third on this window (QUALITY.md "Session 13")
    "pre-RoPE key mean against post-RoPE only": (
        _WITHOUT_WINDOW.replace(rope_key_mean=True),
        _WITHOUT_WINDOW,
        "prompt",
        0.84,
    ),
    "scale search on the calibrated iso K4V3 preset": (
        PINS["iso-K4V3-preset"][0],
        PINS["iso-K4V3-preset"][0].replace(scale_search=()),
        True,
        0.87,
    ),
    "bit allocation against uniform 3-bit codes": (
        PINS["iso-K3V3-preset"][0].replace(bit_allocation=ALLOCATION),
        PINS["iso-K3V3-preset"][0],
        True,
        0.92,
    ),
}


@pytest.mark.parametrize("name", sorted(COMPARISONS))
def test_a_method_lowers_the_error_at_the_same_bytes(name, smollm2, ids, reference, request):
    """Each method of COMPARISONS, against the same config without it: the same bytes allocated, lower KL by more
    than a few flipped codes move it."""
    with_it, without_it, kind, bound = COMPARISONS[name]
    calibration = _calibration(kind, request)
    held = [_bytes_after_prompt(smollm2, ids, config, calibration) for config in (with_it, without_it)]
    assert held[0] == held[1], f"{name}: {held[0]} bytes with it, {held[1]} without"
    _, kl_with, _ = _measure(smollm2, ids, reference, with_it, calibration)
    _, kl_without, _ = _measure(smollm2, ids, reference, without_it, calibration)
    assert kl_with < bound * kl_without, f"{name}: KL {kl_with:.4f} with it, {kl_without:.4f} without"


def _bytes_after_prompt(smollm2, ids, config, calibration) -> int:
    """Bytes a cache allocated for the prompt (the window view that `_measure` scores a windowed cache through does
    not fill the cache it wraps)."""
    cache = RQCache(config, calibration=calibration, model_config=smollm2[0].config)
    with torch.no_grad():
        smollm2[0](input_ids=ids[:, :PREFILL], **{cache_kwarg(smollm2[0]): cache}, use_cache=True, logits_to_keep=1)
    return cache.memory_report().compressed_bytes


def _bits_per_element(cache: RQCache, mc) -> float:
    """Bytes the cache allocated x 8 / elements; 3-bit codes + one fp16 norm per 64 = 3.25."""
    report = cache.memory_report()
    tokens = sum(m["tokens"] for m in report.layers.values())
    assert tokens % mc.num_hidden_layers == 0
    return report.compressed_bytes * 8 / (tokens * mc.num_key_value_heads * mc.head_dim * 2)


def test_sink_token_costs_only_its_own_bytes(smollm2, ids, calibration):
    caches: list[RQCache] = []
    config = RQConfig(backend="iso", bits=3, sink_tokens=1, residual_window=0)

    def make():
        caches.append(RQCache(config, calibration=calibration))
        return caches[-1]

    decode_time_ppl(smollm2[0], ids[:, :131], make, 128, 2, keep_logprobs=False)
    mc = smollm2[0].config
    sink_extra = 16 * 2 / 2 / (128 + 2) * 2  # generous: one fp32 token of K and V per layer over the sequence
    assert _bits_per_element(caches[0], mc) < 3.25 + sink_extra + 0.05


def test_a_repetitive_prompt_does_not_wreck_the_default_cache(smollm2):
    """The default cache calibrates on its prompt; 16 copies of one token measure channels without spread, whose
    scales made the next 256 tokens decode at ppl 429,042 for an fp 42 (QUALITY.md "Degenerate prompts"). The
    layers that cannot be measured stay uncalibrated: the default then equals the uncalibrated cache (65.07 at pin
    time, with session 6's one-layer default), while a real 16-token prompt still calibrates and beats it."""
    model, tok = smollm2
    text = license_corpus(tok, DECODE + 1, offset=4096)

    def quality(prompt, calibration):
        ids = torch.cat([prompt, text], 1)
        ref = decode_time_ppl(model, ids, prefill=prompt.shape[1], decode=DECODE, chunk=DECODE)
        make = (
            (lambda: RQCache(RQConfig()))
            if calibration == "default"
            else (lambda: RQCache(RQConfig(), calibration=None))
        )
        out = decode_time_ppl(model, ids, make, prefill=prompt.shape[1], decode=DECODE, chunk=DECODE)
        return out.ppl, kl_divergence(ref, out).mean().item()

    repeated = torch.full((1, 16), tok.encode(" the")[0])
    default, none = quality(repeated, "default"), quality(repeated, None)
    assert default[0] < 1.05 * none[0] and default[1] < 1.05 * none[1], (default, none)
    real = license_corpus(tok, 16, offset=100)
    default, none = quality(real, "default"), quality(real, None)
    assert default[1] < 0.8 * none[1], (default, none)
