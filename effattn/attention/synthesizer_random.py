"""Random Synthesizer: attention logits that are a learned table, the same for every input.

Tay, Bahri, Metzler, Juan, Zhao, Zheng, 2020, *Synthesizer: Rethinking
Self-Attention in Transformer Models*, https://arxiv.org/abs/2005.00743

Intuition. Does attention need query-key interaction at all? The Synthesizer
replaces the logits Q K^T by logits that are either predicted from each token
*alone* (Dense, :mod:`effattn.attention.synthesizer_dense`) or are simply a
learned table, the same for every input (Random, this module). The values are
still mixed by a softmax over positions, so it is still "attention" — but a
learned pattern (survey class LP) that, in its factorized form, is also low
rank (LR). The softmax core both share is :mod:`effattn.nn.synthetic`.

Random Synthesizer (``synthesizer_random``): a learned table, independent of
the input (q and k are never read; they are validated, so the contract's
bad-input tests still see them):

    Y = softmax(R) G(X),   R (H, L, L) per head (any shape broadcastable to
                           lead + (L, L) works, e.g. (L, L) shared),  G(X) = V here

An input with N, M < L uses the top-left N x M corner of R, as the paper's fixed
maximum length l.

Factorized Random (``factorized=k``): R = R1 R2^T with R1, R2 (H, L, k), rank k.

Masks: ``causal`` masks j > i, ``key_mask`` masks columns; a fully masked row
gives output 0 and zero gradients. The logits are NOT scaled by 1/sqrt(d).

Backward (softmax as in :mod:`effattn.nn.functional`):

    dV = P^T dY,  dP = dY V^T,  dB = P * (dP - rowsum(dY * Y))      (:mod:`effattn.nn.synthetic`)
    Random:     dR = sum over batch of dB (into the top-left N x M corner);
                factorized: dR1 = dR R2, dR2 = dR^T R1.

Decoding (:mod:`effattn.nn.decode`, :mod:`effattn.nn.synthetic`): row t of the causal logits
is R[t, :t+1] (factorized: R1[t] R2[:t+1]^T), the same for every input; the state keeps the values
v_j and mask bits of every token so far, t (dv + 1) numbers per head: it grows with t (not
bounded), up to L = N_max positions.

Cost: O(N M dv) time and O(N M) memory — inherently quadratic (the logits
are an N x M table), as the survey says: O(N^2). Registered subquadratic=False.

Conventions: the paper (and the tensor2tensor / community implementations)
uses the maximum length l as the width of R and slices to the actual
length; heads each have their own R.
"""
from __future__ import annotations

from ..backend import asarray, get_namespace
from ..validate import check_bool, check_float_array, check_int, check_leading, check_param, check_qkv
from ..nn.synthetic import (SynthesizerCache, attend_logits, attend_logits_backward, synthetic_init_state,
                            synthetic_prefill, synthetic_step)
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register


def _check_table(lead, n, m, dtype, factorized, R, R1, R2):
    """The table R (or its factors R1, R2), checked for the top-left N x M corner: (kind, params)."""
    if factorized is None:
        if R is None:
            raise ValueError("R is required by the random synthesizer (or pass factorized=k with R1, R2)")
        check_float_array("R", R, min_ndim=2)
        check_param("R", R, (None,) * R.ndim, dtype=dtype)
        check_leading("R", R, lead, 2, "(..., L, L)")
        if R.shape[-2] < n or R.shape[-1] < m:
            raise ValueError(f"R must have shape (..., L, L) with L >= N={n}, M={m}, got {tuple(R.shape)}")
        return "random", {"R": R}
    kk = check_int("factorized", factorized)
    if R1 is None or R2 is None:
        raise ValueError("R1 and R2 are required by the factorized random synthesizer")
    for name, r in (("R1", R1), ("R2", R2)):
        check_float_array(name, r, min_ndim=2)
        check_param(name, r, (None,) * r.ndim, dtype=dtype)
        check_leading(name, r, lead, 2, "(..., L, k)")
    if R1.ndim < 2 or R1.shape[-1] != kk or R1.shape[-2] < n or R1.ndim - 2 > len(lead):
        raise ValueError(f"R1 must have shape (..., L >= N={n}, k={kk}), got {tuple(R1.shape)}")
    if R2.ndim < 2 or R2.shape[-1] != kk or R2.shape[-2] < m or R2.ndim - 2 > len(lead):
        raise ValueError(f"R2 must have shape (..., L >= M={m}, k={kk}), got {tuple(R2.shape)}")
    return "random_factorized", {"R1": R1, "R2": R2}


def _table(kind, params, lead, rows, m):
    """The logits of the query rows ``rows`` (a slice) over the keys 0..m-1: (..., len(rows), M),
    a fresh array (the softmax overwrites it), and the factors' slices for the backward."""
    xp = get_namespace(*params.values())
    if kind == "random":
        corner = params["R"][..., rows, :m]
        return xp.broadcast_to(corner, lead + corner.shape[-2:]).copy(), ()
    r1, r2 = params["R1"][..., rows, :], params["R2"][..., :m, :]
    logits = r1 @ r2.swapaxes(-1, -2)                                   # R = R1 R2^T
    return xp.broadcast_to(logits, lead + logits.shape[-2:]).copy(), (r1, r2)


@forward_of("synthesizer_random")
def forward(q, k, v, *, causal=False, key_mask=None, R=None, R1=None, R2=None, factorized=None):
    """Random Synthesizer: a learned, input-independent logit table; out = softmax(R) v.

    Plain: R (..., L, L) broadcastable to lead + (L, L), L >= max(N, M).
    factorized=k: R1, R2 (..., L, k), R = R1 R2^T.
    Returns out (..., N, dv) and a :class:`~effattn.nn.synthetic.SynthesizerCache`.
    """
    n, m, d, dv = check_qkv(q, k, v, key_mask=key_mask)
    causal = check_bool("causal", causal)
    lead = tuple(q.shape[:-2])
    kind, params = _check_table(lead, n, m, q.dtype, factorized, R, R1, R2)
    logits, saved = _table(kind, params, lead, slice(0, n), m)         # (..., N, M)
    p, out = attend_logits(logits, v, causal=causal, key_mask=key_mask)
    return out, SynthesizerCache(kind, p, v, out, saved, params, n, m, d)


def _sum_to(g, shape):
    """Sum ``g`` over the axes broadcasting added or stretched, to get ``shape`` (gradient of broadcasting)."""
    extra = g.ndim - len(shape)
    if extra > 0:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g


@backward_of("synthesizer_random")
def backward(dout, cache):
    """Gradients of q, k (both zero: never read), v and the table (module docstring for the derivation)."""
    xp = get_namespace(dout)
    c = cache
    db, grads = attend_logits_backward(dout, c)                         # dB, {"q": 0, "k": 0, "v": dV}
    if c.kind == "random":
        R = c.params["R"]
        g = _sum_to(db, R.shape[:-2] + (c.n, c.m))
        if tuple(g.shape) == tuple(R.shape):                            # N = M = L: no padding copy
            grads["R"] = g
        else:
            dR = xp.zeros(R.shape, dtype=R.dtype)
            dR[..., :c.n, :c.m] = g
            grads["R"] = dR
        return grads
    R1, R2 = c.params["R1"], c.params["R2"]
    r1, r2 = c.saved
    dR1 = xp.zeros(R1.shape, dtype=R1.dtype)
    dR2 = xp.zeros(R2.shape, dtype=R2.dtype)
    dR1[..., :c.n, :] = _sum_to(db @ r2, R1.shape[:-2] + r1.shape[-2:])                # dR1 = dR R2
    dR2[..., :c.m, :] = _sum_to(db.swapaxes(-1, -2) @ r1, R2.shape[:-2] + r2.shape[-2:])  # dR2 = dR^T R1
    grads["R1"], grads["R2"] = dR1, dR2
    return grads


@reads_cache("synthesizer_random")
def weights(cache):
    """softmax(R) with the masks applied: (..., N, M), out == W @ v."""
    return cache.p


# --------------------------------------------------------------------------- parameters
def init_params(rng, *, n_max, heads, factorized=None, dtype="float64"):
    """Parameters of the random synthesizer, one table per head, drawn on the host: R (H, L, L)
    ~ N(0, 1), or with ``factorized=k`` R1, R2 (H, L, k) ~ N(0, 1 / sqrt(k)) (so R1 R2^T ~ N(0, 1))."""
    if factorized is None:
        return {"R": asarray(rng.standard_normal((heads, n_max, n_max)), dtype=dtype)}
    kk = check_int("factorized", factorized)
    return {"R1": asarray(rng.standard_normal((heads, n_max, kk)) * kk ** -0.25, dtype=dtype),
            "R2": asarray(rng.standard_normal((heads, n_max, kk)) * kk ** -0.25, dtype=dtype)}


def setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """L = N_max = n, one (n, n) table per head; not factorized."""
    return init_params(rng, n_max=n, heads=heads, dtype=dtype), {}


# --------------------------------------------------------------------------- decoding
def init_state(*, lead, d, dv, dtype="float64", R=None, R1=None, R2=None, factorized=None):
    """The empty decoder state (:class:`effattn.nn.synthetic.SyntheticState`) with :func:`forward`'s
    table. Row t of the causal logits is R[t, :t+1] (factorized: R1[t] R2[:t+1]^T), the same for every
    input, so the state holds the values v_j and the mask bits of every token so far, t (dv + 1)
    numbers per head: it grows with t (not bounded), up to L = N_max positions (the table's size)."""
    lead = tuple(check_int("lead", x) for x in lead)
    d, dv = check_int("d", d), check_int("dv", dv)
    kind, params = _check_table(lead, 1, 1, dtype, factorized, R, R1, R2)
    length = min(R.shape[-2:]) if kind == "random" else min(R1.shape[-2], R2.shape[-2])
    table = "R" if kind == "random" else "R1 and R2"

    def logits_row(q_t, t):
        if t >= length:
            raise ValueError(f"{table}: the table covers L = N_max = {length} positions, decoding reached position {t}")
        return _table(kind, params, lead, slice(t, t + 1), t + 1)[0][..., 0, :]   # (..., t + 1)

    def causal_forward(q, k, v, key_mask):
        return forward(q, k, v, causal=True, key_mask=key_mask, factorized=factorized, **params)[0]

    return synthetic_init_state(lead=lead, d=d, dv=dv, dtype=dtype, name="synthesizer_random", logits_row=logits_row,
                                forward=causal_forward, xp=get_namespace(*params.values()))


def prefill(q, k, v, state, *, key_mask=None):
    """The prompt (..., T, .) in one pass: the causal :func:`forward`'s rows, and its values kept.
    ``state`` must be fresh. Returns (out (..., T, dv), state)."""
    return synthetic_prefill(q, k, v, state, key_mask=key_mask, name="synthesizer_random")


def step(q_t, k_t, v_t, state, *, key_mask_t=None):
    """One token: out_t = softmax(R[t, :t+1] over the real keys) V[:t+1] (q_t and k_t are never read).
    Returns (out_t (..., dv), state), equal to row t of the causal parallel :func:`forward`; O(t dv)."""
    return synthetic_step(q_t, k_t, v_t, state, key_mask_t=key_mask_t, name="synthesizer_random")


MECHANISM = register(Mechanism(
    name="synthesizer_random",
    title="Random Synthesizer",
    citation="Tay et al., 2020",
    url="https://arxiv.org/abs/2005.00743",
    classes=("LR", "LP"),
    complexity="O(N^2)",
    causal=True,
    exact=False,
    kind="kernel",
    notebook="03_learned_patterns",
    forward=forward,
    backward=backward,
    weights=weights,
    setup=setup,
    init_state=init_state,
    prefill=prefill,
    step=step,
    subquadratic=False,
    sizes=("factorized",),
    summary="A learned, input-independent (N_max x N_max) logit table per head: softmax(R) v.",
))
