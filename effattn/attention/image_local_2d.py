"""Image Transformer 2-D local self-attention (``image_local_2d``).

Parmar, Vaswani, Uszkoreit, Kaiser, Shazeer, Ku, Tran, 2018, *Image
Transformer*, https://arxiv.org/abs/1802.05751 (Section 3.2, "Local
Self-Attention", and its Figure 2). Surveyed by Tay et al., 2020 as a fixed
pattern (FP) with complexity O(N·m), m the memory size. The 1-D variant is
:mod:`effattn.attention.image_local_1d`.

Intuition: an image of H x W pixels is a sequence of N = H W positions in
raster order, far too long for full attention, but a pixel mostly depends on
its neighbourhood. The paper cuts the *queries* into non-overlapping blocks
and gives every query block one shared, larger *memory block* that contains
it; all queries of a block attend to the same memory, so a block is one small
dense attention problem and the cost is O(N m) instead of O(N^2).

2-D local attention: the image is tiled into query blocks of ``h_q x w_q``
pixels; the memory block extends the query block by ``h_m`` rows above it and
``w_m`` columns to its left and right ("memory flange"):

    query block (R, C) = rows [R h_q, (R+1) h_q) x cols [C w_q, (C+1) w_q)
    memory(R, C)       = rows [R h_q - h_m, (R+1) h_q) x cols [C w_q - w_m, (C+1) w_q + w_m)
    S_ij = q_i . k_j / sqrt(d),  P_i = softmax_{j in memory(block(i))}(S_ij),  o_i = sum_j P_ij v_j

Masked (generation) version, ``causal=True``: a query at raster position i
sees a memory position j only if j <= i (earlier in raster order), the
paper's masking of the memory block. Without ``causal`` the same memory is
used unmasked (the paper's super-resolution encoder setting).

Memory size (per query block): ``(h_q + h_m) (w_q + 2 w_m)`` keys for
``h_q w_q`` queries. Time and memory O(N m d) with m the memory size.

Implementation: by reshapes only (the layouts of :mod:`effattn.nn.image`).
The same window copy as the 1-D case (:func:`effattn.nn.blockwise.block_windows`)
is applied once along the rows (block ``h_q``, ``h_m`` rows before) and once
along the columns (block ``w_q``, ``w_m`` columns on both sides): the memory
rectangle is separable. Queries are tiled by a reshape and a transpose.
Positions outside the image, the padding of a last partial block, and masked
keys are excluded by the boolean mask of :func:`effattn.nn.sparse.group_mask`,
so the result equals dense attention masked by :func:`build_pattern`.

Backward: per block the flash-attention derivation of :mod:`effattn.nn.sparse`;
memory gradients are added back onto the positions they were copied from
(the adjoint of the window copy, again basic slices, no ``add.at``).

Conventions next to the well-known implementations:

- tensor2tensor ``masked_local_attention_2d(q, k, v, query_shape=(h_q, w_q),
  memory_flange=(h_m, w_m))``: same names and meaning as here;
  ``local_attention_2d`` (unmasked) also extends the memory ``h_m`` rows
  *below* the block, where ours keeps the paper's memory (above, left, right)
  and only drops the raster-order mask.
- Channels: the paper models the H x W x 3 channel intensities as separate
  positions. This kernel is channel-agnostic: positions are raster positions
  of an ``image_shape = (H, W)`` grid. To fold channels in as the paper /
  tensor2tensor's 2-D image models do, pass ``image_shape = (H, W * 3)`` (the
  channel becomes the fastest column index) and widen ``w_q``/``w_m``
  accordingly.
- Ragged images: ``image_shape = (H, W)`` may hold a few more cells than N
  (``(H - 1) W < N <= H W``): the trailing cells of the last row are absent
  (never attended, no output). ``setup`` uses this to give any N a near-square
  shape W = ceil(sqrt(N)), H = ceil(N / W)
  (:func:`effattn.nn.image.default_image_shape`).

Decoding (:mod:`effattn.nn.decode`, the KV window, on the fixed ``image_shape``): token t sees the
keys j <= t of its block's memory rectangle. Key j at (r', c') lies in the memories of the query
blocks (R, C) with r' // h_q <= R <= (r' + h_m) // h_q and C up to (c' + w_m) // w_q, so the last
query that can reach it is the last pixel of block (min((r' + h_m) // h_q, last row block),
min((c' + w_m) // w_q, last column block)); the window drops j once t has passed that pixel. Every
key it holds lies in the current row block or the h_m rows above it: at most (h_q + h_m) W keys,
bounded by the image width, not by t. Decoding stops at the H W cells of the image.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

from ..backend import get_namespace
from ..validate import check_bool, check_int, check_qkv, check_scale
from ..nn.image import (default_image_shape, memory_blocks_2d, memory_blocks_2d_backward, positions_2d,
                        query_blocks_2d, query_blocks_2d_backward, raster_coords)
from ..nn.decode import window_prefill, window_state, window_step
from ..nn.loops import masked_loop
from ..nn.sparse import attend_backward, attend_forward, dense_from_groups, group_mask
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register


def _pair(name, value, minimum):
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in value)):
        raise ValueError(f"{name} must be a pair of integers >= {minimum}, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be a pair of integers >= {minimum}, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _check(n, image_shape, query_shape, memory_flange, causal):
    image_shape = _pair("image_shape", image_shape, 1)
    query_shape = _pair("query_shape", query_shape, 1)
    memory_flange = _pair("memory_flange", memory_flange, 0)
    h, w = image_shape
    if not (h - 1) * w < n <= h * w:
        raise ValueError(f"image_shape {image_shape} does not fit N={n} positions: need (H - 1) W < N <= H W "
                         f"(only the last row may be incomplete)")
    return image_shape, query_shape, memory_flange, check_bool("causal", causal)


class Local2DCache(NamedTuple):
    """What backward and weights need."""

    attend: object         # AttendCache: q blocks (..., G, h_q w_q, d), memories (..., G, L, .), P (..., G, h_q w_q, L)
    n: int
    image_shape: tuple     # (H, W)
    query_shape: tuple     # (h_q, w_q)
    memory_flange: tuple   # (h_m, w_m)
    q_pos: object          # (G, h_q w_q) raster positions of the queries (>= N: absent)
    k_pos: object          # (G, L) raster positions of the memory (-1 outside the image)
    causal: bool


@forward_of("image_local_2d")
def forward(q, k, v, *, image_shape, causal=False, key_mask=None, query_shape=(8, 8), memory_flange=(4, 4),
            scale=None):
    """Image Transformer 2-D local attention.

    q, k (..., N, d), v (..., N, dv) in raster order of an image_shape = (H, W) grid
    ((H - 1) W < N <= H W); query_shape = (h_q, w_q) >= 1; memory_flange = (h_m, w_m) >= 0;
    causal = masked (generation) version. Returns out (..., N, dv) and a :class:`Local2DCache`.
    """
    n, _, d, dv = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    image_shape, query_shape, memory_flange, causal = _check(n, image_shape, query_shape, memory_flange, causal)
    scale = check_scale(scale, d)
    xp = get_namespace(q, k, v)
    qb = query_blocks_2d(q, image_shape, query_shape)                          # (..., G, hq wq, d)
    kb = memory_blocks_2d(k, image_shape, query_shape, memory_flange)          # (..., G, L, d)
    vb = memory_blocks_2d(v, image_shape, query_shape, memory_flange)          # (..., G, L, dv)
    q_pos, k_pos = positions_2d(xp, n, image_shape, query_shape, memory_flange)
    allowed = group_mask(q_pos, k_pos, n, n, causal=causal, key_mask=key_mask)  # (..., G, hq wq, L)
    out, _, acache = attend_forward(qb, kb, vb, allowed, scale)                # (..., G, hq wq, dv)
    out = query_blocks_2d_backward(out, n, image_shape, query_shape)           # (..., N, dv)
    return out, Local2DCache(acache, n, image_shape, query_shape, memory_flange, q_pos, k_pos, causal)


@backward_of("image_local_2d")
def backward(dout, cache):
    """Returns {"q": dq, "k": dk, "v": dv}."""
    acache, n, image_shape, query_shape, memory_flange = cache[:5]
    doutb = query_blocks_2d(dout, image_shape, query_shape)                    # (..., G, hq wq, dv)
    g = attend_backward(doutb, acache)
    return {"q": query_blocks_2d_backward(g["q"], n, image_shape, query_shape),
            "k": memory_blocks_2d_backward(g["k"], n, image_shape, query_shape, memory_flange),
            "v": memory_blocks_2d_backward(g["v"], n, image_shape, query_shape, memory_flange)}


@reads_cache("image_local_2d")
def weights(cache):
    """(..., N, N) matrix of the block softmaxes: out == W @ v."""
    xp = get_namespace(cache.attend.p)
    n = cache.n
    return dense_from_groups(cache.attend.p, xp.clip(cache.q_pos, 0, n - 1), xp.clip(cache.k_pos, 0, n - 1), n, n)


def build_pattern(n, *, image_shape, query_shape, memory_flange, causal=False, xp=None):
    """The paper's 2-D rule as a boolean (N, N) array, from pixel coordinates: query i at
    (r, c) in block (R, C) = (r // h_q, c // w_q) sees key j at (r', c') iff
    R h_q - h_m <= r' < (R+1) h_q and C w_q - w_m <= c' < (C+1) w_q + w_m, and j <= i when causal."""
    xp = get_namespace() if xp is None else xp
    n = check_int("n", n, minimum=1)
    (h, w), (hq, wq), (hm, wm), causal = _check(n, image_shape, query_shape, memory_flange, causal)
    i = xp.arange(n)[:, None]
    j = xp.arange(n)[None, :]
    ri, ci = raster_coords(i, (h, w))
    rj, cj = raster_coords(j, (h, w))
    r0 = ri // hq * hq                                                         # first row of i's query block
    c0 = ci // wq * wq                                                         # first column of i's query block
    allowed = (rj >= r0 - hm) & (rj < r0 + hq) & (cj >= c0 - wm) & (cj < c0 + wq + wm)
    if causal:
        allowed = allowed & (j <= i)
    return allowed


@reads_cache("image_local_2d")
def pattern(cache):
    """The support of this call, rebuilt from the rule with the cache's sizes."""
    xp = get_namespace(cache.attend.p)
    return build_pattern(cache.n, image_shape=cache.image_shape, query_shape=cache.query_shape,
                         memory_flange=cache.memory_flange, causal=cache.causal, xp=xp)


def loop(q, k, v, *, image_shape, query_shape=(8, 8), memory_flange=(4, 4), causal=False, key_mask=None,
         scale=None):
    """Readable per-query form (teaching and tests only; O(N^2) Python) of one (N, d) head,
    the rule written for one pair of pixels (r, c) = divmod(i, W), (r', c') = divmod(j, W)."""
    (_, w), (hq, wq), (hm, wm) = image_shape, query_shape, memory_flange

    def allowed(i, j):
        (r, c), (rj, cj) = divmod(i, w), divmod(j, w)
        top, left = (r // hq) * hq, (c // wq) * wq
        return top - hm <= rj < top + hq and left - wm <= cj < left + wq + wm and (not causal or j <= i)

    return masked_loop(q, k, v, allowed=allowed, key_mask=key_mask, scale=scale)


def setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """No parameters. A near-square image (:func:`effattn.nn.image.default_image_shape`); query
    blocks 8 x 8 with a flange of 4 rows / columns for long sequences, 2 x 2 with a flange of 1
    for short ones."""
    small = n < 256
    return {}, {"image_shape": default_image_shape(n), "query_shape": (2, 2) if small else (8, 8),
                "memory_flange": (1, 1) if small else (4, 4)}


# --------------------------------------------------------------------------- decoding
class DecodeRule(NamedTuple):
    """The causal 2-D rule on a fixed image, as the KV window's ``reach`` and ``keep``."""

    image_shape: tuple     # (H, W)
    query_shape: tuple     # (h_q, w_q)
    memory_flange: tuple   # (h_m, w_m)

    def reach(self, i, pos):
        """Keys pos <= i inside the memory rectangle of query i's block."""
        (_, w), (hq, wq), (hm, wm) = self.image_shape, self.query_shape, self.memory_flange
        top, left = i // w // hq * hq, i % w // wq * wq          # first row / column of i's block
        r, c = pos // w, pos % w
        return (pos <= i) & (r >= top - hm) & (r < top + hq) & (c >= left - wm) & (c < left + wq + wm)

    def last_query(self, pos):
        """The last raster position whose block's memory holds key pos: the last pixel of the
        block (R, C) with the largest R and C that reach it."""
        (h, w), (hq, wq), (hm, wm) = self.image_shape, self.query_shape, self.memory_flange
        xp = get_namespace(pos)
        big_r = xp.minimum((pos // w + hm) // hq, (h - 1) // hq)             # the last row block reaching it
        big_c = xp.minimum((pos % w + wm) // wq, (w - 1) // wq)              # the last column block
        return (xp.minimum((big_r + 1) * hq, h) - 1) * w + xp.minimum((big_c + 1) * wq, w) - 1

    def keep(self, t, pos):
        return self.last_query(pos) >= t


def init_state(*, lead, d, dv, dtype="float64", image_shape, query_shape=(8, 8), memory_flange=(4, 4),
               scale=None):
    """A bounded KV window (:class:`effattn.nn.decode.WindowState`) on the fixed ``image_shape``
    (H, W): a key is kept until the last pixel of the last query block whose memory holds it
    (:class:`DecodeRule`): the keys of the current row block and the h_m rows above it, at most
    (h_q + h_m) W keys (with their values and mask bits) per batch element and head, whatever t
    is. A prompt and the tokens after it fill at most the H W cells."""
    image_shape = _pair("image_shape", image_shape, 1)
    _, query_shape, memory_flange, _ = _check(image_shape[0] * image_shape[1], image_shape, query_shape,
                                              memory_flange, True)
    scale = check_scale(scale, d)
    rule = DecodeRule(image_shape, query_shape, memory_flange)

    def prompt_forward(q, k, v, km):
        n = q.shape[-2]
        rows = -(-n // image_shape[1])                      # the prompt's rows: the same blocks as in the image
        return forward(q, k, v, causal=True, key_mask=km, image_shape=(rows, image_shape[1]),
                       query_shape=query_shape, memory_flange=memory_flange, scale=scale)[0]

    return window_state(lead=lead, d=d, dv=dv, dtype=dtype, scale=scale, reach=rule.reach, keep=rule.keep,
                        capacity=image_shape[0] * image_shape[1], forward=prompt_forward)


prefill = window_prefill
step = window_step


MECHANISM = register(Mechanism(
    name="image_local_2d",
    title="Image Transformer, 2-D local attention",
    citation="Parmar et al., 2018",
    url="https://arxiv.org/abs/1802.05751",
    classes=("FP",),
    complexity="O(N·m)",
    causal=True,
    exact=True,
    kind="kernel",
    notebook="01_fixed_patterns",
    forward=forward,
    backward=backward,
    weights=weights,
    setup=setup,
    pattern=pattern,
    init_state=init_state,
    prefill=prefill,
    step=step,
    bounded_state=True,
    sizes=("query_shape", "image_shape"),
    summary="h_q x w_q query blocks attend to a memory extended h_m rows up and w_m columns left and right.",
))
