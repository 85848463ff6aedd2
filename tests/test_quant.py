"""The compressed format (docs/FORMAT.md), checked piece by piece against math and published tables."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rqcompile import ops
from rqcompile.config import SCALE_SEARCH, RQConfig
from rqcompile.quant import rotations
from rqcompile.quant.codebook import boundaries, codebook, lloyd_max_distortion, lloyd_max_normal
from rqcompile.quant.packing import pack, pack_along_keys, packed_size, unpack, unpack_along_keys
from rqcompile.quant.quantizer import boundary_codes, dequantize, make_state, quantize

BACKENDS = ["planar", "iso", "rotor", "hadamard"]
HEAD_DIMS = [64, 128, 256]

# Max (1960) / Lloyd (1982) levels of the N(0, 1) quantizer, positive half.
PUBLISHED_LEVELS = {
    2: [0.4528, 1.5104],
    3: [0.2451, 0.7560, 1.3440, 2.1520],
    4: [0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6181, 2.0690, 2.7326],
}
PUBLISHED_DISTORTION = {2: 0.1175, 3: 0.03454, 4: 0.009497}


# --- codebooks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lloyd_max_levels_match_the_published_tables(bits):
    levels = lloyd_max_normal(bits)
    positive = sorted(x for x in levels if x > 0)
    assert positive == pytest.approx(PUBLISHED_LEVELS[bits], abs=6e-4)
    assert [-x for x in reversed(positive)] == pytest.approx([x for x in levels if x < 0], abs=1e-12)
    assert lloyd_max_distortion(bits) == pytest.approx(PUBLISHED_DISTORTION[bits], rel=3e-3)


@pytest.mark.parametrize("bits", range(1, 9))
def test_codebooks_are_exactly_symmetric_in_float32(bits):
    """levels[k] == -levels[-1 - k] bit for bit at every norm group size: the v2 encoder's scale search relies on it
    (it codes magnitudes from the upper half), and the artifact loader refuses levels that are not."""
    for group in (8, 16, 32, 64, 96, 128, 256, 512):
        levels = codebook(bits, group)
        assert torch.equal(levels, -levels.flip(0)), (bits, group)
        # and making it exact moved no float32 level: the format's codebooks are the ones artifacts already hold
        assert torch.equal(
            levels, (torch.tensor(lloyd_max_normal(bits), dtype=torch.float64) / math.sqrt(group)).float()
        )


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_a_unit_exactly_on_a_boundary_rounds_toward_zero(bits):
    """The format's tie rule (docs/FORMAT.md "Ties"): off the boundaries a code counts the boundaries below u; on one
    it takes the level nearer zero (below 0 the boundary counts, at or above 0 it does not), so -u codes as the
    mirror of u and 0 / -0 take the code just below 0."""
    levels = codebook(bits, 128)
    bounds = boundaries(levels)
    nl = 2**bits
    on = torch.cat([bounds, -bounds])
    off = torch.cat([torch.nextafter(on, on + 1), torch.nextafter(on, on - 1), torch.randn(1000) / 8])
    u = torch.cat([on, off, torch.tensor([0.0, -0.0])])
    codes = boundary_codes(u, bounds)
    n_off = off.numel()
    assert torch.equal(codes[on.numel() : on.numel() + n_off], (off[:, None] > bounds).sum(-1))
    k = torch.arange(nl - 1).repeat(2)  # the boundary each `on` value sits on (bounds are symmetric: -b_k = b_j)
    k[nl - 1 :] = nl - 2 - k[nl - 1 :]
    pair = torch.stack([levels[k], levels[k + 1]], -1).abs()
    assert torch.isin(codes[: on.numel()] - k, torch.tensor([0, 1])).all()
    assert torch.equal(levels[codes[: on.numel()]].abs(), pair.min(-1).values)  # the nearer-zero of its two levels
    nonzero = u != 0
    assert torch.equal(boundary_codes(-u, bounds)[nonzero], nl - 1 - codes[nonzero])
    assert (codes[~nonzero] == nl // 2 - 1).all()


def test_codebook_is_scaled_for_a_unit_vector_in_the_norm_group():
    assert codebook(3, 128) * math.sqrt(128) == pytest.approx(torch.tensor(lloyd_max_normal(3)).float(), abs=1e-6)


# --- rotations ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS + ["none"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_rotation_is_orthogonal_and_its_inverse_is_exact(backend, head_dim):
    blocks = rotations.make_rotation(backend, 2, head_dim, min(head_dim, 128), seed=3, layer_idx=1, kind="k")
    eye = torch.eye(blocks.shape[-1]).expand_as(blocks)
    assert torch.allclose(blocks @ blocks.transpose(-1, -2), eye, atol=1e-5)
    x = torch.randn(2, 2, 7, head_dim)
    y = rotations.rotate(x, blocks)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(rotations.rotate(y, blocks, inverse=True), x, atol=1e-5)
    if backend != "none":
        assert not torch.allclose(y, x, atol=1e-3), "a rotation that does nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_is_deterministic_from_seed_layer_head_and_kind(backend):
    make = lambda **kw: rotations.make_rotation(backend, 4, 128, 128, **{"seed": 0, "layer_idx": 0, "kind": "k", **kw})
    base = make()
    assert torch.equal(base, make())
    assert not torch.equal(base, make(seed=1))
    assert not torch.equal(base, make(layer_idx=1))
    assert not torch.equal(base, make(kind="v"))
    assert not torch.equal(base[0], base[1]), "heads must get different rotations"
    # A head's rotation does not depend on how many heads were generated alongside it.
    assert torch.equal(rotations.make_rotation(backend, 2, 128, 128, seed=0, layer_idx=0, kind="k"), base[:2])


# --- staged rotations (RQConfig.rotation_stages) ---------------------------------------------------------------
def _apply_stages_one_by_one(backend: str, x: torch.Tensor, group: int, stages, **kw) -> torch.Tensor:
    """R = B_s P_{s-1} ... P_1 B_1 applied as written, stage by stage, to x [..., d] of one head (head 0)."""
    radices = rotations.stage_radices(backend, group, stages)
    y = x.double().unflatten(-1, (-1, group))  # [..., d/g, g]
    for stage, b in enumerate(radices):
        gen = rotations.head_generator(kw["seed"] + rotations.STAGE_SEED_STRIDE * stage, kw["layer_idx"], 0, kw["kind"])
        if stage:
            y = y[..., rotations.shuffle_perm(group, radices[stage - 1])]
        out = []
        for g in range(y.shape[-2]):
            blocks = rotations.stage_blocks(b, group, gen)  # [nb, b, b]
            nb = blocks.shape[0]
            padded = F.pad(y[..., g, :], (0, nb * b - group)).unflatten(-1, (nb, b))
            out.append(torch.einsum("jik,...jk->...ji", blocks, padded).flatten(-2)[..., :group])
        y = torch.stack(out, -2)
    return y.flatten(-2)


@pytest.mark.parametrize(
    "backend,head_dim,stages", [("planar", 64, 3), ("iso", 256, "full"), ("rotor", 64, 2), ("rotor", 128, "full")]
)
def test_staged_rotation_is_the_product_of_its_stages_folded_per_norm_group(backend, head_dim, stages):
    group = min(head_dim, 128)
    kw = {"seed": 2, "layer_idx": 3, "kind": "v"}
    folded = rotations.make_rotation(backend, 1, head_dim, group, stages=stages, **kw)
    assert tuple(folded.shape) == (1, head_dim // group, group, group)  # dense per group: hadamard's shape
    eye = torch.eye(group).expand_as(folded)
    assert torch.allclose(folded @ folded.transpose(-1, -2), eye, atol=1e-5)
    x = torch.randn(5, head_dim, dtype=torch.float64)
    expected = _apply_stages_one_by_one(backend, x, group, stages, **kw)
    got = rotations.rotate(x[None, None], folded.double())[0, 0]
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("backend,stages,width", [("planar", 1, 2), ("planar", 3, 8), ("iso", 2, 16), ("iso", 3, 64)])
def test_each_stage_multiplies_the_mixing_width_by_the_block_size(backend, stages, width):
    """Output coordinate i depends on b**s input coordinates (the perfect shuffle feeds each block from b others)."""
    rot = RQConfig(backend=backend, rotation_stages=stages)
    state = make_state(rot, layer_idx=0, kind="k", num_heads=1, head_dim=128)
    dense = torch.block_diag(*state.rotation[0])
    assert ((dense.abs() > 1e-7).sum(-1) == width).all()


@pytest.mark.parametrize("backend,head_dim", [("iso", 64), ("iso", 128), ("iso", 256), ("planar", 128)])
def test_full_mixing_spreads_every_coordinate_evenly_like_a_hadamard_transform(backend, head_dim):
    """With `rotation_stages="full"` every entry of each group's rotation has magnitude 1/sqrt(g) (iso at g = 128:
    three 4D stages and one 2D stage), and heads get different sign patterns."""
    state = make_state(
        RQConfig(backend=backend, rotation_stages="full"), layer_idx=0, kind="k", num_heads=2, head_dim=head_dim
    )
    group = min(head_dim, 128)
    assert tuple(state.rotation.shape) == (2, head_dim // group, group, group)  # no mixing across norm groups
    assert torch.allclose(state.rotation.abs(), torch.full_like(state.rotation, group**-0.5), atol=1e-6)
    assert not torch.equal(state.rotation[0], state.rotation[1])


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotor_full_mixing_leaves_no_coordinate_out(head_dim):
    """Rotor stages cannot be equal-magnitude (no 3x3 Hadamard matrix); they take the flattest 3D rotation (entries
    2/3, 2/3, 1/3) in random signed orientations, and because 3 does not divide the group, the shuffle moves the
    leftover slot every stage. With a fixed slot, coordinate 63 of a 64-group was never mixed (an entry of 1)."""
    state = make_state(
        RQConfig(backend="rotor", rotation_stages="full"), layer_idx=0, kind="k", num_heads=2, head_dim=head_dim
    )
    group = min(head_dim, 128)
    rot = state.rotation.double()
    assert torch.allclose(rot @ rot.transpose(-1, -2), torch.eye(group, dtype=torch.float64).expand_as(rot), atol=1e-5)
    assert rot.abs().max() < 0.5  # every output coordinate mixes many inputs (a fixed slot would give 1.0)
    # participation: 1 / sum(entry**4) per row, over g; 1 for Hadamard, ~1/3 for a Haar-random rotation
    participation = (1 / (rot**4).sum(-1)).mean() / group
    assert participation > 0.35
    gen = torch.Generator().manual_seed(0)
    blocks = rotations.stage_blocks(3, 64, gen)
    assert torch.allclose(torch.linalg.det(blocks[:-1]), torch.ones(21, dtype=torch.float64))
    magnitudes = (blocks[:-1].abs() * 3).round().sort(-1).values
    assert torch.equal(magnitudes, torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64).expand_as(magnitudes))


def test_the_default_mixes_the_whole_group_and_one_stage_is_the_block_rotation():
    make = lambda **kw: make_state(RQConfig(**kw), layer_idx=1, kind="k", num_heads=2, head_dim=64)  # noqa: E731
    plain = make(rotation_stages=1)
    assert tuple(plain.rotation.shape) == (2, 16, 4, 4)
    assert torch.equal(plain.rotation, rotations.make_rotation("iso", 2, 64, 64, seed=0, layer_idx=1, kind="k"))
    assert torch.equal(make().rotation, make(rotation_stages="full").rotation)
    assert torch.equal(make(rotation_stages="full").rotation, make(rotation_stages=3).rotation)  # 4**3 = 64
    full = RQConfig()
    assert full.stage_count(64) == 3 and full.stage_count(128) == 4  # 128: 4D, 4D, 4D, 2D
    assert rotations.stage_radices("iso", 128, "full") == (4, 4, 4, 2)
    assert full.replace(backend="planar").stage_count(128) == 7
    assert full.replace(backend="rotor").stage_count(64) == 4  # 3**4 = 81 >= 64
    assert full.replace(backend="hadamard").stage_count(64) == 1  # no blocks to compose: already mixes the group


@pytest.mark.parametrize(
    "kwargs,resolved",
    [
        ({}, "full"),
        ({"backend": "planar"}, "full"),
        ({"backend": "rotor"}, "full"),
        ({"backend": "hadamard"}, 1),
        ({"backend": "none"}, 1),
        ({"bits": 3.5, "bit_allocation": (3, 4)}, 1),  # allocation reorders whole blocks: only one layer of them
        ({"rotation_stages": 2}, 2),
    ],
)
def test_the_default_rotation_stages_resolve_to_full_mixing_where_blocks_compose(kwargs, resolved):
    assert RQConfig(**kwargs).resolved_rotation_stages == resolved


def test_a_config_dict_written_before_rotation_stages_keeps_its_one_layer_format():
    """Artifact manifests written before session 7 have no rotation_stages: their format was one block layer."""
    data = RQConfig().to_dict()
    del data["rotation_stages"]
    assert RQConfig.from_dict(data).resolved_rotation_stages == 1
    assert RQConfig.from_dict(RQConfig().to_dict()) == RQConfig()  # today's dicts: the default round-trips


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rotation_stages": 0}, "rotation_stages=0 must be 'full' .* or an int"),
        ({"rotation_stages": "most"}, "must be 'full'"),
        ({"rotation_stages": "full", "bits": 3.5, "bit_allocation": (3, 4)}, "use one or the other"),
        ({"rotation_stages": 2.0}, "or an int in 1..8"),
        ({"rotation_stages": 9}, "in 1..8"),
        ({"backend": "hadamard", "rotation_stages": 2}, "backend 'hadamard' has none to compose"),
        ({"rotation_stages": 2, "bits": 3.5, "bit_allocation": (3, 4)}, "use one or the other"),
    ],
)
def test_bad_rotation_stages_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RQConfig(**kwargs)


@pytest.mark.parametrize("stages", [1, 3, "full", None])
def test_rotation_stages_survive_the_config_dict_round_trip(stages):
    config = RQConfig(backend="rotor", rotation_stages=stages)
    assert RQConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_iso_full_is_a_general_so4_element_and_fast_is_left_isoclinic():
    full = rotations.make_rotation("iso", 1, 64, 64, seed=0, layer_idx=0, kind="k", iso_mode="full")[0, 0]
    fast = rotations.make_rotation("iso", 1, 64, 64, seed=0, layer_idx=0, kind="k", iso_mode="fast")[0, 0]
    # A left multiplication q_L v is isoclinic: M + M^T is a multiple of the identity. A general SO(4) element is not.
    sym = fast + fast.T
    assert torch.allclose(sym, sym[0, 0] * torch.eye(4), atol=1e-5)
    assert not torch.allclose(full + full.T, (full + full.T)[0, 0] * torch.eye(4), atol=1e-3)
    assert torch.det(full).item() == pytest.approx(1.0, abs=1e-5)


def test_rotor_sandwich_has_no_trivector_part_and_matches_the_matrix():
    gen = torch.Generator().manual_seed(0)
    rotor = rotations.random_rotor(gen, 5)
    v = torch.zeros(5, 8, dtype=torch.float64)
    v[:, 1:4] = torch.randn(5, 3, dtype=torch.float64)
    image = rotations.clifford_product(rotations.clifford_product(rotor, v), rotations.clifford_reverse(rotor))
    assert image[:, [0, 4, 5, 6, 7]].abs().max() < 1e-12  # a vector in, a vector out
    matrix = rotations.rotor_sandwich_matrix(rotor)
    assert torch.allclose((matrix @ v[:, 1:4, None])[..., 0], image[:, 1:4], atol=1e-12)
    assert torch.allclose(torch.det(matrix), torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("head_dim,leftover", [(64, 1), (128, 2), (96, 0)])
def test_rotor_handles_head_dims_not_divisible_by_three(head_dim, leftover):
    blocks = rotations.make_rotation("rotor", 1, head_dim, min(head_dim, 128), seed=0, layer_idx=0, kind="k")
    assert blocks.shape[1] == math.ceil(head_dim / 3)
    x = torch.randn(1, 1, 3, head_dim)
    assert torch.allclose(rotations.rotate(rotations.rotate(x, blocks), blocks, inverse=True), x, atol=1e-5)
    if leftover == 2:  # the two leftover coordinates are rotated, not left alone
        assert not torch.allclose(rotations.rotate(x, blocks)[..., -2:], x[..., -2:])


# --- packing --------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4]),
    dim=st.sampled_from([8, 16, 64, 128, 256]),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trips_at_exactly_bits_per_code(bits, dim, lead, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*lead, dim), generator=gen)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == packed_size(dim, bits) == dim * bits // 8
    assert torch.equal(unpack(packed, bits, dim), codes)


def test_packing_layout_is_the_documented_one():
    codes = torch.tensor([5, 2, 7, 1, 0, 3, 6, 4] * 2)  # 16 three-bit codes
    packed = pack(codes, 3)
    low = [(c & 3) for c in codes.tolist()]
    high = [(c >> 2) & 1 for c in codes.tolist()]
    expect_low = [sum(low[4 * j + i] << (2 * i) for i in range(4)) for j in range(4)]
    expect_high = [sum(high[8 * j + i] << i for i in range(8)) for j in range(2)]
    assert packed.tolist() == expect_low + expect_high


def test_unpackable_widths_are_refused():
    for bits in (0, 9):
        with pytest.raises(ValueError, match=f"bits={bits}"):
            pack(torch.zeros(8, dtype=torch.long), bits)


# --- quantizer ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantize_error_on_gaussian_vectors_is_the_lloyd_max_distortion(backend, bits):
    torch.manual_seed(bits)
    head_dim = 128
    # the codebook's own distortion: the default scale search can only lower it
    plain = RQConfig(backend=backend, bits=bits, scale_search=())
    state = make_state(plain, layer_idx=0, kind="k", num_heads=2, head_dim=head_dim)
    x = torch.randn(4, 2, 256, head_dim) * 3.0
    codes, norms = quantize(x, state.rotation, state.mean, state.scale, state.levels, bits, state.group)
    x_hat = dequantize(codes, norms, state.rotation, state.mean, state.scale, state.levels, bits, head_dim)
    relative_mse = (((x_hat - x) ** 2).sum(-1) / (x**2).sum(-1)).mean().item()
    assert relative_mse == pytest.approx(lloyd_max_distortion(bits), rel=0.05)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_storage_is_exactly_bits_per_element_plus_one_fp16_norm_per_group(head_dim):
    state = make_state(RQConfig(bits=3), layer_idx=0, kind="v", num_heads=1, head_dim=head_dim)
    codes, norms = ops.quantize_state(torch.randn(1, 1, 5, head_dim), state)
    assert codes.shape == (1, 1, 5, head_dim * 3 // 8) and codes.dtype == torch.uint8
    assert norms.shape == (1, 1, 5, head_dim // min(head_dim, 128)) and norms.dtype == torch.float16


def test_corrected_norm_preserves_the_vector_length():
    state = make_state(RQConfig(backend="iso", bits=2), layer_idx=0, kind="k", num_heads=1, head_dim=128)
    x = torch.randn(1, 1, 64, 128)
    x_hat = ops.dequantize_state(*ops.quantize_state(x, state), state, torch.float32)
    assert torch.allclose(x_hat.norm(dim=-1), x.norm(dim=-1), rtol=2e-3)  # fp16 norm rounding only


def test_zero_vectors_round_trip_to_zero_and_nan_is_refused():
    state = make_state(RQConfig(backend="rotor", bits=3), layer_idx=0, kind="k", num_heads=1, head_dim=64)
    x = torch.randn(1, 1, 3, 64)
    x[0, 0, 1] = 0.0
    x_hat = ops.dequantize_state(*ops.quantize_state(x, state), state, torch.float32)
    assert torch.isfinite(x_hat).all()
    assert torch.equal(x_hat[0, 0, 1], torch.zeros(64))
    x[0, 0, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ops.quantize_state(x, state)


def test_mean_and_scale_are_undone_by_dequantize():
    state = make_state(RQConfig(backend="planar", bits=4), layer_idx=0, kind="k", num_heads=2, head_dim=64)
    mean, scale = torch.randn(2, 64), torch.rand(2, 64) + 0.5
    x = torch.randn(1, 2, 100, 64) * scale[:, None] + mean[:, None]
    codes, norms = quantize(x, state.rotation, mean, scale, state.levels, 4, state.group)
    x_hat = dequantize(codes, norms, state.rotation, mean, scale, state.levels, 4, 64)
    assert ((x_hat - x) ** 2).mean() < 0.02 * ((x - mean[:, None]) ** 2).mean()


# --- attention in the rotated space ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_len,mask_kind", [(1, None), (5, "bool"), (5, "float")])
def test_rotated_space_attention_equals_sdpa_over_the_dequantized_cache(backend, q_len, mask_kind):
    torch.manual_seed(0)
    cfg = RQConfig(backend=backend, key_bits=4, value_bits=2)
    k = make_state(cfg, layer_idx=2, kind="k", num_heads=2, head_dim=128)
    v = make_state(cfg, layer_idx=2, kind="v", num_heads=2, head_dim=128)
    v = type(v)(v.rotation, torch.randn(2, 128), torch.rand(2, 128) + 0.5, v.levels, v.bits, v.group)
    keys, values, q = torch.randn(3, 2, 40, 128), torch.randn(3, 2, 40, 128), torch.randn(3, 6, q_len, 128)
    kc, kn = ops.quantize_state(keys, k)
    vc, vn = ops.quantize_state(values, v)
    mask = None
    if mask_kind:
        allowed = torch.ones(q_len, 40, dtype=torch.bool).tril(40 - q_len)[None, None].expand(3, 1, q_len, 40)
        mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    expected = F.scaled_dot_product_attention(
        q,
        ops.dequantize_state(kc, kn, k, torch.float32),
        ops.dequantize_state(vc, vn, v, torch.float32),
        attn_mask=mask,
        enable_gqa=True,
    )
    got = ops.attention_state(q, kc, kn, vc, vn, k, v, mask)
    assert torch.allclose(got, expected, atol=2e-5)


def test_values_packed_along_keys_are_only_the_value_states_of_that_layout():
    config = RQConfig(value_layout="keys", key_bits=4, value_bits=2)
    k, v = (make_state(config, layer_idx=0, kind=kind, num_heads=2, head_dim=64) for kind in "kv")
    assert v.along_keys and not k.along_keys  # K keeps its per-token layout (its mma operand pairs coordinates)
    assert not make_state(RQConfig(), layer_idx=0, kind="v", num_heads=2, head_dim=64).along_keys
    assert RQConfig.from_dict(config.to_dict()) == config
    assert RQConfig().value_layout is None  # auto: resolved by apply, per token in the eager caches
    assert RQConfig.from_dict({"backend": "iso"}).value_layout == "coordinates"  # a manifest from before the field


def test_the_reference_reads_values_packed_along_keys_as_the_same_numbers():
    """rq::dequantize and rq::attention on V packed along keys give the per-token layout's results exactly."""
    k = make_state(RQConfig(), layer_idx=0, kind="k", num_heads=2, head_dim=64)
    v = make_state(RQConfig(value_layout="keys"), layer_idx=0, kind="v", num_heads=2, head_dim=64)
    per_token = replace(v, along_keys=False)
    kc, kn = ops.quantize_state(torch.randn(1, 2, 32, 64), k)
    vc, vn = ops.quantize_state(torch.randn(1, 2, 32, 64), v)
    along = pack_along_keys(vc, 3, 64)
    assert torch.equal(
        ops.dequantize_state(along, vn, v, torch.float32), ops.dequantize_state(vc, vn, per_token, torch.float32)
    )
    q = torch.randn(1, 4, 1, 64)
    assert torch.equal(
        ops.attention_state(q, kc, kn, along, vn, k, v), ops.attention_state(q, kc, kn, vc, vn, k, per_token)
    )
    with pytest.raises(ValueError, match="multiple of 16"):
        ops.dequantize_state(along[:, :, :20], vn[:, :, :20], v, torch.float32)


def test_ops_pass_the_torch_library_checks():
    state = make_state(RQConfig(), layer_idx=0, kind="k", num_heads=2, head_dim=64)
    x = torch.randn(1, 2, 4, 64)
    codes, norms = ops.quantize_state(x, state)
    tensors = (state.rotation, state.mean, state.scale, state.levels)
    torch.library.opcheck(torch.ops.rq.quantize.default, (x, *tensors, 3, 64))
    torch.library.opcheck(torch.ops.rq.dequantize.default, (codes, norms, *tensors, 3, 64, torch.float32))


# --- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"backend": "spiral"}, "unknown backend 'spiral'"),
        ({"bits": 5}, "bits=5 is not supported"),
        ({"bits": 3, "key_bits": 8}, "key_bits=8"),
        ({"iso_mode": "slow"}, "iso_mode"),
        ({"residual_window": -1}, "residual_window"),
        ({"value_layout": "tokens"}, "unknown value_layout 'tokens'"),
        ({"value_layout": "keys", "value_bits": 4}, r"packs V at \(2, 3\) bits; this config has V at \[4\]"),
        ({"value_layout": "keys", "layer_bits": ((1, 3, 4),)}, r"V at \[3, 4\]"),
        ({"value_layout": "keys", "bits": 3, "bit_allocation": (2, 3, 4)}, "cannot take bit_allocation"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RQConfig(**kwargs)


def test_norm_group_must_divide_head_dim():
    with pytest.raises(ValueError, match="must divide head_dim"):
        RQConfig(norm_group=48).group_for(64)


# --- scale search (docs/FORMAT.md, "Scale search") -----------------------------------------------------------
def _outlier_keys(n: int = 512, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Key-like vectors: Gaussian channels plus, on one token in eight, a few channels ten times larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, n, dim, generator=g)
    atypical = torch.rand(1, 1, n, 1, generator=g) < 0.125
    big = torch.zeros(dim)
    big[[3, 17, 40]] = 10.0
    return x + atypical * big * torch.randn(1, 1, n, 1, generator=g).sign()


def _group_sq_error(state, x: torch.Tensor) -> torch.Tensor:
    x_hat = ops.dequantize_state(*ops.quantize_state(x, state), state, torch.float32)
    return ((x_hat - x) ** 2).unflatten(-1, (state.num_groups, state.group)).sum(-1)


def test_state_levels_are_the_codebook_followed_by_the_scale_candidates():
    plain = make_state(RQConfig(bits=3, scale_search=()), layer_idx=0, kind="k", num_heads=1, head_dim=64)
    searched = make_state(RQConfig(bits=3, scale_search=SCALE_SEARCH), layer_idx=0, kind="k", num_heads=1, head_dim=64)
    assert plain.levels.shape == (8,) and plain.scale_candidates.numel() == 0
    assert torch.equal(searched.codebook, plain.levels)
    assert searched.scale_candidates.tolist() == pytest.approx(list(SCALE_SEARCH))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_scale_search_never_reconstructs_a_group_worse_than_the_plain_quantizer(backend, bits):
    config = RQConfig(backend=backend, bits=bits, scale_search=())
    plain = make_state(config, layer_idx=1, kind="k", num_heads=1, head_dim=64)
    searched = make_state(config.replace(scale_search=SCALE_SEARCH), layer_idx=1, kind="k", num_heads=1, head_dim=64)
    x = _outlier_keys()
    err_plain, err_searched = _group_sq_error(plain, x), _group_sq_error(searched, x)
    # candidate 1.0 is the plain codes, so only fp16 rounding of the stored norm can make a group worse
    assert (err_searched <= err_plain * (1 + 2e-3) + 1e-6).all()
    assert err_searched.mean() < err_plain.mean()


@pytest.mark.parametrize("backend", ["planar", "iso", "rotor"])
def test_scale_search_cuts_the_error_of_block_rotations_on_keys_with_outlier_channels(backend):
    config = RQConfig(backend=backend, bits=3, scale_search=(), rotation_stages=1)
    plain = make_state(config, layer_idx=1, kind="k", num_heads=1, head_dim=64)
    searched = make_state(config.replace(scale_search=SCALE_SEARCH), layer_idx=1, kind="k", num_heads=1, head_dim=64)
    x = _outlier_keys(seed=1)
    assert _group_sq_error(searched, x).mean() < 0.85 * _group_sq_error(plain, x).mean()


def test_decoders_read_only_the_codebook_part_of_the_levels():
    state = make_state(
        RQConfig(backend="iso", bits=3, scale_search=SCALE_SEARCH), layer_idx=0, kind="k", num_heads=2, head_dim=64
    )
    codes, norms = ops.quantize_state(_outlier_keys(dim=64).expand(1, 2, -1, -1).contiguous(), state)
    full = dequantize(codes, norms, state.rotation, state.mean, state.scale, state.levels, 3, 64)
    bare = dequantize(codes, norms, state.rotation, state.mean, state.scale, state.codebook, 3, 64)
    assert torch.equal(full, bare)


def test_scale_search_kernel_matches_the_reference(monkeypatch):
    """The Triton quantize kernel (interpreter on CPU) runs the same search: same codes and norms."""
    import importlib

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from rqcompile.kernels import quantize as kquant

    kquant = importlib.reload(kquant)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for backend, bits in (("iso", 3), ("planar", 4), ("rotor", 2), ("hadamard", 3)):
        config = RQConfig(backend=backend, bits=bits, scale_search=SCALE_SEARCH)
        state = make_state(config, layer_idx=0, kind="k", num_heads=2, head_dim=64)
        x = _outlier_keys(n=24).expand(2, 2, -1, -1).contiguous() * torch.tensor([1.0, 0.5]).view(1, 2, 1, 1)
        args = (state.rotation, state.mean, state.scale, state.levels, bits, state.group)
        codes, norms = kquant.launch_quantize(x.to(device), *(a.to(device) if torch.is_tensor(a) else a for a in args))
        ref_codes, ref_norms = quantize(x, *args)
        got, want = unpack(codes.cpu(), bits, 64), unpack(ref_codes, bits, 64)
        assert (got != want).float().mean() <= 1e-3, backend
        same = (got == want).all(-1)
        assert torch.allclose(norms.cpu().float()[same], ref_norms.float()[same], rtol=2e-3), backend


@pytest.mark.parametrize("bad", [(0.0,), (1.0, -2.0), (float("inf"),), ("1",), 1.2])
def test_scale_search_candidates_must_be_positive_finite_numbers(bad):
    with pytest.raises(ValueError, match="scale_search"):
        RQConfig(scale_search=bad)


def test_scale_search_is_on_by_default():
    assert RQConfig().scale_search == SCALE_SEARCH and RQConfig(scale_search=()).scale_search == ()


def test_scale_search_survives_the_config_dict_round_trip():
    config = RQConfig(backend="iso", scale_search=SCALE_SEARCH)
    assert RQConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# --- per-layer bits -------------------------------------------------------------------------------------------
def test_layer_bits_override_key_and_value_bits_of_the_named_layers_only():
    config = RQConfig(backend="iso", bits=3, layer_bits=((4, 4, 2),))
    states = {
        (layer, kind): make_state(config, layer_idx=layer, kind=kind, num_heads=1, head_dim=64)
        for layer in (3, 4)
        for kind in ("k", "v")
    }
    assert [states[(4, "k")].bits, states[(4, "v")].bits, states[(3, "k")].bits, states[(3, "v")].bits] == [4, 2, 3, 3]
    assert states[(4, "k")].codebook.numel() == 16 and states[(4, "v")].code_bytes == 16


def test_a_cache_layer_allocates_the_bits_its_layer_is_given():
    from rqcompile.cache import RQCacheLayer

    # codes + norms only
    config = RQConfig(backend="planar", bits=3, layer_bits=((1, 4, 4),), sink_tokens=0, residual_window=0)
    held = []
    for layer_idx in (0, 1):
        layer = RQCacheLayer(config, layer_idx)
        layer.update(torch.randn(1, 2, 64, 64), torch.randn(1, 2, 64, 64))
        held.append(layer.memory()["compressed_bytes"] * 8 / (64 * 2 * 64 * 2))
    assert held == [3.25, 4.25]


@pytest.mark.parametrize(
    "bad", [((0, 5, 3),), ((-1, 4, 3),), ((0, 4),), ((1, 4, 3), (1, 3, 3)), ((0, True, 3),), (0, 4, 3)]
)
def test_bad_layer_bits_are_refused(bad):
    with pytest.raises(ValueError, match="layer_bits"):
        RQConfig(layer_bits=bad)


def test_layer_bits_survive_the_config_dict_round_trip():
    config = RQConfig(backend="rotor", layer_bits=((7, 4, 3), (2, 4, 2)))
    assert config.layer_bits == ((2, 4, 2), (7, 4, 3))
    assert RQConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("bits", [2, 3])
def test_packing_along_keys_puts_key_k_of_a_block_at_bit_k_of_each_coordinates_word(bits):
    """packing.pack_along_keys (the layout keys-m's VKEYS prototype reads): per block of 16 keys, word c holds
    coordinate c's low plane with key k at bits 2k, then at 3 bits halfword c holds the high plane with key k at bit
    k; little-endian, the same bytes per block."""
    dim = 64
    codes = torch.randint(0, 1 << bits, (2, 3, 48, dim))
    along = pack_along_keys(pack(codes, bits), bits, dim)
    assert along.shape == (2, 3, 48, dim * bits // 8) and along.dtype == torch.uint8
    words = along.reshape(2, 3, 3, -1).view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # [.., block, words]
    k = torch.arange(16)
    for blk in range(3):
        block = codes[:, :, 16 * blk : 16 * blk + 16]  # [2, 3, 16, dim]
        low = (words[:, :, blk, :dim, None] >> (2 * k)) & 3  # [2, 3, dim, 16]
        got = low
        if bits == 3:
            half = (words[:, :, blk, dim:].repeat_interleave(2, -1) >> (16 * (torch.arange(dim) % 2))) & 0xFFFF
            got = got | (((half[..., None] >> k) & 1) << 2)
        assert torch.equal(got, block.transpose(-1, -2))
    assert torch.equal(unpack_along_keys(along, bits, dim), codes)  # and back


def test_packing_along_keys_needs_whole_blocks_of_2_or_3_bit_codes():
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_along_keys(pack(torch.zeros(1, 20, 64, dtype=torch.int64), 3), 3, 64)
    with pytest.raises(ValueError, match="2 and 3 bits"):
        pack_along_keys(pack(torch.zeros(1, 16, 64, dtype=torch.int64), 4), 4, 64)
    with pytest.raises(ValueError, match="multiple of 16 keys"):
        unpack_along_keys(torch.zeros(1, 20, 24, dtype=torch.uint8), 3, 64)
