"""BigBird: block-sparse attention = sliding window + global blocks + random blocks.

Zaheer, Guruganesh, Dubey, Ainslie, Alberti, Ontanon, Pham, Ravula, Wang, Yang, Ahmed, 2020,
*Big Bird: Transformers for Longer Sequences*, https://arxiv.org/abs/2007.14062

Intuition: view attention as a graph on the tokens. A sliding window alone
(a ring lattice) has a long diameter; a few random edges make it a
small-world graph (short paths between any two tokens, like an Erdos-Renyi
graph); a few global tokens make every pair two hops apart. BigBird keeps
all three — and shows that with the global tokens the sparse model is still
a universal approximator and Turing complete.

Rule, on blocks of b tokens (block c = positions cb .. cb + b - 1; n_b blocks):

    query block c global          -> every key                     (ITC: global *existing* blocks)
    every query block             -> the global key blocks
    query block c (not global)    -> blocks c - 1, c, c + 1         (the window of 3 blocks)
                                  -> blocks random_blocks[c, 0..r-1] (r random blocks)

A key block listed twice (a random block that is also in the window or
global, a window block that is global, a repeated random entry) counts once:
the ``allowed`` mask drops the duplicate, so the result is exactly dense
attention masked by the union pattern.

Global blocks: ``global_blocks`` = g (the first g blocks, BigBird-ITC with
existing tokens made global) or an explicit tuple of block indices.
BigBird-ETC (extra global tokens prepended to the input) is the same kernel
applied to the sequence [globals, input] with ``global_blocks`` covering the
prepended tokens (see :mod:`effattn.attention.etc` for the ETC construction).

Random layout: an explicit argument ``random_blocks``, int (n_b, r) shared
or (H, n_b, r) one per head; -1 = no block; rows of global query blocks are
ignored. :func:`draw_random_blocks` draws it on the host, excluding the
window and the global blocks. HuggingFace's ``BigBirdBlockSparseAttention``
makes the FIRST and LAST block global and draws ``rand_attn`` of shape
(H, n_b - 2, r) with ``_bigbird_block_rand_mask`` (row i - 1 = query block i,
excluding blocks i - 1, i, i + 1 and the first/last blocks); with
:func:`from_huggingface` that maps to ``global_blocks=(0, n_b - 1)`` and
``random_blocks[:, 1:-1] = rand_attn``.

causal=True raises ValueError: BigBird (as in the paper's encoder) lets
global blocks read everything and random blocks point anywhere, i.e. into
the future.

N not a multiple of b: padded inside to n_b b positions and masked.

Shapes: q, k (..., N, d), v (..., N, dv), key_mask (..., N) bool, out (..., N, dv).
Each query block gathers K_c = (g + 3 + r) b keys: (..., n_b, K_c, d); the global
key blocks and the dense global rows are :mod:`effattn.nn.global_tokens` (shared
with Longformer and ETC).

Complexity: O(N b (3 + g + r) d) for the blocks plus O(g b N d) for the
global rows: O(N) for fixed b, g, r — the survey's O(N).

Backward: :func:`effattn.nn.sparse.attend_backward` per block (dV = P^T dO,
dS = P (dP - rowsum(dO O)), dQ = scale dS K, dK = scale dS^T Q); the key
gradients go back by slice additions (window), a sum over query blocks
(global key blocks) and a scatter-add over the random block indices
(``scatter_rows``, the only ``add.at``: O(N r d)).

Peer mapping (HuggingFace transformers 5.24.0,
``transformers.models.big_bird.modeling_big_bird.BigBirdBlockSparseAttention``; fixtures
``tests/parity/fixtures/bigbird__hf_big_bird__*``): ``block = config.block_size``; its
train-mode ``rand_attn`` (H, n_b - 2, r) through :func:`from_huggingface` gives
``random_blocks`` (H, n_b, r) and ``global_blocks = (0, n_b - 1)``; q, k, v are its per-head
projections, out its context layer before the output projection; N is padded to a multiple of
b as ``BigBirdModel._pad_to_block_size`` does. Its draws never repeat a block or hit the window
or a global block (checked for n_b 10 to 16, r 1 to 3), so its concatenated key list is the
union here. Its additive -10000 on masked keys gives them exactly zero weight in float64. Out and
gradients agree to 4.4e-16. One difference: HF multiplies the output by ``from_mask``, so the rows
of masked queries are 0. Here a masked query attends like any other (up to 0.64 on those rows in
the ``padding`` fixture; the real rows, and the gradients with dout 0 on the masked rows, agree to
4.4e-16). A repeated random block would count twice in HF's softmax and once here.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

from ..backend import asarray, get_namespace
from ..validate import check_causal, check_int, check_qkv, check_scale
from ..nn.blockwise import neighbour_blocks, neighbour_blocks_backward
from ..nn.global_tokens import global_keys, global_keys_backward, global_rows_forward, index_set, membership
from ..nn.sparse import attend_backward, attend_forward, dense_from_groups, gather_rows, group_mask, pad_axis, scatter_rows
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register

WHY_NOT_CAUSAL = ("BigBird's global blocks attend to every token and its random blocks point anywhere "
                  "(into the future); the paper's BigBird is an encoder")


# --------------------------------------------------------------------------- layout
def _global_blocks(global_blocks, nb):
    if isinstance(global_blocks, numbers.Integral) and not isinstance(global_blocks, bool):
        g = check_int("global_blocks", global_blocks, minimum=0)
        return tuple(range(min(g, nb)))
    return index_set("global_blocks", global_blocks, nb, expected="an int g (the first g blocks) or block indices",
                     bound="n_blocks")


def _random_blocks(random_blocks, nb, q, xp):
    r = xp.asarray(random_blocks)
    if r.dtype.kind not in "iu" or r.ndim not in (2, 3):
        raise ValueError(f"random_blocks must be an int array (n_blocks, r) or (H, n_blocks, r), "
                         f"got {getattr(r, 'dtype', '?')} shape {tuple(r.shape)}")
    if r.shape[-2] != nb:
        raise ValueError(f"random_blocks must have n_blocks = ceil(N / block) = {nb} rows, got shape {tuple(r.shape)}")
    if r.ndim == 3 and (q.ndim < 3 or q.shape[-3] != r.shape[0]):
        raise ValueError(f"random_blocks has {r.shape[0]} heads but q has shape {tuple(q.shape)} (heads on axis -3)")
    if r.size and (int(r.min()) < -1 or int(r.max()) >= nb):
        raise ValueError(f"random_blocks entries must lie in [-1, n_blocks={nb}), got [{int(r.min())}, {int(r.max())}]")
    return r.astype(xp.int64)


def block_slots(nb, gbl, rand, xp):
    """Key blocks of every query block and which of them count.

    Returns kblk (.., n_b, g + 3 + r) block indices [globals, c-1, c, c+1, random] and
    valid (.., n_b, g + 3 + r) bool: the slot is a real block seen for the first time."""
    g = len(gbl)
    c = xp.arange(nb)[:, None]                                        # (n_b, 1)
    is_g = membership(gbl, nb + 2, xp)                                # index -1 and n_b never global
    gidx = xp.asarray(gbl, dtype=xp.int64)
    lead = rand.shape[:-2]
    win = c + xp.arange(-1, 2)[None, :]                               # (n_b, 3)
    win_ok = (win >= 0) & (win < nb) & ~is_g[win]                     # a global block comes from the global slots
    rnd_ok = (rand >= 0) & (abs(rand - c) > 1) & ~is_g[rand]          # (.., n_b, r)
    r = rand.shape[-1]
    for a in range(1, r):                                             # a repeated random block counts once
        rnd_ok[..., a] &= ~(rand[..., :a] == rand[..., a:a + 1]).any(axis=-1)
    kblk = xp.concatenate([xp.broadcast_to(gidx, lead + (nb, g)), xp.broadcast_to(win, lead + (nb, 3)), rand], axis=-1)
    valid = xp.concatenate([xp.ones(lead + (nb, g), dtype=bool), xp.broadcast_to(win_ok, lead + (nb, 3)), rnd_ok], axis=-1)
    return kblk, valid


class BigBirdCache(NamedTuple):
    band: object      # AttendCache of the non-global query blocks (..., n_b, b, (g+3+r) b)
    glob: object      # AttendCache of the global query rows (..., g b, N), or None
    kblk: object      # (.., n_b, g + 3 + r) key block of each slot
    rand: object      # (.., n_b, r) random blocks as given (-1 = none)
    gbl: tuple        # global block indices
    n: int
    b: int
    lead: tuple


@forward_of("bigbird")
def forward(q, k, v, *, block, random_blocks, global_blocks=1, causal=False, key_mask=None, scale=None):
    """BigBird block-sparse attention.

    q, k (..., N, d), v (..., N, dv); block b >= 1; random_blocks int (n_b, r) or (H, n_b, r)
    (-1 = none); global_blocks int g (first g blocks) or block indices; key_mask (..., N).
    Returns out (..., N, dv), cache.
    """
    n, _, d, dv = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    check_causal(causal, False, WHY_NOT_CAUSAL)
    b = check_int("block", block)
    scale = check_scale(scale, d)
    xp = get_namespace(q, k, v)
    nb = -(-n // b)
    npad = nb * b
    gbl = _global_blocks(global_blocks, nb)
    g = len(gbl)
    rand = _random_blocks(random_blocks, nb, q, xp)
    r = rand.shape[-1]
    lead = tuple(q.shape[:-2])
    kblk, valid = block_slots(nb, gbl, rand, xp)                                       # (.., n_b, g + 3 + r)
    rand_c = xp.clip(rand, 0, nb - 1)
    gidx = xp.asarray(gbl, dtype=xp.int64)

    qb = pad_axis(q, npad).reshape(lead + (nb, b, d))                                  # (..., n_b, b, d)

    def keys(x):                                                                       # (..., N, f) -> (..., n_b, K_c, f)
        f = x.shape[-1]
        xb = pad_axis(x, npad).reshape(lead + (nb, b, f))                              # (..., n_b, b, f)
        parts = [global_keys(xb[..., gidx, :, :].reshape(lead + (g * b, f)), nb),    # globals
                 neighbour_blocks(xb, 1, 1)]                                           # window
        if r:
            flat = xb.reshape(lead + (nb, b * f))
            rb = flat[..., rand_c, :] if rand_c.ndim == 2 else gather_rows(flat, rand_c)   # (..., n_b, r, b f)
            parts.append(rb.reshape(lead + (nb, r * b, f)))                            # random blocks
        return xp.concatenate(parts, axis=-2)

    kb, vb = keys(k), keys(v)                                                          # (..., n_b, (g+3+r) b, d|dv)
    qpos = xp.arange(npad).reshape(nb, b)                                              # (n_b, b)
    kpos = (kblk[..., None] * b + xp.arange(b)).reshape(kblk.shape[:-1] + (-1,))      # (.., n_b, K_c)
    is_gq = membership(gbl, nb, xp)
    allowed = group_mask(qpos, kpos, n, n, key_mask=key_mask)                         # real query & key, key_mask
    allowed = allowed & xp.repeat(valid, b, axis=-1)[..., None, :] & ~is_gq[:, None, None]
    ob, _, band_cache = attend_forward(qb, kb, vb, allowed, scale)                   # (..., n_b, b, dv)

    glob_cache = None
    if g:
        gq = (gidx[:, None] * b + xp.arange(b)).reshape(-1)                           # (g b,) positions of global rows
        allowed_g = (gq < n)[:, None]                                                 # padding rows see nothing
        og, _, glob_cache = global_rows_forward(qb[..., gidx, :, :].reshape(lead + (g * b, d)), k, v, allowed_g,
                                                key_mask=key_mask, scale=scale)
        ob = ob.copy()
        ob[..., gidx, :, :] = og.reshape(lead + (g, b, dv))                           # global rows: dense attention
    out = ob.reshape(lead + (npad, dv))[..., :n, :]
    return out, BigBirdCache(band_cache, glob_cache, kblk, rand, gbl, n, b, lead)


@backward_of("bigbird")
def backward(dout, cache):
    """Gradients {"q", "k", "v"}."""
    band, glob, kblk, rand, gbl, n, b, lead = cache
    xp = get_namespace(dout)
    nb = kblk.shape[-2]
    rand_c = xp.clip(rand, 0, nb - 1)                                      # -1 slots have P = 0: any index will do
    g, r = len(gbl), rand_c.shape[-1]
    npad = nb * b
    d, dv = band.q.shape[-1], dout.shape[-1]
    gidx = xp.asarray(gbl, dtype=xp.int64)
    dob = pad_axis(dout, npad).reshape(lead + (nb, b, dv))
    gr = attend_backward(dob, band)

    def key_grad(gk, f):                                                   # (..., n_b, K_c, f) -> (..., n_b, b, f)
        acc = neighbour_blocks_backward(gk[..., g * b:(g + 3) * b, :], 1, 1)          # window: slice additions
        if g:
            acc[..., gidx, :, :] += global_keys_backward(gk[..., :g * b, :]).reshape(lead + (g, b, f))   # globals: sum over blocks
        if r:
            rnd = gk[..., (g + 3) * b:, :].reshape(lead + (nb, r, b * f))
            acc += scatter_rows(rnd, rand_c, nb).reshape(lead + (nb, b, f))          # random: scatter-add
        return acc

    dq = gr["q"]                                                                        # (..., n_b, b, d)
    dk = key_grad(gr["k"], d).reshape(lead + (npad, d))[..., :n, :]
    dv_ = key_grad(gr["v"], dv).reshape(lead + (npad, dv))[..., :n, :]
    if glob is not None:
        gg = attend_backward(dob[..., gidx, :, :].reshape(lead + (g * b, dv)), glob)
        dq[..., gidx, :, :] += gg["q"].reshape(lead + (g, b, d))
        dk = dk + gg["k"]
        dv_ = dv_ + gg["v"]
    return {"q": dq.reshape(lead + (npad, d))[..., :n, :], "k": dk, "v": dv_}


@reads_cache("bigbird")
def weights(cache):
    """The (..., N, N) attention matrix: out == W @ v."""
    band, glob, kblk, rand, gbl, n, b, lead = cache
    xp = get_namespace(band.p)
    nb = kblk.shape[-2]
    npad = nb * b
    qpos = xp.arange(npad).reshape(nb, b)
    kpos = (kblk[..., None] * b + xp.arange(b)).reshape(kblk.shape[:-1] + (-1,))
    kpos = xp.where((kpos >= 0) & (kpos < npad), kpos, npad)          # out-of-range slots have P = 0
    wm = dense_from_groups(band.p, qpos, kpos, npad + 1, npad + 1)[..., :n, :n]
    if glob is not None:
        gq = (xp.asarray(gbl, dtype=xp.int64)[:, None] * b + xp.arange(b)).reshape(-1)
        keep = gq < n
        wm[..., gq[keep], :] = glob.p[..., keep, :]
    return wm


def build_pattern(n, *, block, random_blocks, global_blocks=1, causal=False, xp=None):
    """The rule as a boolean (.., N, N) matrix (one per head for a per-head layout); causal=True
    raises (:data:`WHY_NOT_CAUSAL`). ``xp`` defaults to the array module of ``random_blocks``."""
    check_causal(causal, False, WHY_NOT_CAUSAL)
    xp = get_namespace(random_blocks) if xp is None else xp
    b = block
    nb = -(-n // b)
    rand = xp.asarray(random_blocks)
    gbl = _global_blocks(global_blocks, nb)
    c = xp.arange(nb)
    is_g = membership(gbl, nb, xp)
    blocks = (abs(c[:, None] - c[None, :]) <= 1) | is_g[:, None] | is_g[None, :]          # window + global
    blocks = blocks | (rand[..., None] == c).any(axis=-2)                                 # + random (-1 never matches)
    full = xp.repeat(xp.repeat(blocks, b, axis=-2), b, axis=-1)                           # token level
    return full[..., :n, :n]


@reads_cache("bigbird")
def pattern(cache):
    """Support of W from the layout: window, global rows and columns, random blocks."""
    band, glob, kblk, rand, gbl, n, b, lead = cache
    return build_pattern(n, block=b, random_blocks=rand, global_blocks=gbl, xp=get_namespace(band.p))


# --------------------------------------------------------------------------- random layout
def draw_random_blocks(rng, n_blocks, r, global_blocks=1, heads=None):
    """Random key blocks for every query block: int (n_blocks, r), or (heads, n_blocks, r).

    For query block c, r distinct blocks drawn uniformly without replacement
    from those that are neither in the window {c-1, c, c+1} nor global; fewer
    candidates than r leave -1 (no block); rows of global blocks are -1.
    Drawn on the host with the numpy Generator ``rng`` (same seed, same layout)."""
    n_blocks = check_int("n_blocks", n_blocks)
    r = check_int("r", r, minimum=0)
    gset = set(_global_blocks(global_blocks, n_blocks))
    h = 1 if heads is None else check_int("heads", heads)
    out = rng.integers(-1, 0, size=(h, n_blocks, r))          # a host int64 array of -1 (the Generator's own)
    for head in range(h):
        for c in range(n_blocks):
            if c in gset:
                continue
            cand = [j for j in range(n_blocks) if abs(j - c) > 1 and j not in gset]
            take = min(r, len(cand))
            if take:
                out[head, c, :take] = rng.choice(cand, size=take, replace=False)
    return out[0] if heads is None else out


def from_huggingface(rand_attn, n_blocks):
    """HuggingFace's ``rand_attn`` (H, n_b - 2, r) (row i - 1 = query block i) ->
    (random_blocks (H, n_b, r), global_blocks (0, n_b - 1)) for this module."""
    xp = get_namespace(rand_attn)
    h, rows, r = rand_attn.shape
    if rows != n_blocks - 2:
        raise ValueError(f"rand_attn must have n_blocks - 2 = {n_blocks - 2} rows, got shape {tuple(rand_attn.shape)}")
    out = xp.full((h, n_blocks, r), -1, dtype=xp.int64)
    out[:, 1:-1, :] = rand_attn
    return out, (0, n_blocks - 1)


# --------------------------------------------------------------------------- setup
def default_sizes(n):
    """b = 3, g = 1, r = 2 below N = 64 (padding exercised); b = 16, g = 1, r = 2 below 1024;
    b = 32, g = 2, r = 3 from 1024 (the paper's BigBird-ITC base uses b = 64: 512 keys per query,
    which at N = 2048 is a quarter of full attention's memory; b = 32 keeps 256)."""
    if n < 64:
        return 3, 1, 2
    if n < 1024:
        return 16, 1, 2
    return 32, 2, 3


def setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """No parameters; config: block, global_blocks and a random layout per head (H, n_b, r)."""
    check_causal(causal, False, WHY_NOT_CAUSAL)
    b, g, r = default_sizes(n)
    nb = -(-n // b)
    rand = draw_random_blocks(rng, nb, r, g, heads=heads)
    return {}, {"block": b, "global_blocks": g, "random_blocks": asarray(rand)}


MECHANISM = register(Mechanism(
    name="bigbird",
    title="BigBird",
    citation="Zaheer et al., 2020",
    url="https://arxiv.org/abs/2007.14062",
    classes=("FP", "M"),
    complexity="O(N)",
    causal=False,
    exact=True,
    kind="kernel",
    notebook="02_combination_of_patterns",
    forward=forward,
    backward=backward,
    weights=weights,
    setup=setup,
    pattern=pattern,
    sizes=("block",),
    summary="Block-sparse: a window of 3 blocks + global blocks (ITC) + r random blocks per query block "
            "(explicit layout, one per head).",
))
