"""Blockwise local attention — the simplest fixed pattern.

Used as the "local attention" layer of Liu et al., 2018, *Generating Wikipedia
by Summarizing Long Sequences* (https://arxiv.org/abs/1801.10198) and of the
Image Transformer (Parmar et al., 2018, https://arxiv.org/abs/1802.05751);
surveyed as "Blockwise Patterns" / "Local attention" in Tay et al., 2020
(https://arxiv.org/abs/2009.06732), complexity O(N b).

Intuition: most of what a token needs is nearby. Cut the sequence into blocks
of ``b`` positions; every query attends only inside its own block and, with
``look_back = r``, to the ``r`` blocks before it (``look_ahead`` blocks after
it for an encoder). Each block is a small dense attention problem, so the
cost is ``N / b`` problems of size ``b x (r + 1) b``: O(N b) time and memory
instead of O(N^2).

Equations, for query i in block g = floor(i / b):

    window(i) = { j : (g - r) b <= j < (g + 1 + a) b }              r = look_back, a = look_ahead
    S_ij = q_i . k_j / sqrt(d)        for j in window(i)  [and j <= i when causal]
    P_i  = softmax_j(S_ij)            (masked keys: exactly zero weight)
    o_i  = sum_j P_ij v_j

Implementation (:mod:`effattn.nn.blockwise`): queries are reshaped into
(N/b, b, d) blocks; the keys and values of each block's window are
``r + 1 + a`` neighbouring blocks copied by basic slices of a zero-padded,
blocked view; the softmax attention of every block is one batched ``@``
(:func:`effattn.nn.sparse.attend_forward`). No N x N array, no gather or
scatter with fancy indices.

Shapes: q, k (..., N, d), v (..., N, dv) (self-attention: M == N); groups
G = ceil(N / b); windows L = (r + 1 + a) b. N not divisible by b: padded inside
and masked, so the result equals dense attention masked by
:func:`build_pattern`.

Backward (per block, the flash-attention derivation in :mod:`effattn.nn.sparse`):
dV_win = P^T dO, dS = P * (dP - rowsum(dO * O)), dQ = dS K_win / sqrt(d),
dK_win = dS^T Q / sqrt(d); the window gradients are added back onto the
positions they were copied from (each position appears in r + 1 + a windows).

Conventions next to the well-known implementations:

- tensor2tensor ``masked_local_attention_1d(q, k, v, block_length)``: query
  blocks of ``block_length`` attend to their own block and the previous one,
  causally = here ``block=block_length, look_back=1, causal=True``.
  (t2t's unmasked ``local_attention_1d(block_length, filter_width)`` uses a
  window of ``filter_width`` *positions* on each side: that is the Image
  Transformer's 1-D rule, :mod:`effattn.attention.image_local_1d`.)
- lucidrains ``local-attention`` ``LocalAttention(window_size, look_backward=1,
  look_forward=...)``: ``window_size`` = our ``block``, ``look_backward`` = our
  ``look_back``, ``look_forward`` = our ``look_ahead`` (it defaults to 1 when
  not causal; ours defaults to 0 — pass ``look_ahead=look_back`` for a
  symmetric encoder window). Its ``pad_value`` -1 marks the look-around
  blocks beyond either end (our zero-padded, masked windows).
- HuggingFace Longformer's sliding window is *per token* (a band of width
  2w + 1), not per block: see ``longformer`` in notebook 02.

Peer mapping (lucidrains ``local-attention`` 1.11.2, ``LocalAttention`` on q, k, v of
shape (B, H, N, d), no rotary embedding, ``exact_windowsize=False``): window_size = ``block``,
look_backward = ``look_back``, look_forward = ``look_ahead``, causal = ``causal``, its ``mask``
(B, N) = ``key_mask``; out and dq, dk, dv agree to 7e-16 (fixtures
``local__lucidrains_local_attention__*``: non-causal look-ahead 1, causal look-back 2, autopad
with a mask). One difference: ``autopad=True`` *without* a mask pads N up to a multiple of the
window with zero keys and values at valid positions and attends to them (logit 0: they take
softmax weight; 0.16 max difference at N = 14, window 4, in the last two blocks); ours masks them.
Pass the peer a mask (or N a multiple of the window) to match. ``exact_windowsize=True`` (a
per-token band) is not this kernel's rule.

HuggingFace Reformer's ``LocalSelfAttention`` (transformers 5.24) is the same kernel:
``block = local_attn_chunk_length``, ``look_back = local_num_chunks_before``, ``look_ahead =
local_num_chunks_after`` (it divides k by sqrt(d) where we scale the logits: 2e-16 apart), except
that its windows wrap around (chunk 0 looks back at the last chunk): equal when causal (the
wrapped keys are in the future and masked) or when the wrapped chunk is padding (fixtures
``local__hf_reformer__*``, 2e-16); 0.22-0.49 apart when not causal without padding.

Default ``look_back = 1``: with look_back = 0 the first query of every block
sees only itself in the causal case and information never crosses a block
border; one block of look-back (t2t, lucidrains) fixes both at 2x the cost.

Cache: the group AttendCache (block queries, key/value windows, P) and the
layout; memory O(N (r + 1 + a) b). Complexity O(N b d) time (per head).
"""
from __future__ import annotations

from ..backend import get_namespace
from ..validate import check_bool, check_int, check_qkv, check_scale
from ..nn.blockwise import band_pattern, blockwise_backward, blockwise_forward, blockwise_weights
from ..nn.decode import window_prefill, window_state, window_step
from ..nn.loops import masked_loop
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register


def _check_config(block, look_back, look_ahead, causal):
    block = check_int("block", block, minimum=1)
    look_back = check_int("look_back", look_back, minimum=0)
    look_ahead = check_int("look_ahead", look_ahead, minimum=0)
    causal = check_bool("causal", causal)
    if causal and look_ahead:
        raise ValueError(f"look_ahead must be 0 when causal=True (blocks ahead are all in the future), got {look_ahead}")
    return block, look_back, look_ahead, causal


@forward_of("local")
def forward(q, k, v, *, causal=False, key_mask=None, block=64, look_back=1, look_ahead=0, scale=None):
    """Blockwise local attention.

    q, k (..., N, d), v (..., N, dv); key_mask (..., N) bool (True = real token);
    block b >= 1; look_back r >= 0 and look_ahead a >= 0 whole blocks
    (a must be 0 when causal); scale defaults to d ** -0.5.
    Returns out (..., N, dv) and a :class:`effattn.nn.blockwise.BlockwiseCache`.
    """
    n, _, d, _ = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    block, look_back, look_ahead, causal = _check_config(block, look_back, look_ahead, causal)
    scale = check_scale(scale, d)
    return blockwise_forward(q, k, v, block=block, before=look_back * block, after=look_ahead * block,
                             causal=causal, key_mask=key_mask, scale=scale)


@backward_of("local")
def backward(dout, cache):
    """Returns {"q": dq, "k": dk, "v": dv}."""
    return blockwise_backward(dout, cache)


@reads_cache("local")
def weights(cache):
    """The (..., N, N) matrix of the block softmaxes: out == W @ v."""
    return blockwise_weights(cache)


def build_pattern(n, *, block, look_back=1, look_ahead=0, causal=False, xp=None):
    """The paper's rule as a boolean (N, N) array: query i (block g = i // b) may attend
    key j iff (g - look_back) b <= j < (g + 1 + look_ahead) b, and j <= i when causal."""
    n = check_int("n", n, minimum=1)
    block, look_back, look_ahead, causal = _check_config(block, look_back, look_ahead, causal)
    return band_pattern(n, block, look_back * block, look_ahead * block, causal=causal, xp=xp)


@reads_cache("local")
def pattern(cache):
    """The support of this call, rebuilt from the rule with the cache's sizes."""
    xp = get_namespace(cache.attend.p)
    b = cache.block
    return build_pattern(cache.n, block=b, look_back=cache.before // b, look_ahead=cache.after // b,
                         causal=cache.causal, xp=xp)


def loop(q, k, v, *, block, look_back=1, look_ahead=0, causal=False, key_mask=None, scale=None):
    """Readable per-query reference (teaching and tests only; O(N^2) Python loop).

    For each query i: collect the allowed keys by the rule, softmax, weighted sum
    (:func:`effattn.nn.loops.masked_loop`). Works on one (N, d) head: q, k (N, d),
    v (N, dv), key_mask (N,) or None.
    """
    def allowed(i, j):
        g = i // block
        return (g - look_back) * block <= j < (g + 1 + look_ahead) * block and (not causal or j <= i)

    return masked_loop(q, k, v, allowed=allowed, key_mask=key_mask, scale=scale)


def setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """No parameters. Block 128 for long sequences (the issue's benchmark setting), else
    about n / 4 (at least 2) so that short test sequences have several blocks and padding."""
    block = 128 if n >= 512 else max(2, n // 4)
    return {}, {"block": block, "look_back": 1}


# --------------------------------------------------------------------------- decoding
def init_state(*, lead, d, dv, dtype="float64", block=64, look_back=1, look_ahead=0, scale=None):
    """A bounded KV window (:class:`effattn.nn.decode.WindowState`): query i sees its own block
    up to i and the ``look_back`` blocks before, so only positions j with
    floor(j / b) >= floor(t / b) - r are kept: at most (r + 1) b keys, whatever t is."""
    block, look_back, look_ahead, _ = _check_config(block, look_back, look_ahead, True)
    scale = check_scale(scale, d)
    first_block = lambda i: i // block - look_back  # noqa: E731  the earliest block query i reaches
    return window_state(lead=lead, d=d, dv=dv, dtype=dtype, scale=scale,
                        reach=lambda i, pos: (pos <= i) & (pos // block >= first_block(i)),
                        keep=lambda t, pos: pos // block >= first_block(t),
                        forward=lambda q, k, v, km: forward(q, k, v, causal=True, key_mask=km, block=block,
                                                            look_back=look_back, scale=scale)[0])


prefill = window_prefill
step = window_step


MECHANISM = register(Mechanism(
    name="local",
    title="Blockwise local attention",
    citation="Liu et al., 2018; Parmar et al., 2018",
    url="https://arxiv.org/abs/1801.10198",
    classes=("FP",),
    complexity="O(N·b)",
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
    sizes=("block",),
    windows=("block", "look_back", "look_ahead"),
    summary="Queries attend within their block of b positions and look_back previous blocks.",
))
