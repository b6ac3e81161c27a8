"""Sparse Transformer, fixed factorized attention (``sparse_fixed``).

Child, Gray, Radford, Sutskever, 2019, *Generating Long Sequences with Sparse
Transformers*, https://arxiv.org/abs/1904.10509 (Section 4.2, "fixed
attention"). The other pattern of the paper is :mod:`effattn.attention.sparse_strided`;
what the two share (the combine modes, the head slicing, the receptive field)
is :mod:`effattn.nn.factorized`.

Intuition. Full attention lets every position look at every earlier one. The
Sparse Transformer splits that job between two cheap patterns A(1), A(2) so
that any position reaches any earlier one in TWO hops: with l ~ sqrt(N), each
query looks at O(sqrt N) keys per pattern, so one layer costs O(N sqrt N), and
two stacked layers (or two heads, or one merged pattern) still connect
everything (see :func:`effattn.nn.factorized.receptive_field`: own block ->
summary cell -> that cell's block). The fixed pattern suits data without a
period (text).

Pattern (query i, key j; l = ``block``, c = ``summary``):

    A(1)_i = {j : floor(j / l) = floor(i / l)}     "my own block of l"
    A(2)_i = {j : j mod l in {l - c, ..., l - 1}}  "the last c cells of every block":
                                                     summary columns every later cell reads
    causal: both intersected with j <= i. Non-causal: exactly the sets above
    (the whole own block and the summary cells of every block, earlier and
    later) — the paper's bidirectional use, and DeepSpeed's
    ``FixedSparsityConfig(attention="bidirectional")`` without its optional
    ``horizontal_global_attention``.

Conventions, next to the well-known implementations:

* ``block`` = l positions, ``summary`` = c positions (the paper's c; it
  writes {t, ..., l} with t = l - c, i.e. the last c residues).
  OpenAI's ``attn_mode="fixed"`` counts in blocks of ``blocksize`` tokens:
  ``local_attn_ctx`` = l (tokens), ``vertsize`` = c / blocksize, the summary
  blocks taken from the END of each window, and token-level causality; with
  ``num_verts=1`` it is this pattern. DeepSpeed's ``FixedSparsityConfig``:
  ``num_local_blocks`` = l / block, ``num_global_blocks`` = c / block, global
  columns at the end of each local window as here; its "unidirectional"
  layout is causal only at block granularity (the diagonal block is dense;
  a causal mask is applied separately), ours token by token (exactly
  j <= i); for a short last window it moves the global block inside it,
  whereas here the residue rule is kept (a short last block may have no
  summary cell). Not implemented: the paper's per-head choice of WHICH c
  residues summarise a block (OpenAI ``num_verts`` > 1, DeepSpeed
  ``num_different_global_patterns`` > 1).
* ``combine`` = ``"merged"`` (one softmax over A(1) ∪ A(2), the default),
  ``"heads"`` (even heads A(1), odd heads A(2)) or ``"layers"`` (this call
  uses A(``part``) only): the paper's three ways, :mod:`effattn.nn.factorized`.

Implementation, block-sparse, never an N x N array. The sequence is padded
to Np = G l and viewed as a G x l grid (position i = g l + r: block g, residue
r). Each part runs in the layout where it is dense, with
:func:`effattn.nn.sparse.attend_forward`, and the merged pattern combines the
parts under one softmax through their log-sum-exps (:mod:`effattn.nn.union`):

    A(1): groups = rows, keys = the same row: (G, l) x (G, l)
    A(2): groups = rows, keys = the G c summary positions, one shared list

In the merged pattern the overlap A(1) ∩ A(2) (the summary cells of the own
block) is removed from the second part, so no key counts twice. Cost with
l ~ sqrt(N): O(N (l + c N/l) d): O(N sqrt N) for a constant c. ``setup`` picks
l = the power of two nearest sqrt(N) (:func:`effattn.nn.factorized.default_stride`)
and c = max(1, min(4, l // 4)) (:func:`default_summary`; the paper used
l = 128, c in {8, 16, 32}; a c growing with l would make the summary part
quadratic).

Backward: the union backward of :mod:`effattn.nn.union` (flash-attention
dS = P * (dP - rowsum(dO * O)), plus the log-sum-exp terms of the merge).

Cache: :class:`effattn.nn.factorized.FactorizedCache` (the union caches of the
one or two head slices, and the sizes that ``pattern`` needs).

Decoding (:mod:`effattn.nn.decode`, the KV window): token t sees the keys j <= t of its own block
(A(1)) and the summary cells j mod l >= l - c (A(2)). A key of an earlier block that is not a
summary cell is never seen again, so the window keeps the current block up to t and every summary
cell: (t mod l) + c floor(t / l) keys at position t ("merged"; also "heads" with an odd head,
"layers" with part 2 alone keeps only the c floor(t / l) + max(0, t mod l - (l - c)) summary
cells). The state grows as c t / l, a factor l / c below the KV cache of ``full``; with A(1)
alone ("layers", part 1) it is the current block, at most l - 1 keys (bounded). The block
must be given: its default depends on the sequence length N.
"""
from __future__ import annotations

from ..backend import get_namespace
from ..validate import check_bool, check_choice, check_int, check_qkv, check_scale
from ..nn.decode import window_prefill, window_state, window_step
from ..nn.factorized import (COMBINE, combine_decode_rule, default_stride, factorized_backward, factorized_forward,
                             factorized_pattern, factorized_weights, position_grid, rule_mask)
from ..nn.union import Part
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register


def default_summary(block):
    """c = max(1, min(4, l // 4)): a constant number of summary cells per block once l >= 16,
    so the summary keys number c N / l = O(sqrt N) and the cost stays O(N sqrt N)."""
    return max(1, min(4, block // 4))


def _check_summary(block, summary):
    summary = check_int("summary", summary)
    if summary > block:
        raise ValueError(f"summary must be <= block ({block}), got {summary}")
    return summary


def _clip_to_sequence(n, block, summary):
    """A block longer than the sequence holds every position, and the summary cells that exist
    are [s0, N) with s0 = min(max(l - c, 0), N). Blocks of l' = N + 1 with c' = N + 1 - s0 give
    the same A(1) and A(2), so a huge block never allocates more than N + 1 rows."""
    if block <= n + 1:
        return block, summary
    s0 = min(max(block - summary, 0), n)
    return n + 1, n + 1 - s0


def build_pattern(n, *, block, summary, causal=False, part=None, xp=None):
    """The fixed pattern from the paper's rule: bool (n, n).

    A(1): floor(j / l) = floor(i / l); A(2): j mod l >= l - c; causal: and j <= i.
    part = 1, 2 or None (A(1) ∪ A(2)).
    """
    xp = get_namespace() if xp is None else xp
    n = check_int("n", n)
    block = check_int("block", block)
    summary = _check_summary(block, summary)
    causal = check_bool("causal", causal)
    part = check_choice("part", part, (1, 2, None))
    i = xp.arange(n)[:, None]
    j = xp.arange(n)[None, :]
    a1 = (j // block) == (i // block)              # same block of l
    a2 = xp.broadcast_to((j % block) >= block - summary, (n, n))  # summary columns
    allowed = {1: a1, 2: a2, None: a1 | a2}[part]
    if causal:
        allowed = allowed & (j <= i)
    return allowed


def _part(n, block, summary, which, *, causal, exclude_overlap=False, xp=None):
    """The :class:`Part` layout of A(which) (see the module docstring)."""
    xp = get_namespace() if xp is None else xp
    pos = position_grid(n, block, xp)                                   # (G, l)
    if which == 1:
        ok, _, _ = rule_mask(pos, pos, n, causal)                       # own block
        return Part(pos, pos, ok, "fixed A1 (own block)")
    kpos = pos[:, block - summary:].reshape(1, -1)                      # (1, G c): the summary cells
    ok, i, j = rule_mask(pos, kpos, n, causal)                          # (G, l, G c)
    if exclude_overlap:
        ok = ok & ((j // block) != (i // block))                        # own block's cells are in A(1)
    return Part(pos, kpos, ok, "fixed A2 (summary columns)")


@forward_of("sparse_fixed")
def forward(q, k, v, *, causal=False, key_mask=None, block=None, summary=None, combine="merged", part=1,
            scale=None):
    """Sparse Transformer fixed attention.

    q, k, v (..., N, d) / (..., N, dv) (self-attention: same length);
    block: l (default :func:`effattn.nn.factorized.default_stride`, ~sqrt N); summary: c,
    the summary cells at the end of each block (1 <= c <= l; default :func:`default_summary`);
    combine: "merged" | "heads" | "layers"; part: 1 or 2 (which pattern, for combine="layers");
    key_mask (..., N) bool. Returns out (..., N, dv) and a
    :class:`effattn.nn.factorized.FactorizedCache`.
    """
    n = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)[0]
    block = default_stride(n) if block is None else check_int("block", block)
    summary = default_summary(block) if summary is None else _check_summary(block, summary)
    block, summary = _clip_to_sequence(n, block, summary)

    def make(which, causal_, exclude, xp):
        return _part(n, block, summary, which, causal=causal_, exclude_overlap=exclude, xp=xp)

    return factorized_forward(q, k, v, make, sizes=(block, summary), causal=causal, key_mask=key_mask,
                              combine=combine, part=part, scale=scale)


@backward_of("sparse_fixed")
def backward(dout, cache):
    """Gradients {"q": dq, "k": dk, "v": dv} (the union backward of each head slice)."""
    return factorized_backward(dout, cache)


@reads_cache("sparse_fixed")
def weights(cache):
    """The effective attention matrix (..., N, N): out == W @ v. Teaching sizes only."""
    return factorized_weights(cache)


@reads_cache("sparse_fixed")
def pattern(cache):
    """The pattern from the paper's rule (not from the fast path): bool (N, N), or (H, N, N)
    for ``combine="heads"`` (even heads A(1), odd heads A(2))."""
    block, summary = cache.sizes
    return factorized_pattern(cache, lambda part, xp: build_pattern(cache.n, block=block, summary=summary,
                                                                    causal=cache.causal, part=part, xp=xp))


def setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """No parameters; block l ~ sqrt(N), summary c = max(1, min(4, l // 4))."""
    block = default_stride(n)
    return {}, {"block": block, "summary": default_summary(block)}


# --------------------------------------------------------------------------- decoding
def decode_rule(block, summary, combine="merged", part=1, heads=1):
    """``reach(i, pos)`` and ``keep(t, pos)`` of the causal pattern for the KV window: A(1) is
    floor(j / l) = floor(i / l), A(2) is j mod l >= l - c (both j <= i), combined as ``combine``
    says; for "heads", reach is (heads, L): even heads A(1), odd heads A(2)."""
    a1 = lambda i, pos: pos // block == i // block   # noqa: E731  my own block
    a2 = lambda i, pos: pos % block >= block - summary  # noqa: E731  the summary cells
    keep1 = lambda t, pos: pos // block >= t // block  # noqa: E731  the current block (j < t)
    keep2 = lambda t, pos: a2(t, pos)                # noqa: E731  a summary cell is read by every later query
    return combine_decode_rule(a1, a2, keep1, keep2, combine, part, heads)


def init_state(*, lead, d, dv, dtype="float64", block=None, summary=None, combine="merged", part=1, scale=None):
    """The KV window (:class:`effattn.nn.decode.WindowState`) of the causal fixed pattern
    (:func:`decode_rule`): the current block up to t and every summary cell, (t mod l) +
    c floor(t / l) keys (with their values and mask bits) per batch element and head at
    position t, growing as c t / l (with A(1) alone, "layers" part 1: the current block, bounded
    by l - 1). ``block`` l is required (its default depends on N); summary defaults to
    :func:`default_summary`; combine="heads" needs lead = (..., H)."""
    if block is None:
        raise ValueError("block must be given to decode: its default (~sqrt N) depends on the sequence "
                         "length N, which a decoder does not know")
    block = check_int("block", block)
    summary = default_summary(block) if summary is None else _check_summary(block, summary)
    combine = check_choice("combine", combine, COMBINE)
    part = check_choice("part", part, (1, 2))
    if combine == "heads" and len(tuple(lead)) < 1:
        raise ValueError(f"combine='heads' needs a head axis: lead = (..., H), got {tuple(lead)}")
    heads = int(tuple(lead)[-1]) if combine == "heads" else 1
    scale = check_scale(scale, d)
    reach, keep = decode_rule(block, summary, combine, part, heads)
    return window_state(lead=lead, d=d, dv=dv, dtype=dtype, scale=scale, reach=reach, keep=keep,
                        forward=lambda q, k, v, km: forward(q, k, v, causal=True, key_mask=km, block=block,
                                                            summary=summary, combine=combine, part=part,
                                                            scale=scale)[0])


prefill = window_prefill
step = window_step


MECHANISM = register(Mechanism(
    name="sparse_fixed",
    title="Sparse Transformer (fixed)",
    citation="Child et al., 2019",
    url="https://arxiv.org/abs/1904.10509",
    classes=("FP",),
    complexity="O(N√N)",
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
    sizes=("block", "summary"),
    windows=("block",),
    summary="Own block of l plus the last c 'summary' cells of every block.",
))
