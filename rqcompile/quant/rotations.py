"""Block-diagonal rotations, all stored the same way: a tensor of blocks `[H, nb, b, b]` per (layer, K|V).

Each backend generates its blocks from its own parameters (angles, quaternions, rotors, signs); once built, every
path (reference, kernels, exports) only sees the matrices, so there is one apply/inverse for all backends.
Parameters are random but deterministic from (seed, layer, kv-head, K|V).

Staged rotations (`RQConfig.rotation_stages = s > 1` or "full") compose s layers of blocks with a perfect shuffle
between layers, inside each norm group: `R = B_s P ... P B_1`, so one coordinate mixes with b^s others (a radix-b
butterfly; a 2-4 dim block alone cannot spread one large coordinate the way Hadamard does). Their 2D / 4D blocks
have equal-magnitude entries (random signs), so a fully mixed group is a randomized Hadamard-type transform; 3D
blocks cannot, and take the flattest 3D rotation in random signed orientations instead. The
product is stored folded, as one dense `[g, g]` block per norm group: the hadamard backend's shape, which every path
reads (docs/FORMAT.md "Staged rotations").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLOCK_SIZE = {"none": 1, "planar": 2, "rotor": 3, "iso": 4}
_KINDS = {"k": 0, "v": 1}


def head_generator(seed: int, layer_idx: int, head: int, kind: str) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, layer, kv-head, K|V)."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
    mixed = (seed * 0x9E3779B1 + layer_idx * 0x85EBCA77 + head * 0xC2B2AE3D + _KINDS[kind] * 0x27D4EB2F) % (2**61 - 1)
    return torch.Generator().manual_seed(mixed)


def givens(theta: torch.Tensor) -> torch.Tensor:
    """2x2 rotations [..., 2, 2] from angles."""
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def quat_left(q: torch.Tensor) -> torch.Tensor:
    """Matrix of v -> q * v for quaternions (w, x, y, z)."""
    w, x, y, z = q.unbind(-1)
    rows = [[w, -x, -y, -z], [x, w, -z, y], [y, z, w, -x], [z, -y, x, w]]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def quat_right(q: torch.Tensor) -> torch.Tensor:
    """Matrix of v -> v * q for quaternions (w, x, y, z)."""
    w, x, y, z = q.unbind(-1)
    rows = [[w, -x, -y, -z], [x, w, z, -y], [y, -z, w, x], [z, y, -x, w]]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def quat_conj(q: torch.Tensor) -> torch.Tensor:
    return q * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=q.dtype)


# --- Cl(3,0): multivectors as 8 coefficients over the basis [1, e1, e2, e3, e12, e13, e23, e123]. ---
_BASIS = [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)]


def _blade_product(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
    """Geometric product of two basis blades of Cl(3,0) (all e_i^2 = +1): sign and resulting blade."""
    items, sign = list(a) + list(b), 1.0
    changed = True
    while changed:  # bubble sort, counting swaps; cancel equal neighbours (e_i e_i = 1)
        changed = False
        for i in range(len(items) - 1):
            if items[i] > items[i + 1]:
                items[i], items[i + 1] = items[i + 1], items[i]
                sign, changed = -sign, True
            elif items[i] == items[i + 1]:
                del items[i : i + 2]
                changed = True
                break
    return sign, tuple(items)


_TABLE = [[_blade_product(a, b) for b in _BASIS] for a in _BASIS]


def clifford_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Geometric product of multivectors [..., 8] in Cl(3,0)."""
    out = torch.zeros(torch.broadcast_shapes(a.shape, b.shape), dtype=a.dtype)
    for i in range(8):
        for j in range(8):
            sign, blade = _TABLE[i][j]
            out[..., _BASIS.index(blade)] += sign * a[..., i] * b[..., j]
    return out


def clifford_reverse(a: torch.Tensor) -> torch.Tensor:
    """Reversion: flips the sign of bivectors and the trivector."""
    return a * torch.tensor([1, 1, 1, 1, -1, -1, -1, -1], dtype=a.dtype)


def rotor_sandwich_matrix(rotor: torch.Tensor) -> torch.Tensor:
    """3x3 matrix of v -> R v R~ for even multivectors R [..., 8] (scalar + bivector, unit norm).

    The sandwich of a vector by a rotor is a vector (its trivector part cancels), so the matrix is all we keep.
    """
    cols = []
    for axis in range(3):
        e = torch.zeros(8, dtype=rotor.dtype)
        e[1 + axis] = 1.0
        image = clifford_product(clifford_product(rotor, e), clifford_reverse(rotor))
        cols.append(image[..., 1:4])
    return torch.stack(cols, -1)


def random_rotor(gen: torch.Generator, count: int) -> torch.Tensor:
    """Haar-random unit rotors (scalar + bivector), [count, 8]."""
    coeff = torch.randn(count, 4, generator=gen, dtype=torch.float64)
    coeff = coeff / coeff.norm(dim=-1, keepdim=True)
    rotor = torch.zeros(count, 8, dtype=torch.float64)
    rotor[:, 0] = coeff[:, 0]
    rotor[:, 4:7] = coeff[:, 1:4]
    return rotor


def hadamard_matrix(n: int) -> torch.Tensor:
    """Normalized Sylvester Walsh-Hadamard matrix of order n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"the hadamard backend needs a power-of-two norm group, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


STAGE_SEED_STRIDE = 1000  # stage s (0-based) draws its blocks from seed + STAGE_SEED_STRIDE * s
FULL_MIXING = "full"  # stages: as many as it takes to mix the whole norm group
STAGED_BACKENDS = ("planar", "rotor", "iso")  # the backends whose blocks stages compose


def stage_radices(backend: str, group: int, stages: int | str) -> tuple[int, ...]:
    """Block size of each stage. An int s: s stages of the backend's blocks. "full": the fewest that mix the whole
    group: planar 2 x log2(g), rotor 3s until 3**s >= g, iso 4s, ending with one 2D stage when g is 2 * 4**k (so
    that, as for planar, every entry of the folded rotation has magnitude 1 / sqrt(g))."""
    b = BLOCK_SIZE[backend]
    if stages != FULL_MIXING:
        return (b,) * int(stages)
    radices, width = [], 1
    while width * b <= group:
        radices.append(b)
        width *= b
    if width < group:
        radices.append(2 if backend == "iso" and width * 2 == group else b)
    return tuple(radices)


def shuffle_perm(group: int, b: int) -> torch.Tensor:
    """Perfect shuffle of one norm group's (group // b, b) grid of blocks, as `new[i] = old[p[i]]`: each block of the
    next stage takes one coordinate from b consecutive blocks of this one. When b does not divide the group (rotor's
    leftover coordinates, which the stage's blocks do not touch), the shuffled order is then rotated by one position,
    so that the next stage leaves out another coordinate: a fixed trailing slot was never mixed at all."""
    whole = group - group % b
    p = torch.cat([torch.arange(whole).view(whole // b, b).T.flatten(), torch.arange(whole, group)])
    return torch.roll(p, 1) if whole < group else p


# The flattest 3D rotation we know: entries of magnitude 2/3, 2/3, 1/3 in every row and column (all 1/sqrt(3) would
# be a Hadamard matrix of order 3, which does not exist). Rotor stages use it between random signed permutations.
EVEN_ROTATION_3D = torch.tensor([[-2.0, -2.0, 1.0], [2.0, -1.0, 2.0], [-1.0, 2.0, 2.0]], dtype=torch.float64) / 3


def _even_rotor_blocks(gen: torch.Generator, count: int) -> torch.Tensor:
    """[count, 3, 3] rotations S_1 EVEN_ROTATION_3D S_2 with S_1, S_2 random signed permutations (det +1 kept): each
    the sandwich matrix of a rotor, as every 3D rotation is, with EVEN_ROTATION_3D's entry magnitudes."""
    out = torch.empty(count, 3, 3, dtype=torch.float64)
    for i in range(count):
        signs = torch.randint(0, 2, (2, 3), generator=gen).to(torch.float64) * 2 - 1
        rows, cols = torch.randperm(3, generator=gen), torch.randperm(3, generator=gen)
        block = (torch.diag(signs[0]) @ EVEN_ROTATION_3D @ torch.diag(signs[1]))[rows][:, cols]
        out[i] = block if torch.linalg.det(block) > 0 else -block
    return out


def stage_blocks(radix: int, group: int, gen: torch.Generator) -> torch.Tensor:
    """One stage's blocks [group // radix (+1), radix, radix] for one norm group. 2D and 4D blocks have entries of
    equal magnitude (Givens at +-pi/4; left multiplication by a quaternion (+-1 +-i +-j +-k) / 2), random in sign:
    a staged product of them spreads every coordinate evenly over the group, like a randomized Hadamard transform
    (measured better than random angles, QUALITY.md "Staged rotations"). No 3x3 rotation has equal-magnitude
    entries; rotor stages take the flattest one (EVEN_ROTATION_3D) in random signed orientations (measured against
    Haar-random rotors in QUALITY.md); leftover coordinates (g not a multiple of 3) are left out of the stage."""
    if radix == 2:
        signs = torch.randint(0, 2, (group // 2,), generator=gen).to(torch.float64) * 2 - 1
        return givens(signs * (math.pi / 4))
    if radix == 4:
        signs = torch.randint(0, 2, (group // 4, 4), generator=gen).to(torch.float64) * 2 - 1
        return quat_left(signs / 2)
    whole, leftover = divmod(group, 3)
    blocks = _even_rotor_blocks(gen, whole)
    if leftover:
        blocks = torch.cat([blocks, torch.eye(3, dtype=torch.float64)[None]], 0)
    return blocks


def _block_diag(blocks: torch.Tensor, dim: int) -> torch.Tensor:
    """[nb, b, b] -> the [dim, dim] block-diagonal matrix (a padded last block cropped)."""
    return torch.block_diag(*blocks)[:dim, :dim]


def _staged_head(
    backend: str,
    dim: int,
    group: int,
    radices: tuple[int, ...],
    seed: int,
    layer_idx: int,
    head: int,
    kind: str,
    iso_mode: str,
) -> torch.Tensor:
    """One head's staged rotation, folded: [d / g, g, g] float64, block-diagonal over norm groups. The shuffle
    before a stage is the previous stage's (mixed radices: each stage's blocks then span whole blocks of the last)."""
    folded = [torch.eye(group, dtype=torch.float64) for _ in range(dim // group)]
    for stage, radix in enumerate(radices):
        gen = head_generator(seed + STAGE_SEED_STRIDE * stage, layer_idx, head, kind)
        perm = shuffle_perm(group, radices[stage - 1]) if stage else None
        for g in range(dim // group):  # each group its own blocks, drawn in order from the stage's stream
            blocks = _block_diag(stage_blocks(radix, group, gen), group)
            folded[g] = blocks @ (folded[g] if perm is None else folded[g][perm])  # (P M)[i] = M[p[i]]
    return torch.stack(folded)


def _head_blocks(backend: str, dim: int, group: int, gen: torch.Generator, iso_mode: str) -> torch.Tensor:
    if backend == "none":
        return torch.ones(dim, 1, 1, dtype=torch.float64)
    if backend == "planar":
        theta = torch.rand(dim // 2, generator=gen, dtype=torch.float64) * (2 * math.pi)
        return givens(theta)
    if backend == "iso":
        q_left = torch.randn(dim // 4, 4, generator=gen, dtype=torch.float64)
        q_left = q_left / q_left.norm(dim=-1, keepdim=True)
        blocks = quat_left(q_left)
        if iso_mode == "full":
            q_right = torch.randn(dim // 4, 4, generator=gen, dtype=torch.float64)
            q_right = q_right / q_right.norm(dim=-1, keepdim=True)
            blocks = blocks @ quat_right(quat_conj(q_right))
        return blocks
    if backend == "rotor":
        whole, leftover = divmod(dim, 3)
        blocks = rotor_sandwich_matrix(random_rotor(gen, whole))
        if leftover:
            last = torch.eye(3, dtype=torch.float64)
            if leftover == 2:  # the two leftover coordinates get a planar rotation
                last[:2, :2] = givens(torch.rand((), generator=gen, dtype=torch.float64) * (2 * math.pi))
            blocks = torch.cat([blocks, last[None]], 0)
        return blocks
    if backend == "hadamard":
        signs = torch.randint(0, 2, (dim // group, group), generator=gen).to(torch.float64) * 2 - 1
        return hadamard_matrix(group)[None] * signs[:, None, :]
    raise ValueError(f"unknown backend {backend!r}")


def make_rotation(
    backend: str,
    num_heads: int,
    head_dim: int,
    group: int,
    *,
    seed: int,
    layer_idx: int,
    kind: str,
    iso_mode: str = "full",
    stages: int | str = 1,
) -> torch.Tensor:
    """Blocks [H, nb, b, b] (float32) of the backend's rotation for one layer's K or V; with `stages` > 1 or "full"
    the staged rotation folded into [H, d / g, g, g] (module docstring; `iso_mode` does not apply to its 4D blocks,
    which are left multiplications)."""
    if backend in ("planar", "iso") and head_dim % BLOCK_SIZE[backend]:
        raise ValueError(f"backend {backend!r} needs head_dim divisible by {BLOCK_SIZE[backend]}, got {head_dim}")
    if stages == FULL_MIXING and backend not in STAGED_BACKENDS:
        stages = 1  # hadamard / none: no blocks to compose (hadamard already mixes the whole group)
    if stages != 1:
        if backend not in STAGED_BACKENDS:
            raise ValueError(f"rotation_stages={stages!r} needs a block backend {STAGED_BACKENDS}")
        if head_dim % group:
            raise ValueError(f"norm_group={group} must divide head_dim={head_dim}")
        radices = stage_radices(backend, group, stages)
        heads = [
            _staged_head(backend, head_dim, group, radices, seed, layer_idx, h, kind, iso_mode)
            for h in range(num_heads)
        ]
        return torch.stack(heads).to(torch.float32)
    heads = [
        _head_blocks(backend, head_dim, group, head_generator(seed, layer_idx, h, kind), iso_mode)
        for h in range(num_heads)
    ]
    return torch.stack(heads).to(torch.float32)


def rotate(x: torch.Tensor, blocks: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Apply the per-head block-diagonal rotation to x [B, H, T, d] (or its inverse, the transpose)."""
    _, nb, b, _ = blocks.shape
    dim = x.shape[-1]
    if blocks.shape[0] != x.shape[1]:
        raise ValueError(f"rotation has {blocks.shape[0]} heads but the tensor has {x.shape[1]}")
    if nb * b < dim or nb * b - dim >= b:
        raise ValueError(f"rotation blocks {nb}x{b} do not cover head_dim {dim}")
    padded = F.pad(x, (0, nb * b - dim)) if nb * b != dim else x
    xb = padded.unflatten(-1, (nb, b)).to(blocks.dtype)
    equation = "hjki,bhtjk->bhtji" if inverse else "hjik,bhtjk->bhtji"
    return torch.einsum(equation, blocks, xb).flatten(-2)[..., :dim]
