"""Image Transformer 1-D local self-attention (``image_local_1d``).

Parmar, Vaswani, Uszkoreit, Kaiser, Shazeer, Ku, Tran, 2018, *Image
Transformer*, https://arxiv.org/abs/1802.05751 (Section 3.2, "Local
Self-Attention", and its Figure 2). Surveyed by Tay et al., 2020 as a fixed
pattern (FP) with complexity O(N·m), m the memory size. The 2-D variant is
:mod:`effattn.attention.image_local_2d`.

Intuition: an image of H x W pixels is a sequence of N = H W positions in
raster order, far too long for full attention, but a pixel mostly depends on
its neighbourhood. The paper cuts the *queries* into non-overlapping blocks
and gives every query block one shared, larger *memory block* that contains
it; all queries of a block attend to the same memory, so a block is one small
dense attention problem and the cost is O(N m) instead of O(N^2).

1-D local attention: query blocks of ``l_q`` consecutive raster positions; the
memory of block g is the block plus the ``l_m`` positions before it:

    block(i)  = floor(i / l_q)
    memory(g) = { j : g l_q - l_m <= j < (g + 1) l_q }
    S_ij = q_i . k_j / sqrt(d),  P_i = softmax_{j in memory(block(i))}(S_ij),  o_i = sum_j P_ij v_j

Masked (generation) version, ``causal=True``: a query at raster position i
sees a memory position j only if j <= i (earlier in raster order), the
paper's masking of the memory block. Without ``causal`` the same memory is
used unmasked (the paper's super-resolution encoder setting).

Memory size (per query block): ``l_q + l_m`` keys for ``l_q`` queries. Time
and memory O(N m d) with m = l_q + l_m the memory size.

Implementation: by reshapes only, :func:`effattn.nn.blockwise.blockwise_forward`
with a window of ``before = l_m`` positions (not whole blocks, as in
:mod:`effattn.attention.local`). The padding of a last partial block and
masked keys are excluded by the boolean mask of
:func:`effattn.nn.sparse.group_mask`, so the result equals dense attention
masked by :func:`build_pattern`.

Backward: per block the flash-attention derivation of :mod:`effattn.nn.sparse`;
memory gradients are added back onto the positions they were copied from
(the adjoint of the window copy, again basic slices, no ``add.at``).

Conventions next to the well-known implementations:

- tensor2tensor ``masked_local_attention_1d(q, k, v, block_length)`` is the
  1-D masked case with ``l_q = l_m = block_length``;
  ``local_attention_1d(q, k, v, block_length, filter_width)`` (unmasked)
  uses ``filter_width`` positions on *both* sides of the block, where the
  paper's (and our) memory is only the ``l_m`` positions *before* it.
- Channels: the paper models the H x W x 3 channel intensities as separate
  positions. This kernel is channel-agnostic: its positions are raster
  positions, so the paper's sequence is the 3 H W intensities in raster order
  (the channel fastest).

Decoding (:mod:`effattn.nn.decode`, the KV window): query t sees the keys j <= t of its block
g = floor(t / l_q) and the l_m positions before the block, so a key j stays reachable exactly while
j >= floor(t / l_q) l_q - l_m. Before token t the window holds the keys [floor(t / l_q) l_q - l_m, t):
l_m of them at a block border, l_m + l_q - 1 before the block's last token, whatever t is (a
bounded state).
"""
from __future__ import annotations

from ..backend import get_namespace
from ..validate import check_bool, check_int, check_qkv, check_scale
from ..nn.blockwise import band_pattern, blockwise_backward, blockwise_forward, blockwise_weights
from ..nn.decode import window_prefill, window_state, window_step
from ..nn.loops import masked_loop
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register


def _check(block_length, memory_length, causal):
    block_length = check_int("block_length", block_length, minimum=1)
    memory_length = check_int("memory_length", memory_length, minimum=0)
    return block_length, memory_length, check_bool("causal", causal)


@forward_of("image_local_1d")
def forward(q, k, v, *, causal=False, key_mask=None, block_length=128, memory_length=128, scale=None):
    """Image Transformer 1-D local attention on a raster-order sequence.

    q, k (..., N, d), v (..., N, dv); key_mask (..., N) bool; block_length = l_q >= 1
    queries per block; memory_length = l_m >= 0 positions before each block; causal =
    the masked (generation) version. Returns out (..., N, dv) and a BlockwiseCache.
    """
    n, _, d, _ = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    block_length, memory_length, causal = _check(block_length, memory_length, causal)
    scale = check_scale(scale, d)
    return blockwise_forward(q, k, v, block=block_length, before=memory_length, after=0,
                             causal=causal, key_mask=key_mask, scale=scale)


@backward_of("image_local_1d")
def backward(dout, cache):
    """Returns {"q": dq, "k": dk, "v": dv}."""
    return blockwise_backward(dout, cache)


@reads_cache("image_local_1d")
def weights(cache):
    """(..., N, N) matrix of the block softmaxes: out == W @ v."""
    return blockwise_weights(cache)


def build_pattern(n, *, block_length, memory_length, causal=False, xp=None):
    """The paper's 1-D rule as a boolean (N, N) array: query i (block g = i // l_q) sees key j
    iff g l_q - l_m <= j < (g + 1) l_q, and j <= i when causal."""
    n = check_int("n", n, minimum=1)
    block_length, memory_length, causal = _check(block_length, memory_length, causal)
    return band_pattern(n, block_length, memory_length, 0, causal=causal, xp=xp)


@reads_cache("image_local_1d")
def pattern(cache):
    """The support of this call, rebuilt from the rule with the cache's sizes."""
    xp = get_namespace(cache.attend.p)
    return build_pattern(cache.n, block_length=cache.block, memory_length=cache.before, causal=cache.causal, xp=xp)


def loop(q, k, v, *, block_length, memory_length, causal=False, key_mask=None, scale=None):
    """Readable per-query form (teaching and tests only; O(N^2) Python) of one (N, d) head:
    query i sees j iff g l_q - l_m <= j < (g + 1) l_q with g = i // l_q (and j <= i when causal)."""
    def allowed(i, j):
        g = i // block_length
        return g * block_length - memory_length <= j < (g + 1) * block_length and (not causal or j <= i)

    return masked_loop(q, k, v, allowed=allowed, key_mask=key_mask, scale=scale)


def setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """No parameters. l_q = l_m = 128 for long sequences (tensor2tensor's default
    block_length); for short ones l_q ~ n / 8 and l_m = 1.5 l_q, so that memories cross
    block borders at positions that are not block-aligned, padding is exercised, and a decoder's
    window reaches its steady size (l_m + l_q - 1 keys) within the first quarter of the sequence."""
    if n >= 512:
        return {}, {"block_length": 128, "memory_length": 128}
    lq = max(2, n // 8)
    return {}, {"block_length": lq, "memory_length": (3 * lq) // 2}


# --------------------------------------------------------------------------- decoding
def init_state(*, lead, d, dv, dtype="float64", block_length=128, memory_length=128, scale=None):
    """A bounded KV window (:class:`effattn.nn.decode.WindowState`): query i (block
    g = floor(i / l_q)) sees the keys j <= i with j >= g l_q - l_m, so only the keys
    j >= floor(t / l_q) l_q - l_m are kept: before token t, the keys [floor(t / l_q) l_q - l_m, t),
    at most l_m + l_q - 1 keys (with their values and mask bits) per batch element and head,
    whatever t is."""
    block_length, memory_length, _ = _check(block_length, memory_length, True)
    scale = check_scale(scale, d)
    first_key = lambda i: i // block_length * block_length - memory_length  # noqa: E731  block start - l_m
    return window_state(lead=lead, d=d, dv=dv, dtype=dtype, scale=scale,
                        reach=lambda i, pos: (pos <= i) & (pos >= first_key(i)),
                        keep=lambda t, pos: pos >= first_key(t),
                        forward=lambda q, k, v, km: forward(q, k, v, causal=True, key_mask=km, scale=scale,
                                                            block_length=block_length,
                                                            memory_length=memory_length)[0])


prefill = window_prefill
step = window_step


MECHANISM = register(Mechanism(
    name="image_local_1d",
    title="Image Transformer, 1-D local attention",
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
    sizes=("block_length",),
    windows=("block_length", "memory_length"),
    summary="Raster-order query blocks of l_q attend to the block and the l_m positions before it.",
))
