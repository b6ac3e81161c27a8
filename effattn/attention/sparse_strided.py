"""Sparse Transformer, strided factorized attention (``sparse_strided``).

Child, Gray, Radford, Sutskever, 2019, *Generating Long Sequences with Sparse
Transformers*, https://arxiv.org/abs/1904.10509 (Section 4.2, "strided
attention"). The other pattern of the paper is :mod:`effattn.attention.sparse_fixed`;
what the two share (the combine modes, the head slicing, the receptive field)
is :mod:`effattn.nn.factorized`.

Intuition. Full attention lets every position look at every earlier one. The
Sparse Transformer splits that job between two cheap patterns A(1), A(2) so
that any position reaches any earlier one in TWO hops: with l ~ sqrt(N), each
query looks at O(sqrt N) keys per pattern, so one layer costs O(N sqrt N), and
two stacked layers (or two heads, or one merged pattern) still connect
everything (see :func:`effattn.nn.factorized.receptive_field`). The strided
pattern suits data with a period (images row by row, audio).

Pattern (query i, key j; l = ``stride``):

    A(1)_i = {j : i - l < j <= i}          "the previous l positions" (causal)
    A(2)_i = {j : (i - j) mod l = 0, j <= i}  "every l-th position back"

    non-causal (both directions): A(1)_i = {j : |i - j| < l},
                                  A(2)_i = {j : (i - j) mod l = 0}

Conventions, next to the well-known implementations:

* The paper writes A(1)_i = {t, t+1, ..., i} with t = max(0, i - l): l + 1
  positions. We use l positions, i - l < j <= i, which is OpenAI's
  ``sparse_attention`` ``get_attn_mask(..., "local", local_attn_ctx=l)``
  (``matrix_band_part(ctx=l - 1, 0)``). The only difference is j = i - l,
  which A(2) contains anyway, so the MERGED pattern is identical either way.
  A(2) is OpenAI's ``"strided"`` mask, ``(q - k) mod stride == 0 and q >= k``.
* OpenAI's ``blocksparse_attention_impl(attn_mode="strided")`` computes
  A(2) on the transposed sequence (``strided_transpose``: reshape to
  (N / l, l) and swap the axes) — the column layout used here.
* ``combine`` = ``"merged"`` (one softmax over A(1) ∪ A(2), the default),
  ``"heads"`` (even heads A(1), odd heads A(2)) or ``"layers"`` (this call
  uses A(``part``) only): the paper's three ways, :mod:`effattn.nn.factorized`.

Implementation, block-sparse, never an N x N array. The sequence is padded
to Np = G l and viewed as a G x l grid (position i = g l + r: block g, residue
r). Each part runs in the layout where it is dense, with
:func:`effattn.nn.sparse.attend_forward`, and the merged pattern combines the
parts under one softmax through their log-sum-exps (:mod:`effattn.nn.union`):

    A(1): groups = rows (blocks) g, keys = rows g-1, g (and g+1 if
          non-causal): (G, l) queries x (G, 2l or 3l) keys, masked by the rule
    A(2): groups = COLUMNS r (positions with i mod l = r): G queries x G keys
          — every key of a column is a multiple of l away

In the merged pattern the overlap A(1) ∩ A(2) (j = i) is removed from the
second part, so no key counts twice. Cost with l ~ sqrt(N): O(N (3l + N/l) d),
O(N sqrt N). ``setup`` picks l = the power of two nearest sqrt(N)
(:func:`effattn.nn.factorized.default_stride`; the paper used l = 128).

Backward: the union backward of :mod:`effattn.nn.union` (flash-attention
dS = P * (dP - rowsum(dO * O)), plus the log-sum-exp terms of the merge).

Cache: :class:`effattn.nn.factorized.FactorizedCache` (the union caches of the
one or two head slices, and the sizes that ``pattern`` needs).

Decoding (:mod:`effattn.nn.decode`, the KV window): token t sees the keys j <= t with t - j < l
(A(1)) or (t - j) mod l = 0 (A(2)). A(2) reaches every earlier position of the same residue, and
every residue comes round again, so once A(2) is in use ("merged", "heads" with an odd head,
"layers" with part 2) NO key ever becomes unreachable: the window keeps everything, t keys at
position t, like the KV cache of ``full`` (a step scores them all and masks the ones off the
pattern: O(t d)). With A(1) alone ("layers", part 1) it is a bounded band of l - 1 keys.
The stride must be given: its default depends on the sequence length N.
"""
from __future__ import annotations

from ..backend import get_namespace
from ..validate import check_bool, check_choice, check_int, check_qkv, check_scale
from ..nn.decode import window_prefill, window_state, window_step
from ..nn.factorized import (COMBINE, combine_decode_rule, default_stride, factorized_backward, factorized_forward,
                             factorized_pattern, factorized_weights, position_grid, rule_mask)
from ..nn.union import Part
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register


def build_pattern(n, *, stride, causal=False, part=None, xp=None):
    """The strided pattern from the paper's rule: bool (n, n), True = query i may attend key j.

    part = 1 (A(1), the previous l), 2 (A(2), every l-th back) or None (A(1) ∪ A(2)).
    Non-causal: |i - j| < l and (i - j) mod l = 0 in both directions.
    """
    xp = get_namespace() if xp is None else xp
    n = check_int("n", n)
    stride = check_int("stride", stride)
    causal = check_bool("causal", causal)
    part = check_choice("part", part, (1, 2, None))
    i = xp.arange(n)[:, None]                      # (N, 1)
    j = xp.arange(n)[None, :]                      # (1, N)
    a1 = xp.abs(i - j) < stride                    # |i - j| < l
    a2 = (i - j) % stride == 0                     # (i - j) mod l = 0
    allowed = {1: a1, 2: a2, None: a1 | a2}[part]
    if causal:
        allowed = allowed & (j <= i)
    return allowed


def _shift_rows(pos, s):
    """Rows of the position grid shifted by s blocks (row g gets row g + s); -1 outside."""
    xp = get_namespace(pos)
    g = pos.shape[0]
    rows = xp.arange(g) + s
    out = pos[xp.clip(rows, 0, g - 1)]
    return xp.where(((rows >= 0) & (rows < g))[:, None], out, -1)


def _part(n, stride, which, *, causal, exclude_overlap=False, xp=None):
    """The :class:`Part` layout of A(which) (see the module docstring)."""
    xp = get_namespace() if xp is None else xp
    pos = position_grid(n, stride, xp)                                  # (G, l)
    if which == 1:
        shifts = (-1, 0) if causal else (-1, 0, 1)
        kpos = xp.concatenate([_shift_rows(pos, s) for s in shifts], axis=1)  # (G, 2l or 3l)
        ok, i, j = rule_mask(pos, kpos, n, causal)
        ok = ok & (xp.abs(i - j) < stride)                              # i - l < j <= i  /  |i - j| < l
        return Part(pos, kpos, ok, "strided A1 (local)")
    cols = pos.T                                                        # (l, G): column r = {r, r + l, ...}
    ok, i, j = rule_mask(cols, cols, n, causal)                         # (i - j) mod l = 0 by construction
    if exclude_overlap:
        ok = ok & (j != i)                                              # i itself is in A(1)
    return Part(cols, cols, ok, "strided A2 (every l-th)")


@forward_of("sparse_strided")
def forward(q, k, v, *, causal=False, key_mask=None, stride=None, combine="merged", part=1, scale=None):
    """Sparse Transformer strided attention.

    q, k, v (..., N, d) / (..., N, dv) (self-attention: same length);
    stride: l (default :func:`effattn.nn.factorized.default_stride`, ~sqrt N); combine:
    "merged" | "heads" | "layers"; part: 1 or 2 (which pattern, for combine="layers");
    key_mask (..., N) bool. Returns out (..., N, dv) and a
    :class:`effattn.nn.factorized.FactorizedCache`.
    """
    n = check_qkv(q, k, v, key_mask=key_mask, self_attention=True)[0]
    stride = default_stride(n) if stride is None else check_int("stride", stride)
    stride = min(stride, n)                        # l >= N: A(1) is everything, A(2) only i itself

    def make(which, causal_, exclude, xp):
        return _part(n, stride, which, causal=causal_, exclude_overlap=exclude, xp=xp)

    return factorized_forward(q, k, v, make, sizes=(stride,), causal=causal, key_mask=key_mask, combine=combine,
                              part=part, scale=scale)


@backward_of("sparse_strided")
def backward(dout, cache):
    """Gradients {"q": dq, "k": dk, "v": dv} (the union backward of each head slice)."""
    return factorized_backward(dout, cache)


@reads_cache("sparse_strided")
def weights(cache):
    """The effective attention matrix (..., N, N): out == W @ v. Teaching sizes only."""
    return factorized_weights(cache)


@reads_cache("sparse_strided")
def pattern(cache):
    """The pattern from the paper's rule (not from the fast path): bool (N, N), or (H, N, N)
    for ``combine="heads"`` (even heads A(1), odd heads A(2))."""
    (stride,) = cache.sizes
    return factorized_pattern(cache, lambda part, xp: build_pattern(cache.n, stride=stride, causal=cache.causal,
                                                                    part=part, xp=xp))


def setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """No parameters; stride l ~ sqrt(N) (a power of two)."""
    return {}, {"stride": default_stride(n)}


# --------------------------------------------------------------------------- decoding
def decode_rule(stride, combine="merged", part=1, heads=1):
    """``reach(i, pos)`` and ``keep(t, pos)`` of the causal pattern for the KV window: A(1) is
    i - l < j, A(2) is (i - j) mod l = 0 (both j <= i), combined as ``combine`` says; for
    "heads", reach is (heads, L): even heads A(1), odd heads A(2)."""
    a1 = lambda i, pos: i - pos < stride             # noqa: E731  the previous l positions
    a2 = lambda i, pos: (i - pos) % stride == 0      # noqa: E731  every l-th position back
    keep1 = lambda t, pos: pos > t - stride          # noqa: E731  a later query's band still holds it
    keep2 = lambda t, pos: pos >= 0                  # noqa: E731  its residue comes round again
    return combine_decode_rule(a1, a2, keep1, keep2, combine, part, heads)


def init_state(*, lead, d, dv, dtype="float64", stride=None, combine="merged", part=1, scale=None):
    """The KV window (:class:`effattn.nn.decode.WindowState`) of the causal strided pattern
    (:func:`decode_rule`). With A(2) in use every key stays reachable (same residue), so the
    state holds all t keys (t (d + dv + 1) numbers per batch element and head, growing with t);
    with A(1) alone ("layers", part 1) the l - 1 keys before t (bounded). ``stride`` l is
    required (its default depends on N); combine="heads" needs lead = (..., H)."""
    if stride is None:
        raise ValueError("stride must be given to decode: its default (~sqrt N) depends on the sequence "
                         "length N, which a decoder does not know")
    stride = check_int("stride", stride)
    combine = check_choice("combine", combine, COMBINE)
    part = check_choice("part", part, (1, 2))
    if combine == "heads" and len(tuple(lead)) < 1:
        raise ValueError(f"combine='heads' needs a head axis: lead = (..., H), got {tuple(lead)}")
    heads = int(tuple(lead)[-1]) if combine == "heads" else 1
    scale = check_scale(scale, d)
    reach, keep = decode_rule(stride, combine, part, heads)
    return window_state(lead=lead, d=d, dv=dv, dtype=dtype, scale=scale, reach=reach, keep=keep,
                        forward=lambda q, k, v, km: forward(q, k, v, causal=True, key_mask=km, stride=stride,
                                                            combine=combine, part=part, scale=scale)[0])


prefill = window_prefill
step = window_step


MECHANISM = register(Mechanism(
    name="sparse_strided",
    title="Sparse Transformer (strided)",
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
    sizes=("stride",),
    windows=("stride",),
    summary="The previous l positions plus every l-th position back (l ~ sqrt N): two hops reach everything.",
))
