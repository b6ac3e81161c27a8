"""Synthesizer: attention weights *synthesized* without token-token dot products.

Tay, Bahri, Metzler, Juan, Zhao, Zheng, 2020, *Synthesizer: Rethinking
Self-Attention in Transformer Models*, https://arxiv.org/abs/2005.00743

Intuition. Does attention need query-key interaction at all? The Synthesizer
replaces the logits Q K^T by logits that are either predicted from each token
*alone* (Dense) or are simply a learned table, the same for every input
(Random). The values are still mixed by a softmax over positions, so it is
still "attention" — but a learned pattern (survey class LP) that, in its
factorized forms, is also low rank (LR).

Dense Synthesizer (two registrations share this module; this one is ``synthesizer_dense``):

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

Random Synthesizer (``synthesizer_random``): a learned table, independent of
the input (q and k are never read):

    Y = softmax(R) G(X),   R (H, L, L) per head (any shape broadcastable to
                           lead + (L, L) works, e.g. (L, L) shared)

Factorized Random (``factorized=k``): R = R1 R2^T with R1, R2 (H, L, k), rank k.

Masks: ``causal`` masks j > i, ``key_mask`` masks columns; a fully masked row
gives output 0 and zero gradients. The logits are NOT scaled by 1/sqrt(d)
(they are not dot products).

Backward (softmax as in :mod:`effattn.nn.functional`):

    dV = P^T dY,  dP = dY V^T,  dB = P * (dP - rowsum(dY * Y))
    Dense:      dW2 = H^T dB, db2 = sum dB, dH = dB W2^T, dZ = dH * [Z > 0],
                dW1 = X^T dZ, db1 = sum dZ, dX = dZ W1^T   (X = q)
    Factorized: dF_A[α] = sum_c dB[α c + γ] F_B[γ], dF_B[γ] = sum_α dB[α c + γ] F_A[α], then linear
    Random:     dR = sum over batch of dB (into the top-left N x M corner);
                factorized: dR1 = dR R2, dR2 = dR^T R1.

Cost: O(N M dv) time and O(N M) memory — inherently quadratic (the logits
are an N x M table), as the survey says: O(N^2). Registered subquadratic=False.

Conventions: the paper (and the tensor2tensor / community implementations)
uses the maximum length l as the width of W2 / R and slices to the actual
length; heads each have their own R in the random synthesizer.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import asarray, get_namespace
from ..validate import check_bool, check_int, check_mlp_params, check_param, check_qkv
from ..nn.functional import mlp_backward, mlp_forward, softmax_backward, softmax_forward
from ..nn.sparse import combine_masks
from ..registry import Mechanism, register


class SynthCache(NamedTuple):
    kind: str        # "dense", "dense_factorized", "random", "random_factorized"
    p: object        # (..., N, M) softmax weights
    v: object        # (..., M, dv)
    out: object      # (..., N, dv)
    saved: object    # what the logits' backward needs (dense: the MLP cache)
    params: dict     # the parameters used
    n: int
    m: int
    d: int


def _sum_to(g, shape):
    """Sum ``g`` over the axes broadcasting added or stretched, to get ``shape`` (gradient of broadcasting)."""
    extra = g.ndim - len(shape)
    if extra > 0:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g


def _attend(logits, v, n, m, causal, key_mask, xp):
    allowed = combine_masks(n, m, xp, causal=causal, key_mask=key_mask)
    p, _, _ = softmax_forward(logits, allowed, inplace=True)            # (..., N, M)
    out = p @ v                                                         # (..., N, M) @ (..., M, dv) -> (..., N, dv)
    return p, out


def _pad_cols(g, width, xp):
    if g.shape[-1] == width:
        return g
    z = xp.zeros(g.shape[:-1] + (width - g.shape[-1],), dtype=g.dtype)
    return xp.concatenate([g, z], axis=-1)


# --------------------------------------------------------------------------- dense
def dense_forward(q, k, v, *, causal=False, key_mask=None, W1=None, b1=None, W2=None, b2=None,
                  Wa=None, ba=None, Wb=None, bb=None, factorized=None):
    """Dense Synthesizer: logits from each query row alone (q plays X), out = softmax(B) v.

    Plain: W1 (d, d_h), b1 (d_h,), W2 (d_h, L >= M), b2 (L,).
    factorized=a: Wa (d, a), ba (a,), Wb (d, c), bb (c,) with a * c >= M.
    """
    n, m, d, dv = check_qkv(q, k, v, key_mask=key_mask)
    causal = check_bool("causal", causal)
    xp = get_namespace(q, k, v)
    if factorized is None:
        for name, val in (("W1", W1), ("b1", b1), ("W2", W2), ("b2", b2)):
            if val is None:
                raise ValueError(f"{name} is required by the dense synthesizer (or pass factorized=a with Wa, ba, Wb, bb)")
        check_mlp_params(W1, b1, W2, b2, d, m, q.dtype, "M (L = N_max >= M)")
        logits, mlp = mlp_forward(q, W1, b1, W2, b2, width=m)          # B = W2^T ReLU(W1^T X + b1) + b2: (..., N, M)
        kind, saved, params = "dense", mlp, {"W1": W1, "b1": b1, "W2": W2, "b2": b2}
    else:
        a = check_int("factorized", factorized)
        for name, val in (("Wa", Wa), ("ba", ba), ("Wb", Wb), ("bb", bb)):
            if val is None:
                raise ValueError(f"{name} is required by the factorized dense synthesizer")
        check_param("Wa", Wa, (d, a), dtype=q.dtype)
        check_param("ba", ba, (a,), dtype=q.dtype)
        check_param("Wb", Wb, (d, None), dtype=q.dtype)
        c = Wb.shape[1]
        check_param("bb", bb, (c,), dtype=q.dtype)
        if a * c < m:
            raise ValueError(f"Wb: factorized=a={a} times c={c} columns must cover M={m} keys")
        fa = q @ Wa + ba                                                # F_A(X): (..., N, a)
        fb = q @ Wb + bb                                                # F_B(X): (..., N, c)
        logits = (fa[..., :, :, None] * fb[..., :, None, :]).reshape(q.shape[:-1] + (a * c,))[..., :m].copy()
        kind, saved, params = "dense_factorized", (q, fa, fb), {"Wa": Wa, "ba": ba, "Wb": Wb, "bb": bb}
    p, out = _attend(logits, v, n, m, causal, key_mask, xp)
    return out, SynthCache(kind, p, v, out, saved, params, n, m, d)


# --------------------------------------------------------------------------- random
def random_forward(q, k, v, *, causal=False, key_mask=None, R=None, R1=None, R2=None, factorized=None):
    """Random Synthesizer: a learned, input-independent logit table; out = softmax(R) v.

    Plain: R (..., L, L) broadcastable to lead + (L, L), L >= max(N, M).
    factorized=k: R1, R2 (..., L, k), R = R1 R2^T.
    """
    n, m, d, dv = check_qkv(q, k, v, key_mask=key_mask)
    causal = check_bool("causal", causal)
    xp = get_namespace(q, k, v)
    lead = tuple(q.shape[:-2])
    if factorized is None:
        if R is None:
            raise ValueError("R is required by the random synthesizer (or pass factorized=k with R1, R2)")
        check_param("R", R, (None,) * max(R.ndim, 2), dtype=q.dtype)
        if R.ndim < 2 or R.shape[-2] < n or R.shape[-1] < m or R.ndim - 2 > len(lead):
            raise ValueError(f"R must have shape (..., L, L) with L >= N={n}, M={m} and leading axes broadcasting "
                             f"to {lead}, got {tuple(R.shape)}")
        logits = xp.broadcast_to(R[..., :n, :m], lead + (n, m)).copy()   # (..., N, M)
        kind, saved, params = "random", (), {"R": R}
    else:
        kk = check_int("factorized", factorized)
        if R1 is None or R2 is None:
            raise ValueError("R1 and R2 are required by the factorized random synthesizer")
        check_param("R1", R1, (None,) * max(R1.ndim, 2), dtype=q.dtype)
        check_param("R2", R2, (None,) * max(R2.ndim, 2), dtype=q.dtype)
        if R1.ndim < 2 or R1.shape[-1] != kk or R1.shape[-2] < n or R1.ndim - 2 > len(lead):
            raise ValueError(f"R1 must have shape (..., L >= N={n}, k={kk}), got {tuple(R1.shape)}")
        if R2.ndim < 2 or R2.shape[-1] != kk or R2.shape[-2] < m or R2.ndim - 2 > len(lead):
            raise ValueError(f"R2 must have shape (..., L >= M={m}, k={kk}), got {tuple(R2.shape)}")
        r1, r2 = R1[..., :n, :], R2[..., :m, :]
        logits = xp.broadcast_to(r1 @ r2.swapaxes(-1, -2), lead + (n, m)).copy()   # R = R1 R2^T: (..., N, M)
        kind, saved, params = "random_factorized", (r1, r2), {"R1": R1, "R2": R2}
    p, out = _attend(logits, v, n, m, causal, key_mask, xp)
    return out, SynthCache(kind, p, v, out, saved, params, n, m, d)


# --------------------------------------------------------------------------- backward
def backward(dout, cache):
    """Gradients of q, k, v and the parameters (module docstring for the derivation)."""
    xp = get_namespace(dout)
    c = cache
    p, v = c.p, c.v
    dv = p.swapaxes(-1, -2) @ dout                                      # dV = P^T dY
    dp = dout @ v.swapaxes(-1, -2)                                      # dP = dY V^T (..., N, M)
    rowdot = (dout * c.out).sum(axis=-1, keepdims=True)
    db = softmax_backward(dp, (p, -1), rowdot=rowdot, inplace=True)     # dB = P * (dP - rowsum(dY * Y))
    lead = tuple(dout.shape[:-2])
    dq = xp.zeros(lead + (c.n, c.d), dtype=dout.dtype)
    grads = {"q": dq, "k": xp.zeros(lead + (c.m, c.d), dtype=dout.dtype), "v": dv}
    if c.kind == "dense":
        gm = mlp_backward(db, c.saved)                                  # the MLP's backward (nn.functional)
        grads["q"] = gm.pop("x")
        grads.update(gm)
    elif c.kind == "dense_factorized":
        x, fa, fb = c.saved
        a, cc = fa.shape[-1], fb.shape[-1]
        db4 = _pad_cols(db, a * cc, xp).reshape(lead + (c.n, a, cc))    # (..., N, a, c)
        dfa = (db4 * fb[..., :, None, :]).sum(axis=-1)                  # (..., N, a)
        dfb = (db4 * fa[..., :, :, None]).sum(axis=-2)                  # (..., N, c)
        grads["Wa"] = x.reshape(-1, c.d).T @ dfa.reshape(-1, a)
        grads["ba"] = dfa.reshape(-1, a).sum(axis=0)
        grads["Wb"] = x.reshape(-1, c.d).T @ dfb.reshape(-1, cc)
        grads["bb"] = dfb.reshape(-1, cc).sum(axis=0)
        grads["q"] = dfa @ c.params["Wa"].T + dfb @ c.params["Wb"].T
    elif c.kind == "random":
        R = c.params["R"]
        g = _sum_to(db, R.shape[:-2] + (c.n, c.m))
        if tuple(g.shape) == tuple(R.shape):                            # N = M = L: no padding copy
            grads["R"] = g
        else:
            dR = xp.zeros(R.shape, dtype=R.dtype)
            dR[..., :c.n, :c.m] = g
            grads["R"] = dR
    else:
        R1, R2 = c.params["R1"], c.params["R2"]
        r1, r2 = c.saved
        dr = db                                                          # (..., N, M)
        dR1 = xp.zeros(R1.shape, dtype=R1.dtype)
        dR2 = xp.zeros(R2.shape, dtype=R2.dtype)
        dR1[..., :c.n, :] = _sum_to(dr @ r2, R1.shape[:-2] + r1.shape[-2:])               # dR1 = dR R2
        dR2[..., :c.m, :] = _sum_to(dr.swapaxes(-1, -2) @ r1, R2.shape[:-2] + r2.shape[-2:])  # dR2 = dR^T R1
        grads["R1"], grads["R2"] = dR1, dR2
    return grads


def weights(cache):
    """softmax(B) with the masks applied: (..., N, M), out == W @ v."""
    return cache.p


# --------------------------------------------------------------------------- setup
def init_dense(rng, *, n_max, d, hidden=None, factorized=None, dtype="float64"):
    """Parameters of the dense synthesizer (shared across heads), drawn on the host."""
    if factorized is None:
        dh = hidden or max(d, 2)
        return {"W1": asarray(rng.standard_normal((d, dh)) * d ** -0.5, dtype=dtype),
                "b1": asarray(rng.standard_normal(dh) * 0.1, dtype=dtype),
                "W2": asarray(rng.standard_normal((dh, n_max)) * dh ** -0.5, dtype=dtype),
                "b2": asarray(rng.standard_normal(n_max) * 0.1, dtype=dtype)}
    a = check_int("factorized", factorized)
    c = -(-n_max // a)
    return {"Wa": asarray(rng.standard_normal((d, a)) * d ** -0.5, dtype=dtype),
            "ba": asarray(rng.standard_normal(a) * 0.1 + 1.0, dtype=dtype),
            "Wb": asarray(rng.standard_normal((d, c)) * d ** -0.5, dtype=dtype),
            "bb": asarray(rng.standard_normal(c) * 0.1 + 1.0, dtype=dtype)}


def init_random(rng, *, n_max, heads, factorized=None, dtype="float64"):
    """Parameters of the random synthesizer, one table per head: R (H, L, L) or R1, R2 (H, L, k)."""
    if factorized is None:
        return {"R": asarray(rng.standard_normal((heads, n_max, n_max)), dtype=dtype)}
    kk = check_int("factorized", factorized)
    return {"R1": asarray(rng.standard_normal((heads, n_max, kk)) * kk ** -0.25, dtype=dtype),
            "R2": asarray(rng.standard_normal((heads, n_max, kk)) * kk ** -0.25, dtype=dtype)}


def setup_dense(rng, *, n, d, heads, causal=False, dtype="float64"):
    """L = N_max = n, d_h = d; not factorized."""
    return init_dense(rng, n_max=n, d=d, dtype=dtype), {}


def setup_random(rng, *, n, d, heads, causal=False, dtype="float64"):
    """L = N_max = n, one (n, n) table per head; not factorized."""
    return init_random(rng, n_max=n, heads=heads, dtype=dtype), {}


# --------------------------------------------------------------------------- figures
def _figures(out_dir, rng):
    """Random-init maps of both synthesizers next to the maps learned in 150 Adam steps
    on a toy task (output i must copy value i-1: a shift pattern), and vanilla attention."""
    import os

    from .. import viz
    from ..backend import to_numpy
    from ..nn.functional import sinusoidal_positions
    from . import full

    n, d, steps, lr = 16, 16, 150, 0.1
    xp = get_namespace(asarray(rng.standard_normal(1)))
    x = sinusoidal_positions(n, d, xp)[None, None]                    # (1, 1, N, d): positions as X
    params_d = init_dense(rng, n_max=n, d=d)
    params_r = init_random(rng, n_max=n, heads=1)
    init = {"dense": forward_pair("dense", x, params_d, rng)[1].p, "random": forward_pair("random", x, params_r, rng)[1].p}
    for kind, params in (("dense", params_d), ("random", params_r)):
        m_, v_ = {k: xp.zeros_like(p) for k, p in params.items()}, {k: xp.zeros_like(p) for k, p in params.items()}
        for t in range(1, steps + 1):
            vals = asarray(rng.standard_normal((1, 1, n, d)))
            target = xp.concatenate([xp.zeros_like(vals[..., :1, :]), vals[..., :-1, :]], axis=-2)
            out, cache = forward_pair(kind, x, params, rng, v=vals)
            grads = backward(2.0 * (out - target) / out.size, cache)
            for key in params:                                        # Adam
                m_[key] = 0.9 * m_[key] + 0.1 * grads[key]
                v_[key] = 0.999 * v_[key] + 0.001 * grads[key] ** 2
                params[key] = params[key] - lr * (m_[key] / (1 - 0.9 ** t)) / ((v_[key] / (1 - 0.999 ** t)) ** 0.5 + 1e-8)
    learned = {"dense": forward_pair("dense", x, params_d, rng)[1].p, "random": forward_pair("random", x, params_r, rng)[1].p}
    q, k = (asarray(rng.standard_normal((1, 1, n, d))) for _ in range(2))
    vanilla = full.forward(q, k, q)[1].attend.p
    mats = [init["dense"], init["random"], vanilla, learned["dense"], learned["random"]]
    titles = ["dense synth., random init", "random synth., random init", "vanilla softmax(QK^T), random q, k",
              f"dense synth., after {steps} steps (shift task)", f"random synth., after {steps} steps (shift task)"]
    fig = viz.plot_patterns([to_numpy(m) for m in mats], titles, suptitle="Synthesizer attention maps", ncols=3, weights=True)
    return [viz.save(fig, os.path.join(out_dir, "synthesizer_dense_maps.png"))]


def forward_pair(kind, x, params, rng, v=None):
    """Helper of the figures / notebook: run a synthesizer with q = k = x (and v = x unless given)."""
    v = x if v is None else v
    if kind == "dense":
        return dense_forward(x, x, v, **params)
    return random_forward(x, x, v, **params)


MECHANISM_DENSE = register(Mechanism(
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
    forward=dense_forward,
    backward=backward,
    weights=weights,
    setup=setup_dense,
    figures=_figures,
    subquadratic=False,
    sizes=("factorized",),
    summary="Attention logits predicted from each token alone by a 2-layer MLP (q plays X): softmax(MLP(q)) v.",
))

MECHANISM_RANDOM = register(Mechanism(
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
    forward=random_forward,
    backward=backward,
    weights=weights,
    setup=setup_random,
    subquadratic=False,
    sizes=("factorized",),
    summary="A learned, input-independent (N_max x N_max) logit table per head: softmax(R) v.",
))
