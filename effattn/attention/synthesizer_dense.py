"""Dense Synthesizer: attention logits *predicted* from each token alone, no token-token dot products.

Tay, Bahri, Metzler, Juan, Zhao, Zheng, 2020, *Synthesizer: Rethinking
Self-Attention in Transformer Models*, https://arxiv.org/abs/2005.00743

Intuition. Does attention need query-key interaction at all? The Synthesizer
replaces the logits Q K^T by logits that are either predicted from each token
*alone* (Dense, this module) or are simply a learned table, the same for every
input (Random, :mod:`effattn.attention.synthesizer_random`). The values are still
mixed by a softmax over positions, so it is still "attention" — but a learned
pattern (survey class LP) that, in its factorized forms, is also low rank (LR).
The softmax core both share is :mod:`effattn.nn.synthetic`.

Dense Synthesizer (``synthesizer_dense``):

    B_i = W2^T ReLU(W1^T X_i + b1) + b2        one row of l logits per token, l = N_max
    Y = softmax(B) G(X)                         G(X) = V here

In the kernel contract there is no X: **the dense synthesizer computes its
logits from the query-side input; q plays the role of X**, and v plays G(X).
k is never read (it is validated, so the contract's bad-input tests still see
it). Parameters, SHARED across batch and heads:

    W1 (d, d_h), b1 (d_h,), W2 (d_h, L), b2 (L,)     L = N_max >= M

An input with M < L keys uses the first M columns (positions 0..M-1), exactly
as the paper's fixed maximum length l.

Factorized Dense (``factorized=a``): two linear maps give F_A(X_i) (a entries)
and F_B(X_i) (c entries), a * c >= L, and the logit of key j is

    B_i[j] = F_A(X_i)[j // c] * F_B(X_i)[j % c]

i.e. the flattened outer product of the two short vectors (each row of
logits, reshaped (a, c), has rank 1). The paper writes it with a tiling H_C:
F_A repeated c times times F_B repeated a times, entry j = F_A[j mod a] *
F_B[j mod c]; for coprime a, c that is the same set of products in another
column order, and the ordering j -> (j // c, j % c) used here covers every
pair (alpha, gamma) for any a, c. F_A, F_B are single linear maps here.
Parameters Wa (d, a), ba (a,), Wb (d, c), bb (c,), shared.

Masks: ``causal`` masks j > i, ``key_mask`` masks columns; a fully masked row
gives output 0 and zero gradients. The logits are NOT scaled by 1/sqrt(d)
(they are not dot products).

Backward (softmax as in :mod:`effattn.nn.functional`):

    dV = P^T dY,  dP = dY V^T,  dB = P * (dP - rowsum(dY * Y))      (:mod:`effattn.nn.synthetic`)
    Dense:      dW2 = H^T dB, db2 = sum dB, dH = dB W2^T, dZ = dH * [Z > 0],
                dW1 = X^T dZ, db1 = sum dZ, dX = dZ W1^T   (X = q)
    Factorized: dF_A[α] = sum_c dB[α c + γ] F_B[γ], dF_B[γ] = sum_α dB[α c + γ] F_A[α], then linear

Decoding (:mod:`effattn.nn.decode`, :mod:`effattn.nn.synthetic`): row t of the causal logits
is B_t[:t+1] = MLP(q_t)[:t+1] (factorized: F_A(q_t)[j // c] F_B(q_t)[j % c], j <= t), from q_t and
the parameters alone; the state keeps the values v_j and mask bits of every token so far,
t (dv + 1) numbers per head: it grows with t (not bounded), up to L = N_max positions.

Cost: O(N M dv) time and O(N M) memory — inherently quadratic (the logits
are an N x M table), as the survey says: O(N^2). Registered subquadratic=False.

Conventions: the paper (and the tensor2tensor / community implementations)
uses the maximum length l as the width of W2 and slices to the actual length.
"""
from __future__ import annotations

from ..backend import asarray, get_namespace
from ..validate import check_bool, check_int, check_mlp_params, check_param, check_qkv
from ..nn.functional import init_mlp, mlp_backward, mlp_forward
from ..nn.synthetic import (SynthesizerCache, attend_logits, attend_logits_backward, synthetic_init_state,
                            synthetic_prefill, synthetic_step)
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register


def _check_params(d, width, dtype, factorized, W1, b1, W2, b2, Wa, ba, Wb, bb):
    """The parameters of the plain or factorized form, checked for logits of ``width`` keys:
    (kind, params, L) with L the number of key positions they cover (N_max)."""
    if factorized is None:
        for name, val in (("W1", W1), ("b1", b1), ("W2", W2), ("b2", b2)):
            if val is None:
                raise ValueError(f"{name} is required by the dense synthesizer (or pass factorized=a with Wa, ba, Wb, bb)")
        check_mlp_params(W1, b1, W2, b2, d, width, dtype, "M (L = N_max >= M)")
        return "dense", {"W1": W1, "b1": b1, "W2": W2, "b2": b2}, W2.shape[1]
    a = check_int("factorized", factorized)
    for name, val in (("Wa", Wa), ("ba", ba), ("Wb", Wb), ("bb", bb)):
        if val is None:
            raise ValueError(f"{name} is required by the factorized dense synthesizer")
    check_param("Wa", Wa, (d, a), dtype=dtype)
    check_param("ba", ba, (a,), dtype=dtype)
    check_param("Wb", Wb, (d, None), dtype=dtype)
    c = Wb.shape[1]
    check_param("bb", bb, (c,), dtype=dtype)
    if a * c < width:
        raise ValueError(f"Wb: factorized=a={a} times c={c} columns must cover M={width} keys")
    return "dense_factorized", {"Wa": Wa, "ba": ba, "Wb": Wb, "bb": bb}, a * c


def _logits(x, width, kind, params):
    """The synthetic logits B (..., N, width) of the keys 0..width-1 from x (..., N, d) (q plays X),
    and what their backward needs (the MLP cache, or (x, F_A, F_B))."""
    if kind == "dense":
        p = params
        return mlp_forward(x, p["W1"], p["b1"], p["W2"], p["b2"], width=width)   # B = W2^T ReLU(W1^T X + b1) + b2
    fa = x @ params["Wa"] + params["ba"]                                # F_A(X): (..., N, a)
    fb = x @ params["Wb"] + params["bb"]                                # F_B(X): (..., N, c)
    a, c = fa.shape[-1], fb.shape[-1]
    logits = (fa[..., :, :, None] * fb[..., :, None, :]).reshape(x.shape[:-1] + (a * c,))[..., :width].copy()
    return logits, (x, fa, fb)


@forward_of("synthesizer_dense")
def forward(q, k, v, *, causal=False, key_mask=None, W1=None, b1=None, W2=None, b2=None,
            Wa=None, ba=None, Wb=None, bb=None, factorized=None):
    """Dense Synthesizer: logits from each query row alone (q plays X), out = softmax(B) v.

    Plain: W1 (d, d_h), b1 (d_h,), W2 (d_h, L >= M), b2 (L,).
    factorized=a: Wa (d, a), ba (a,), Wb (d, c), bb (c,) with a * c >= M.
    Returns out (..., N, dv) and a :class:`~effattn.nn.synthetic.SynthesizerCache`.
    """
    n, m, d, dv = check_qkv(q, k, v, key_mask=key_mask)
    causal = check_bool("causal", causal)
    kind, params, _ = _check_params(d, m, q.dtype, factorized, W1, b1, W2, b2, Wa, ba, Wb, bb)
    logits, saved = _logits(q, m, kind, params)                         # (..., N, M)
    p, out = attend_logits(logits, v, causal=causal, key_mask=key_mask)
    return out, SynthesizerCache(kind, p, v, out, saved, params, n, m, d)


def _pad_cols(g, width):
    """(..., w) -> (..., width), zeros on the right."""
    if g.shape[-1] == width:
        return g
    xp = get_namespace(g)
    z = xp.zeros(g.shape[:-1] + (width - g.shape[-1],), dtype=g.dtype)
    return xp.concatenate([g, z], axis=-1)


@backward_of("synthesizer_dense")
def backward(dout, cache):
    """Gradients of q, k (zero), v and the parameters (module docstring for the derivation)."""
    c = cache
    db, grads = attend_logits_backward(dout, c)                         # dB, {"q": 0, "k": 0, "v": dV}
    if c.kind == "dense":
        gm = mlp_backward(db, c.saved)                                  # the MLP's backward (nn.functional)
        grads["q"] = gm.pop("x")
        grads.update(gm)
        return grads
    x, fa, fb = c.saved
    a, cc = fa.shape[-1], fb.shape[-1]
    db4 = _pad_cols(db, a * cc).reshape(tuple(dout.shape[:-2]) + (c.n, a, cc))   # (..., N, a, c)
    dfa = (db4 * fb[..., :, None, :]).sum(axis=-1)                      # (..., N, a)
    dfb = (db4 * fa[..., :, :, None]).sum(axis=-2)                      # (..., N, c)
    grads["Wa"] = x.reshape(-1, c.d).T @ dfa.reshape(-1, a)
    grads["ba"] = dfa.reshape(-1, a).sum(axis=0)
    grads["Wb"] = x.reshape(-1, c.d).T @ dfb.reshape(-1, cc)
    grads["bb"] = dfb.reshape(-1, cc).sum(axis=0)
    grads["q"] = dfa @ c.params["Wa"].T + dfb @ c.params["Wb"].T
    return grads


@reads_cache("synthesizer_dense")
def weights(cache):
    """softmax(B) with the masks applied: (..., N, M), out == W @ v."""
    return cache.p


# --------------------------------------------------------------------------- parameters
def init_params(rng, *, n_max, d, hidden=None, factorized=None, dtype="float64"):
    """Parameters of the dense synthesizer (shared across heads), drawn on the host: the MLP
    W1 (d, d_h), b1, W2 (d_h, n_max), b2 (d_h = ``hidden``, default max(d, 2)), or with
    ``factorized=a`` the two maps Wa (d, a), ba, Wb (d, c), bb with c = ceil(n_max / a)."""
    if factorized is None:
        return init_mlp(rng, d=d, width=n_max, hidden=hidden, dtype=dtype)
    a = check_int("factorized", factorized)
    c = -(-n_max // a)
    return {"Wa": asarray(rng.standard_normal((d, a)) * d ** -0.5, dtype=dtype),
            "ba": asarray(rng.standard_normal(a) * 0.1 + 1.0, dtype=dtype),
            "Wb": asarray(rng.standard_normal((d, c)) * d ** -0.5, dtype=dtype),
            "bb": asarray(rng.standard_normal(c) * 0.1 + 1.0, dtype=dtype)}


def setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """L = N_max = n, d_h = d; not factorized."""
    return init_params(rng, n_max=n, d=d, dtype=dtype), {}


# --------------------------------------------------------------------------- decoding
def init_state(*, lead, d, dv, dtype="float64", W1=None, b1=None, W2=None, b2=None, Wa=None, ba=None, Wb=None,
               bb=None, factorized=None):
    """The empty decoder state (:class:`effattn.nn.synthetic.SyntheticState`) with :func:`forward`'s
    parameters. Row t of the causal logits is B_t[:t+1] = MLP(q_t)[:t+1] (factorized: F_A(q_t)[j // c]
    F_B(q_t)[j % c], j <= t): it needs q_t and the parameters only, so the state holds the values
    v_j and the mask bits of every token so far, t (dv + 1) numbers per head: it grows with t
    (not bounded), up to L = N_max positions (the width of W2, or a * c)."""
    lead = tuple(check_int("lead", x) for x in lead)
    d, dv = check_int("d", d), check_int("dv", dv)
    kind, params, length = _check_params(d, 1, dtype, factorized, W1, b1, W2, b2, Wa, ba, Wb, bb)
    width = "W2" if kind == "dense" else "Wb"

    def logits_row(q_t, t):
        if t >= length:
            raise ValueError(f"{width}: the logits cover L = N_max = {length} positions, decoding reached position {t}")
        return _logits(q_t[..., None, :], t + 1, kind, params)[0][..., 0, :]      # (..., t + 1)

    def causal_forward(q, k, v, key_mask):
        return forward(q, k, v, causal=True, key_mask=key_mask, factorized=factorized, **params)[0]

    return synthetic_init_state(lead=lead, d=d, dv=dv, dtype=dtype, name="synthesizer_dense", logits_row=logits_row,
                                forward=causal_forward, xp=get_namespace(*params.values()))


def prefill(q, k, v, state, *, key_mask=None):
    """The prompt (..., T, .) in one pass: the causal :func:`forward`'s rows, and its values kept.
    ``state`` must be fresh. Returns (out (..., T, dv), state)."""
    return synthetic_prefill(q, k, v, state, key_mask=key_mask, name="synthesizer_dense")


def step(q_t, k_t, v_t, state, *, key_mask_t=None):
    """One token: out_t = softmax(B_t[:t+1] over the real keys) V[:t+1] (k_t is never read). Returns
    (out_t (..., dv), state), equal to row t of the causal parallel :func:`forward`; O(d d_h + t (d_h + dv))."""
    return synthetic_step(q_t, k_t, v_t, state, key_mask_t=key_mask_t, name="synthesizer_dense")


MECHANISM = register(Mechanism(
    name="synthesizer_dense",
    title="Dense Synthesizer",
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
    summary="Attention logits predicted from each token alone by a 2-layer MLP (q plays X): softmax(MLP(q)) v.",
))
