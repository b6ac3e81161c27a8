"""Performer: softmax attention approximated with random features (FAVOR+).

Choromanski, Likhosherstov, Dohan, Song, Gane, Sarlos, Hawkins, Davis,
Mohiuddin, Kaiser, Belanger, Colwell, Weller, 2021, *Rethinking Attention with
Performers*, https://arxiv.org/abs/2009.14794

Intuition: the softmax kernel is an expectation over random directions w ~ N(0, I_d),

    SM(x, y) = exp(x . y) = E_w[ exp(w . x - |x|^2/2) exp(w . y - |y|^2/2) ]      (paper Lemma 1)

so with m random w's (rows of ``features``, (m, d)) the kernel is a dot product
of *positive* random features phi(x) = exp(W x - |x|^2/2) / sqrt(m), and
attention can be computed in linear time by re-associating the products (see
:mod:`effattn.nn.kernel_attention`). With x = q / d^(1/4), y = k / d^(1/4),
x . y = q . k / sqrt(d), the usual scaled logit.

    out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j))        (paper eq. 4)
    W     = D^-1 phi(Q) phi(K)^T,   D = diag(phi(Q) phi(K)^T 1)                     (the implied matrix)

Feature maps (``kernel``), each an unbiased estimator of exp(x . y) except "trig",
which estimates exp(x . y) too but with signed features:

- "positive" (default, FAVOR+):  phi(x) = exp(W x - |x|^2/2) / sqrt(m)                    (m features)
- "hyperbolic":  phi(x) = exp(-|x|^2/2) / sqrt(2m) [exp(W x), exp(-W x)]                  (2m features, lower variance)
- "trig":        phi(x) = exp(|x|^2/2) / sqrt(m) [sin(W x), cos(W x)]                       (2m features)

Positive features never give a negative weight, and their variance vanishes
when the true kernel value does; the trigonometric ones can give negative
weights and even a zero or negative denominator phi(q)^T sum phi(k) (then the
output row blows up or, when exactly 0, is returned as 0). That is the paper's
point (§2.3), shown in notebook 06_kernels. The contract's finiteness tests run
the default, "positive".

Random features are an explicit argument: ``features`` (m, d) shared by all
heads or (H, m, d) one draw per head, made by :func:`draw_features` (orthogonal
blocks from QR of Gaussian matrices, row norms resampled from the chi(d)
distribution of a Gaussian vector's norm or fixed to sqrt(d); or i.i.d. Gaussian).
The paper redraws them during training; here that is the caller's choice.

Numerical stabiliser (positive and hyperbolic features). Write b_il = w_l . x_i
and a_jl = w_l . y_j - |y_j|^2/2, so phi(x_i)_l phi(y_j)_l = exp(b_il + a_jl) / m
(the query's exp(-|x_i|^2/2) and the 1/m are the same for every key of a query:
they cancel in out_i and are dropped). Two kinds of factor cancel too: one that
is the same for all keys a query sees, and a factor per feature l moved from
the keys to the queries (phi(Q) D, D^-1 phi(K)). The official code
(google-research ``fast_attention``, lucidrains ``performer-pytorch``
``softmax_kernel``) subtracts max_l b_il per query and, for the keys, one max
over all keys and features of the sequence (per batch and head). That
keeps each factor <= 1, but not their product: with logits ~1e4 the product for
the features a query weights most underflows, and its denominator is 0 (a row
of zeros) or subnormal (1/den = inf: most rows in float32). So:

- non-causal: s_l = max of a_jl over the *unmasked* keys, per feature (and batch,
  head); phi(k_j)_l = exp(a_jl - s_l) and phi(q_i)_l = exp(b_il + s_l - t_i) with
  t_i = max_l (b_il + s_l). Every exponent is <= 0; for the l that attains t_i
  the query feature is exactly 1, and so is the feature l of the key that
  attains s_l: den_i >= 1 whenever a key is unmasked, in float32 too.
  phi(Q) phi(K)^T = exp(b + a - t) is the official code's matrix times a factor
  per query, so W and out equal theirs up to rounding.
- masked keys: their exponent is -inf before any max or exp, so they never set
  s_l and their features are exactly 0. (Computing them and multiplying by 0
  afterwards, as before issue 11, turns a masked key above the unmasked keys'
  max into exp(.) = inf, inf * 0 = NaN: an all-NaN output; a masked key inside
  the max would underflow every real key instead.)
- causal: a max over the whole sequence is a leak: key j's feature, hence the
  output at i >= j, would depend (through rounding, and through underflow to
  zero) on keys that come *later* than i. The shift uses the past only: the
  running max s_il = max_{j<=i} a_jl and t_i = max_l (b_il + s_il),

      out_i = sum_{j<=i} sum_l exp(b_il + a_jl - t_i) v_j / (the same without v_j),   den_i >= 1.

  Chunks of C positions, :func:`_causal_forward`: (1) the keys of the chunks
  before b through a carried state relative to r_b (s at the last position
  before the chunk): factors exp(b_i + r_b - t_i), exp(a_j - r_{b+1}) and
  exp(r_b - r_{b+1}), all <= 1, exact for every row; (2) the keys of its own
  chunk, tril(phi(Q_b) phi(K_b)^T) with one reference rho_b per chunk (the
  running max at the chunk's first position, which every row of the chunk sees;
  |w_l|^2/2 >= a_jl before any key): exact to rounding for a row when both
  exponents b_il + rho_l - t_i and s_il - rho_l are <= H = 0.45 ln(largest float)
  (40 in float32, 319 in float64), as for ordinary inputs; (3) the other rows (a
  key of the chunk, up to the row, far above rho: huge logits) take the exact
  scan of their chunk, L_i = exp(s_{i-1} - s_i) L_{i-1} + exp(a_i - s_i) v_i^T,
  out_i from exp(b_i + s_i - t_i) L_i (the per-step form is :func:`loop`).
  Which path a row takes and every number it uses depend on keys j <= i only.
- trig (signed features): queries divide by exp(|x|^2/2), keys by the max of
  exp(|y|^2/2) over the unmasked keys (non-causal) or by nothing (causal); huge
  keys can overflow there. Not covered by the guarantees above.

Variance: one positive feature is log-normal; the estimate of exp(x . y) has
variance growing like exp(|x + y|^2) (paper Lemma 2), so inputs with large norms
(peaked attention) need many more features before the 1/sqrt(m) regime starts
(notebook 06_kernels; exercise 3 there).

The stabilisers (s, t, r, rho, and which rows are scanned) are constants in the
backward pass, which is exact because the output does not depend on them. The
official code also adds 1e-6 to every feature; we do not (it biases the
estimate), and a row whose denominator is 0 (all keys masked) gives 0.

Peer mapping (lucidrains ``performer_pytorch.FastAttention`` 1.1.4,
``generalized_attention=False``, fixtures ``performer__lucidrains_performer_pytorch__*``): its
``projection_matrix`` (nb_features, d) = ``features``, ``kernel="positive"``, causal or not. The
peer adds 1e-4 to every feature after its max-shift, and 1e-6 to each entry of the causal
running key sum: with q, k ~ 0.5 N(0, 1), d = 4, m = 8 that moves out by 2.9e-4 (non-causal) and
5.7e-4 (causal), gradients by up to 1.6e-3; with both set to 0 the peer agrees to 7e-16. Its
wrapper's mask only zeroes masked values (masked keys keep their weight in the denominator),
which is not ``key_mask``.

Shapes: q (..., N, d), k (..., M, d), v (..., M, dv); key_mask (..., M): masked
keys' features are exactly zero (exactly zero weight).

Decoding (:mod:`effattn.nn.decode`): the state is the causal form's carried state after the
tokens so far, bounded: S (m', dv) and z (m') of the keys relative to their running max s (m')
over the unmasked keys, and s itself, m' (dv + 2) numbers per head (:func:`init_state`). A step
(:func:`_shifted_step`, also the recurrence of :func:`loop`) raises s to max(s, a_t), rescales S
and z by exp(s_old - s_new) <= 1, adds exp(a_t - s) [v_t, 1] and reads out_t with the query
features exp(b_t + s - t_t): every factor <= 1, so huge logits stay finite, and the result equals
the causal parallel forward. :func:`prefill` runs that forward over the prompt and sets s = max_j a_j,
S = exp(A - s)^T V, z = exp(A - s)^T 1 in one product. "trig" (no stabiliser) keeps S = phi(K)^T V,
z = phi(K)^T 1 (m' (dv + 1) numbers) and steps as the Linear Transformer does.

Complexity: O(N m d) for the features, O(N m dv) for the attention;
memory O(N m). Causal adds chunked prefix sums: O(N C (m + dv)) time,
O(N C + N m + (N / C) m dv) memory; each chunk that has to be scanned exactly
adds C sequential steps of O(m dv).

Backward of a feature map (a = W x + b(x), phi = s exp(a - c)):
dphi -> da = dphi * phi -> dx = da W - x sum_l da_l (positive / hyperbolic keys:
b = -|x|^2/2); for trig, phi = h(x) [sin u, cos u] with h = exp(|x|^2/2 - c)/sqrt(m):
du = h (dphi_sin cos u - dphi_cos sin u), dx = du W + x sum(dphi * phi).
Then dq = dx / d^(1/4).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import asarray, get_namespace
from ..validate import check_bool, check_causal, check_choice, check_float_array, check_int, check_qkv
from ..nn.decode import check_step_inputs
from ..nn.decode import check_prompt
from ..nn.kernel_attention import (check_kernel_state, kernel_attention_backward,
                                   kernel_attention_forward, kernel_attention_init_state, kernel_attention_loop,
                                   kernel_attention_prefill, kernel_attention_step, kernel_attention_weights)
from ..nn.sparse import pad_axis, round_up
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register

KERNELS = ("positive", "hyperbolic", "trig")


class FeatureCache(NamedTuple):
    x: object        # (..., N, d) scaled input
    w: object        # (m, d) or (..., m, d) projection (hyperbolic: [W; -W])
    phi: object      # (..., N, m') features (None on the causal path of positive / hyperbolic features)
    u: object        # trig only: (..., N, m) projections W x
    h: object        # trig only: (..., N, 1) exp(|x|^2/2 - c) / sqrt(m)
    kernel: str
    is_query: bool


class PerformerCache(NamedTuple):
    kernel: object   # KernelAttentionCache, or CausalCache (causal, positive / hyperbolic features)
    fq: object       # FeatureCache of q
    fk: object       # FeatureCache of k
    key_mask: object
    scale: float     # d ** -0.25


def draw_features(rng, m, d, *, orthogonal=True, norms="resample", heads=None):
    """Random projection rows w_1..w_m, (m, d) or (heads, m, d), drawn on the host.

    orthogonal=True: blocks of d orthogonal directions (Gram-Schmidt of d Gaussian
    rows, i.e. the Q of a QR with positive diag(R): Haar-uniform), stacked and cut
    to m; the row norms are either resampled (``norms="resample"``: the norm of a
    fresh Gaussian vector, chi(d) distributed, so each row is marginally N(0, I_d))
    or fixed to sqrt(d) (``norms="fixed"``; the paper's "regularized" variant).
    orthogonal=False: i.i.d. N(0, I_d) rows (``norms`` is then ignored).
    Returns a NumPy array; move it with ``effattn.backend.asarray``.
    """
    m = check_int("m", m)
    d = check_int("d", d)
    check_bool("orthogonal", orthogonal)
    check_choice("norms", norms, ("resample", "fixed"))
    if heads is not None:
        heads = check_int("heads", heads)
        draws = [draw_features(rng, m, d, orthogonal=orthogonal, norms=norms) for _ in range(heads)]
        return get_namespace(draws[0]).stack(draws)                # (H, m, d)
    if not orthogonal:
        return rng.standard_normal((m, d))
    w = rng.standard_normal((-(-m // d) * d, d))                   # (blocks * d, d) Gaussian rows
    for start in range(0, w.shape[0], d):
        _gram_schmidt(w[start:start + d])                          # each block: orthonormal rows
    w = w[:m]                                                      # (m, d)
    if norms == "fixed":
        return w * math.sqrt(d)
    g = rng.standard_normal((m, d))
    return w * ((g * g).sum(axis=-1) ** 0.5)[:, None]              # chi(d)-distributed lengths


def _gram_schmidt(block):
    """Orthonormalise the rows of a (d, d) host array in place (modified Gram-Schmidt)."""
    for i in range(block.shape[0]):
        for j in range(i):
            block[i] -= (block[i] @ block[j]) * block[j]
        block[i] /= float((block[i] @ block[i]) ** 0.5)


def random_features(x, features, kernel="positive"):
    """The paper's feature map phi(x) *without* any stabiliser, so that
    E_w[phi(x) . phi(y)] = exp(x . y) exactly (for estimator studies; may overflow for large x).
    x (..., N, d) already scaled, features (m, d) -> (..., N, m) or (..., N, 2m)."""
    check_choice("kernel", kernel, KERNELS)
    xp = get_namespace(x, features)
    m = features.shape[-2]
    u = x @ features.swapaxes(-1, -2)                          # (..., N, m)
    sq = 0.5 * (x * x).sum(axis=-1, keepdims=True)             # (..., N, 1)
    if kernel == "positive":
        return xp.exp(u - sq) / math.sqrt(m)
    if kernel == "hyperbolic":
        return xp.exp(-sq) / math.sqrt(2 * m) * xp.concatenate([xp.exp(u), xp.exp(-u)], axis=-1)
    return xp.exp(sq) / math.sqrt(m) * xp.concatenate([xp.sin(u), xp.cos(u)], axis=-1)


def _log_features(xq, xk, w, kernel, key_mask):
    """Exponents of the positive features (positive / hyperbolic kernels), before any shift:

        b_il = w_l . x_i                  (queries: their -|x_i|^2/2 is a per-query constant, dropped)
        a_jl = w_l . y_j - |y_j|^2/2      (keys; -inf at masked keys, whose features are then exactly 0)

    xq (..., N, d), xk (..., M, d) already scaled by d^(-1/4). Returns b, a and the rows w'
    (hyperbolic: [W; -W]). The constant 1/m' of every product phi(x)_l phi(y)_l cancels and is dropped.
    """
    xp = get_namespace(xq, xk, w)
    if kernel == "hyperbolic":
        w = xp.concatenate([w, -w], axis=-2)                   # (..., 2m, d)
    wt = w.swapaxes(-1, -2)                                    # (..., d, m')
    b = xq @ wt                                                # (..., N, d) @ (..., d, m') -> (..., N, m')
    a = xk @ wt                                                # (..., M, m')
    a -= 0.5 * (xk * xk).sum(axis=-1, keepdims=True)
    if key_mask is not None:                                   # never in a max, exactly 0 after exp
        a = xp.where(key_mask[..., :, None], a, -xp.inf).astype(a.dtype, copy=False)
    return b, a, w


def _finite_or_zero(c):
    """A stabiliser where it is finite, 0 where it is -inf (no unmasked key): exp(-inf - 0) = 0."""
    xp = get_namespace(c)
    return xp.where(xp.isfinite(c), c, 0.0).astype(c.dtype, copy=False)


def _query_features(b, s):
    """exp(b + s - t) with t = max_l (b_l + s_l) per query: every exponent <= 0 and one is exactly 0.
    Features l with s_l = -inf (no unmasked key yet) get 0; a query with none at all gets all zeros."""
    xp = get_namespace(b, s)
    bs = xp.where(xp.isfinite(s), b + _finite_or_zero(s), -xp.inf).astype(b.dtype, copy=False)
    t = _finite_or_zero(bs.max(axis=-1, keepdims=True))        # (..., N, 1): cancels in out_i
    return xp.exp(bs - t), t


def _positive_features(b, a):
    """Non-causal stabilised features (see the module docstring):
    phi_k = exp(a - s), phi_q = exp(b + s - t), s_l = max over unmasked keys of a_jl (per feature)."""
    xp = get_namespace(a)
    s = a.max(axis=-2, keepdims=True)                          # (..., 1, m'): -inf in a column of masked keys only
    phi_k = xp.exp(a - _finite_or_zero(s))                     # (..., M, m') in [0, 1]; masked keys exactly 0
    phi_q, _ = _query_features(b, s)                           # (..., N, m') in [0, 1]
    return phi_q, phi_k


def _trig_features(x, w, *, is_query, key_mask=None, causal=False):
    """Trigonometric features with their stabiliser (signed: not covered by the guarantees above)."""
    xp = get_namespace(x, w)
    m = w.shape[-2]
    u = x @ w.swapaxes(-1, -2)                                 # (..., N, d) @ (..., d, m) -> (..., N, m)
    sq = 0.5 * (x * x).sum(axis=-1, keepdims=True)             # (..., N, 1): |x|^2 / 2
    if not is_query and key_mask is not None:                  # masked keys: h = 0, never exp of a huge value
        sq = xp.where(key_mask[..., :, None], sq, -xp.inf).astype(sq.dtype, copy=False)
    if is_query:
        c = sq                                                 # per query: cancels exactly
    elif causal:
        c = xp.zeros_like(sq)                                  # data-free: no leak (may overflow, see docstring)
    else:
        c = _finite_or_zero(sq.max(axis=-2, keepdims=True))    # over the unmasked keys
    h = xp.exp(sq - c) / math.sqrt(m)                          # (..., N, 1)
    phi = xp.concatenate([h * xp.sin(u), h * xp.cos(u)], axis=-1)   # (..., N, 2m)
    return phi, FeatureCache(x, w, phi, u, h, "trig", is_query)


def _features_backward(dphi, fc):
    """dx of the features (stabilisers are constants)."""
    x, w, phi, u, h, kernel, is_query = fc
    if kernel == "trig":
        m = u.shape[-1]
        ds, dc = dphi[..., :m], dphi[..., m:]
        du = h * (ds * _cos(u) - dc * _sin(u))                  # (..., N, m)
        dx = du @ w                                            # (..., N, m) @ (..., m, d) -> (..., N, d)
        if not is_query:
            dx += x * (dphi * phi).sum(axis=-1, keepdims=True)  # d h / d x = h x
        return dx
    return _log_features_backward(dphi * phi, x, w, is_query)


def _log_features_backward(da, x, w, is_query):
    """dx from da = dL/d(exponent): b = x w^T (queries), a = x w^T - |x|^2/2 (keys)."""
    dx = da @ w                                                # (..., N, m') @ (..., m', d) -> (..., N, d)
    if not is_query:
        dx -= x * da.sum(axis=-1, keepdims=True)               # d(-|x|^2/2)/dx = -x
    return dx


def _sin(u):
    return get_namespace(u).sin(u)


def _cos(u):
    return get_namespace(u).cos(u)


def _check_features(features, d, heads_shape, dtype):
    check_float_array("features", features, min_ndim=2)
    if features.ndim not in (2, 3) or features.shape[-1] != d:
        raise ValueError(f"features must have shape (m, {d}) or (H, m, {d}), got {tuple(features.shape)}")
    if features.ndim == 3 and (len(heads_shape) < 1 or heads_shape[-1] != features.shape[0]):
        raise ValueError(f"features (H, m, d) must have H = the head axis of q {tuple(heads_shape)}, "
                         f"got {tuple(features.shape)}")
    if features.dtype != dtype:
        raise ValueError(f"features must have dtype {dtype} like q, got {features.dtype}")
    return features     # (m, d) or (H, m, d): both broadcast against (B, H, N, d) in x @ w^T


def _phi(q, k, features, kernel, causal, key_mask):
    """phi(Q), phi(K) (masked keys exactly zero), their feature caches and the input scale d^(-1/4):
    x = q / d^(1/4), y = k / d^(1/4), so that x . y = q . k / sqrt(d). Positive / hyperbolic
    kernels: the non-causal pair (the causal forward shifts by a running max instead, :func:`_causal_forward`)."""
    d = q.shape[-1]
    w = _check_features(features, d, q.shape[:-2], q.dtype)
    scale = d ** -0.25
    xq, xk = q * scale, k * scale
    if kernel == "trig":
        phi_q, fq = _trig_features(xq, w, is_query=True)
        phi_k, fk = _trig_features(xk, w, is_query=False, key_mask=key_mask, causal=causal)   # masked: 0
        return phi_q, phi_k, fq, fk, scale
    b, a, w = _log_features(xq, xk, w, kernel, key_mask)
    phi_q, phi_k = _positive_features(b, a)
    fq = FeatureCache(xq, w, phi_q, None, None, kernel, True)
    fk = FeatureCache(xk, w, phi_k, None, None, kernel, False)
    return phi_q, phi_k, fq, fk, scale


# ----------------------------------------------------------------------------- causal, positive features
class CausalCache(NamedTuple):
    """Causal positive features, positions in chunks of C: (..., nc, C, .) arrays, padded with masked
    keys and zero queries (see "Causal" in the module docstring; e = dv + 1)."""
    qx: object       # (..., nc, C, m') exp(b_i + r_b - t_i): query i against the carried state S_b
    qf: object       # (..., nc, C, m') exp(b_i + rho_b - t_i): against the keys of its own chunk (fast part)
    kf: object       # (..., nc, C, m') exp(a_j - rho_b)
    kend: object     # (..., nc, C, m') exp(a_j - r_{b+1}): key j into the state carried out of its chunk
    carry: object    # (..., nc, m') exp(r_b - r_{b+1}): rescale of the carried state (0 while it is empty)
    tri_a: object    # (..., nc, C, C) tril(qf kf^T)
    v1: object       # (..., nc, C, e): [v, 1], numerator and denominator in one state
    s: object        # (..., nc, m', e): the carried states S_b (the keys of the chunks before b)
    safe: object     # (..., nc, C) bool: the fast in-chunk part is exact to rounding for this row
    pick: object     # indices of the (flattened) chunks with a row that is not safe, or None
    scan: object     # (q, k, decay, v1) of those chunks, (n_pick, C, .), for the exact scan; or None
    out: object      # (..., nc, C, dv)
    inv: object      # (..., nc, C, 1): 1 / den (den >= 1), 0 where no unmasked key is visible
    n: int


def _cummax(a):
    """Running max along axis -2. Maxima are exact, so any order gives the same bits: ``maximum.accumulate``
    where the backend has it, else a log-depth scan."""
    xp = get_namespace(a)
    try:
        return xp.maximum.accumulate(a, axis=-2)
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        pass
    n, shift = a.shape[-2], 1
    while shift < n:
        pad = xp.full(a.shape[:-2] + (shift, a.shape[-1]), -xp.inf, dtype=a.dtype)
        a = xp.maximum(a, xp.concatenate([pad, a[..., :n - shift, :]], axis=-2))
        shift *= 2
    return a


def _chunks(x, nc, c):
    return x.reshape(x.shape[:-2] + (nc, c, x.shape[-1]))


def _unchunk(x, n):
    return x.reshape(x.shape[:-3] + (x.shape[-3] * x.shape[-2], x.shape[-1]))[..., :n, :]


def _flat(x):
    """(..., nc, C, X) -> (P, C, X): every chunk of every (batch, head) on one axis."""
    return x.reshape((-1,) + x.shape[-2:])


def _in_chunk_states(q, k, decay, v1, g=None):
    """Scan the C steps of all chunks at once: L_i = decay_i L_{i-1} + k_i v1_i^T from L = 0 at each
    chunk start. Returns q_i . L_i per step (..., nc, C, e), or with g the gradient L_i g_i (..., nc, C, m')."""
    xp = get_namespace(q, k, v1)
    state = xp.zeros(q.shape[:-2] + (q.shape[-1], v1.shape[-1]), dtype=v1.dtype)   # (..., nc, m', e)
    kv = xp.empty_like(state)
    ys = xp.empty(q.shape[:-1] + ((v1.shape[-1],) if g is None else (q.shape[-1],)), dtype=v1.dtype)
    for p in range(q.shape[-2]):
        if p:
            xp.multiply(state, decay[..., p, :, None], out=state)
        xp.multiply(k[..., p, :, None], v1[..., p, None, :], out=kv)
        state += kv
        if g is None:
            ys[..., p, :] = (q[..., p, None, :] @ state)[..., 0, :]    # (..., nc, 1, m') @ (..., nc, m', e)
        else:
            ys[..., p, :] = (state @ g[..., p, :, None])[..., 0]       # (..., nc, m', e) @ (..., nc, e, 1)
    return ys


def _in_chunk_states_backward(q, k, decay, v1, g):
    """Gradients (dq, dk, dv1) of y = :func:`_in_chunk_states` (q, k, decay, v1) given g = dL/dy."""
    xp = get_namespace(q, k, v1, g)
    dq = _in_chunk_states(q, k, decay, v1, g)                  # dL/dq_i = L_i g_i
    lam = xp.zeros(q.shape[:-2] + (q.shape[-1], v1.shape[-1]), dtype=v1.dtype)     # dL/dL_i, from the end
    qg, dk, dv1 = xp.empty_like(lam), xp.empty_like(k), xp.empty_like(v1)
    for i in range(q.shape[-2] - 1, -1, -1):
        xp.multiply(q[..., i, :, None], g[..., i, None, :], out=qg)
        lam += qg
        dk[..., i, :] = (lam @ v1[..., i, :, None])[..., 0]    # (..., m')
        dv1[..., i, :] = (k[..., i, None, :] @ lam)[..., 0, :]  # (..., e)
        if i:
            xp.multiply(lam, decay[..., i, :, None], out=lam)  # to L_{i-1}
    return dq, dk, dv1


def _headroom(xp, dtype):
    """H, the largest exponent one factor of a fast in-chunk product may have: with H = 0.45 ln(max),
    e^(2H) m' stays finite for m' up to max^0.1 (7000 features in float32). 39.9 (float32), 319 (float64)."""
    return 0.45 * math.log(float(xp.finfo(dtype).max))


def _causal_forward(b, a, v, w, chunk):
    """out_i = sum_{j<=i} sum_l exp(b_il + a_jl - t_i) v_j / (the same without v_j) with the running
    max s_il = max_{j<=i} a_jl and t_i = max_l (b_il + s_il) (module docstring): den_i >= 1."""
    xp = get_namespace(b, a, v, w)
    n, dv = a.shape[-2], v.shape[-1]
    lead = (b[..., :1, :1] + a[..., :1, :1]).shape[:-2]        # broadcast of the (batch, head) axes
    b, a = xp.broadcast_to(b, lead + b.shape[-2:]), xp.broadcast_to(a, lead + a.shape[-2:])
    c = min(chunk, n)
    length = round_up(n, c)
    nc = length // c
    big = _headroom(xp, a.dtype)
    a = pad_axis(a, length, value=-math.inf)                   # padded keys: masked
    b = pad_axis(b, length)
    s = _cummax(a)                                             # (..., L, m') running max, -inf before any key
    sf = _finite_or_zero(s)
    bs = xp.where(xp.isfinite(s), b + sf, -xp.inf).astype(b.dtype, copy=False)
    t = _finite_or_zero(bs.max(axis=-1, keepdims=True))        # (..., L, 1): the query stabiliser
    has = _chunks(xp.isfinite(bs.max(axis=-1, keepdims=True)), nc, c)[..., 0]    # (..., nc, C): a key is visible
    bc, ac, tc, sc = _chunks(b, nc, c), _chunks(a, nc, c), _chunks(t, nc, c), _chunks(s, nc, c)
    v1 = xp.concatenate([v, xp.ones(v.shape[:-1] + (1,), dtype=v.dtype)], axis=-1)
    v1 = _chunks(xp.broadcast_to(pad_axis(v1, length), lead + (length, dv + 1)), nc, c)

    # 1. the keys of the chunks before b, against r_b = s at position bC - 1: exact for every row
    s_prev = xp.concatenate([xp.full(lead + (1, s.shape[-1]), -xp.inf, dtype=s.dtype), s[..., :-1, :]], axis=-2)
    r = s_prev[..., ::c, :]                                    # (..., nc, m'), -inf for b = 0
    r_next = sf[..., c - 1::c, :]                              # (..., nc, m'): r_{b+1}
    carry = xp.exp(r - r_next)                                 # <= 1 (0 while the state is empty)
    kend = xp.exp(ac - r_next[..., None, :])                   # <= 1: r_{b+1} is the max of its keys
    qx = xp.exp(xp.where(xp.isfinite(r)[..., None, :], bc + _finite_or_zero(r)[..., None, :],
                         -xp.inf).astype(b.dtype, copy=False) - tc)                 # <= 1
    states = [xp.zeros(lead + (s.shape[-1], dv + 1), dtype=v.dtype)]
    for i in range(nc - 1):                                    # S_{b+1} = carry_b S_b + kend_b^T v1_b
        states.append(carry[..., i, :, None] * states[-1] + kend[..., i, :, :].swapaxes(-1, -2) @ v1[..., i, :, :])
    states = xp.stack(states, axis=-3)                         # (..., nc, m', e)
    y = qx @ states                                            # (..., nc, C, m') @ (..., nc, m', e)

    # 2. the keys of its own chunk, fast: one reference rho_b per chunk, the running max at the chunk's
    #    first position (every row of the chunk sees that key), or |w_l|^2/2 >= a_jl before any key
    first = sc[..., 0, :]                                      # (..., nc, m')
    top = 0.5 * (w * w).sum(axis=-1)[..., None, :]            # a_jl = |w_l|^2/2 - |y_j - w_l|^2/2 <= |w_l|^2/2
    rho = xp.where(xp.isfinite(first), first, top).astype(a.dtype, copy=False)[..., None, :]
    zq, zk = bc + rho - tc, ac - rho                           # log qf, log kf
    safe = ((sc - rho).max(axis=-1) <= big) & (zq.max(axis=-1) <= big) | ~has
    qf, kf = xp.exp(xp.minimum(zq, big)), xp.exp(xp.minimum(zk, big))   # clamps bind on rows not safe (or
    #                                 seeing no key) and on keys that make every later row of their chunk not safe
    tri = xp.tril(xp.ones((c, c), dtype=bool))
    tri_a = xp.where(tri, qf @ kf.swapaxes(-1, -2), 0.0).astype(qf.dtype, copy=False)   # (..., nc, C, C)
    y_in = tri_a @ v1                                          # (..., nc, C, e)

    # 3. rows the fast part cannot represent (a key far above rho): the exact scan of their chunks
    pick = scan = None
    need = ~safe.all(axis=-1)                                  # (..., nc)
    if bool(need.any()):
        pick = xp.nonzero(need.reshape(-1))[0]
        sp = _flat(sc)[pick]
        spf = _finite_or_zero(sp)
        qs = xp.exp(xp.where(xp.isfinite(sp), _flat(bc)[pick] + spf, -xp.inf).astype(b.dtype, copy=False)
                    - _flat(tc)[pick])                         # exp(b_i + s_i - t_i) <= 1
        ks = xp.exp(_flat(ac)[pick] - spf)                     # exp(a_j - s_j) <= 1
        ds = xp.exp(_flat(_chunks(s_prev, nc, c))[pick] - spf)  # exp(s_{i-1} - s_i) <= 1
        vs = _flat(v1)[pick]
        scan = (qs, ks, ds, vs)
        flat_in = _flat(y_in)
        flat_in[pick] = xp.where(_flat(safe[..., None])[pick], flat_in[pick], _in_chunk_states(qs, ks, ds, vs))
        y_in = flat_in.reshape(y_in.shape)
    y += y_in
    den = y[..., dv:]
    inv = xp.where(den > 0, 1.0 / xp.where(den > 0, den, 1.0), 0.0).astype(den.dtype, copy=False)
    out = y[..., :dv] * inv
    cache = CausalCache(qx, qf, kf, kend, carry, tri_a, v1, states, safe, pick, scan, out, inv, n)
    return _unchunk(out, n), cache


def _causal_backward(dout, cc):
    """Gradients (db, da, dv) of :func:`_causal_forward` (the stabilisers r, rho, s, t are constants)."""
    xp = get_namespace(dout)
    qx, qf, kf, kend, carry, tri_a, v1, states, safe, pick, scan, out, inv, n = cc
    nc, c, dv = qx.shape[-3], qx.shape[-2], out.shape[-1]
    dout = _chunks(pad_axis(dout, nc * c), nc, c)
    dnum = dout * inv
    dden = -(dout * out).sum(axis=-1, keepdims=True) * inv
    g = xp.concatenate([dnum, dden], axis=-1)                  # (..., nc, C, e): dL/dy
    # 1. carried states
    dqx = g @ states.swapaxes(-1, -2)                          # (..., nc, C, m')
    p = qx.swapaxes(-1, -2) @ g                                # (..., nc, m', e): dL/dS_b from chunk b's rows
    grads = [p[..., nc - 1, :, :]]
    for i in range(nc - 2, -1, -1):                            # dS_b = p_b + carry_b dS_{b+1}
        grads.append(p[..., i, :, :] + carry[..., i, :, None] * grads[-1])
    grads = xp.stack(grads[::-1], axis=-3)
    gout = xp.concatenate([grads[..., 1:, :, :], xp.zeros_like(grads[..., :1, :, :])], axis=-3)  # dL/dS_{b+1}
    dkend = v1 @ gout.swapaxes(-1, -2)                         # (..., nc, C, e) @ (..., nc, e, m')
    dv1 = kend @ gout                                          # (..., nc, C, m') @ (..., nc, m', e)
    # 2. fast in-chunk part, safe rows only
    gf = xp.where(safe[..., None], g, 0.0).astype(g.dtype, copy=False)
    da_in = xp.where(xp.tril(xp.ones((c, c), dtype=bool)), gf @ v1.swapaxes(-1, -2), 0.0).astype(g.dtype, copy=False)
    dqf = da_in @ kf                                           # (..., nc, C, C) @ (..., nc, C, m')
    dkf = da_in.swapaxes(-1, -2) @ qf
    dv1 = dv1 + tri_a.swapaxes(-1, -2) @ gf
    db = dqx * qx + dqf * qf                                   # d exp(z) / dz = exp(z)
    da = dkend * kend + dkf * kf
    # 3. exact scan of the other rows
    if pick is not None:
        qs, ks, ds, vs = scan
        gs = _flat(xp.where(safe[..., None], 0.0, g).astype(g.dtype, copy=False))[pick]
        dqs, dks, dvs = _in_chunk_states_backward(qs, ks, ds, vs, gs)
        fb, fa, fv = _flat(db), _flat(da), _flat(dv1)
        fb[pick] += dqs * qs                                   # pick: distinct chunks
        fa[pick] += dks * ks
        fv[pick] += dvs
        db, da, dv1 = fb.reshape(db.shape), fa.reshape(da.shape), fv.reshape(dv1.shape)
    return _unchunk(db, n), _unchunk(da, n), _unchunk(dv1, n)[..., :dv]


def _causal_weights(cache):
    """W (..., N, N): W_ij = inv_i sum_l exp(b_il + a_jl - t_i) for j <= i (dense: small sizes only)."""
    xp = get_namespace(cache.fq.x)
    cc, w = cache.kernel, cache.fq.w
    b = cache.fq.x @ w.swapaxes(-1, -2)
    a = cache.fk.x @ w.swapaxes(-1, -2) - 0.5 * (cache.fk.x * cache.fk.x).sum(axis=-1, keepdims=True)
    if cache.key_mask is not None:
        a = xp.where(cache.key_mask[..., :, None], a, -xp.inf).astype(a.dtype, copy=False)
    s = _cummax(a)
    t = _finite_or_zero(xp.where(xp.isfinite(s), b + _finite_or_zero(s), -xp.inf).max(axis=-1, keepdims=True))
    n = cc.n
    tri = xp.tril(xp.ones((n, n), dtype=bool))[..., None]     # (N, N, 1)
    e = xp.where(tri, b[..., :, None, :] + a[..., None, :, :] - t[..., None], -xp.inf)   # (..., N, N, m')
    return xp.exp(e).sum(axis=-1) * _unchunk(cc.inv, n)


def _shifted_step(b_t, a_t, v_t, state):
    """One token of the running-max recurrence (the per-step form of :func:`_causal_forward`):

        s_t = max(s_{t-1}, a_t),   S_t = exp(s_{t-1} - s_t) S_{t-1} + exp(a_t - s_t) v_t^T   (z_t alike)
        out_t = phi_t^T S_t / phi_t^T z_t,   phi_t = exp(b_t + s_t - max_l (b_t + s_t))

    b_t, a_t (..., m') query and key exponents (a_t = -inf for a masked key), v_t (..., dv), state a
    :class:`effattn.nn.kernel_attention.KernelState` with ``shift`` = s_{t-1} (-inf before any key:
    the rescale is then exp(-inf) = 0 of a zero S). Every factor is <= 1. O(m' dv)."""
    xp = get_namespace(b_t, a_t, v_t)
    shift = xp.maximum(state.shift, a_t)                           # (..., m')
    sf = _finite_or_zero(shift)
    rescale, key = xp.exp(state.shift - sf), xp.exp(a_t - sf)
    s = state.s * rescale[..., None] + key[..., :, None] * v_t[..., None, :]    # (..., m', dv)
    z = state.z * rescale + key                                    # (..., m')
    phi, _ = _query_features(b_t, shift)
    den = (phi * z).sum(axis=-1, keepdims=True)
    out = (phi[..., None, :] @ s)[..., 0, :] * xp.where(den > 0, 1.0 / xp.where(den > 0, den, 1.0), 0.0)
    return out, state._replace(s=s, z=z, shift=shift, t=state.t + 1)


def _causal_loop(b, a, v):
    """The readable per-step form of :func:`_causal_forward` (the RNN view with a running max):
    :func:`_shifted_step` once per position from the empty state."""
    xp = get_namespace(b, a, v)
    lead = (b[..., :1, :1] + a[..., :1, :1] + v[..., :1, :1]).shape[:-2]
    state = kernel_attention_init_state(lead, a.shape[-1], v.shape[-1], dtype=v.dtype, shifted=True, xp=xp)
    outs = []
    for i in range(a.shape[-2]):
        o, state = _shifted_step(b[..., i, :], a[..., i, :], v[..., i, :], state)
        outs.append(o)
    return xp.stack(outs, axis=-2)


def _causal_positive(q, k, v, features, kernel, key_mask, chunk):
    """The causal forward of positive / hyperbolic features: out, the PerformerCache and the key
    exponents a (..., N, m') (-inf at masked keys), which :func:`prefill` turns into the state."""
    d = q.shape[-1]
    w = _check_features(features, d, q.shape[:-2], q.dtype)
    scale = d ** -0.25
    xq, xk = q * scale, k * scale
    b, a, w = _log_features(xq, xk, w, kernel, key_mask)
    out, cc = _causal_forward(b, a, v, w, chunk)
    fq = FeatureCache(xq, w, None, None, None, kernel, True)
    fk = FeatureCache(xk, w, None, None, None, kernel, False)
    return out, PerformerCache(cc, fq, fk, key_mask, scale), a


# ----------------------------------------------------------------------------- the contract
@forward_of("performer")
def forward(q, k, v, *, features, causal=False, key_mask=None, kernel="positive", chunk=128):
    """FAVOR attention. q (..., N, d), k (..., M, d), v (..., M, dv), features (m, d) or (H, m, d).

    kernel: "positive" (FAVOR+), "hyperbolic" or "trig"; chunk: block length of the
    causal prefix sums. Returns out (..., N, dv) and a :class:`PerformerCache`.
    """
    check_qkv(q, k, v, key_mask=key_mask, self_attention=bool(causal is True))
    causal = check_causal(causal, True)
    check_choice("kernel", kernel, KERNELS)
    chunk = check_int("chunk", chunk)
    if causal and kernel != "trig":
        return _causal_positive(q, k, v, features, kernel, key_mask, chunk)[:2]
    phi_q, phi_k, fq, fk, scale = _phi(q, k, features, kernel, causal, key_mask)
    out, kc = kernel_attention_forward(phi_q, phi_k, v, causal=causal, chunk=chunk)
    return out, PerformerCache(kc, fq, fk, key_mask, scale)


@backward_of("performer")
def backward(dout, cache):
    """Returns {"q": dq, "k": dk, "v": dv} (features are random draws, not parameters)."""
    if isinstance(cache.kernel, CausalCache):
        db, da, dv = _causal_backward(dout, cache.kernel)
        dq = _log_features_backward(db, cache.fq.x, cache.fq.w, True) * cache.scale
        dk = _log_features_backward(da, cache.fk.x, cache.fk.w, False) * cache.scale
        return {"q": dq, "k": dk, "v": dv}
    g = kernel_attention_backward(dout, cache.kernel)
    dphi_k = g["phi_k"]
    if cache.key_mask is not None:
        xp = get_namespace(dphi_k)
        dphi_k = xp.where(cache.key_mask[..., :, None], dphi_k, 0.0).astype(dphi_k.dtype, copy=False)
    dq = _features_backward(g["phi_q"], cache.fq) * cache.scale
    dk = _features_backward(dphi_k, cache.fk) * cache.scale
    return {"q": dq, "k": dk, "v": g["v"]}


@reads_cache("performer")
def weights(cache):
    """The implied matrix W = D^-1 phi(Q) phi(K)^T (causal: lower-triangular), out == W @ v."""
    if isinstance(cache.kernel, CausalCache):
        return _causal_weights(cache)
    return kernel_attention_weights(cache.kernel)


def feature_maps(q, k, *, features, kernel="positive", causal=False, key_mask=None):
    """phi(Q), phi(K) stabilised (masked keys zero), as the non-causal :func:`forward` computes them
    (and the causal one for "trig"). tril(phi(Q) phi(K)^T), normalised per row, is the causal W too;
    the causal forward of positive features shifts by a running max instead (same W, no leak)."""
    return _phi(q, k, features, kernel, causal, key_mask)[:2]


def reference(q, k, v, *, features, causal=False, key_mask=None, kernel="positive", chunk=128):
    """Explicit O(N^2) construction of W, out = W V. Positive / hyperbolic: in log space,
    W_ij = softmax_j log sum_l exp(b_il + a_jl) (finite at any scale; O(N M m) memory);
    trig: W = D^-1 phi(Q) phi(K)^T from :func:`feature_maps`.
    ``chunk`` is accepted so that the configuration of :func:`forward` applies unchanged."""
    xp = get_namespace(q, k, v)
    tri = xp.tril(xp.ones((q.shape[-2], k.shape[-2]), dtype=bool)) if causal else None
    if kernel == "trig":
        phi_q, phi_k = feature_maps(q, k, features=features, kernel=kernel, causal=causal, key_mask=key_mask)
        a = phi_q @ phi_k.swapaxes(-1, -2)                      # (..., N, M)
        if causal:
            a = a * tri
        den = a.sum(axis=-1, keepdims=True)
        return xp.where(den != 0, a / xp.where(den != 0, den, 1.0), 0.0) @ v
    scale = q.shape[-1] ** -0.25
    w = _check_features(features, q.shape[-1], q.shape[:-2], q.dtype)
    b, a, _ = _log_features(q * scale, k * scale, w, kernel, key_mask)
    e = b[..., :, None, :] + a[..., None, :, :]                 # (..., N, M, m'): log of one product
    if causal:
        e = xp.where(tri[..., None], e, -xp.inf)
    top = _finite_or_zero(e.max(axis=-1, keepdims=True))
    total = xp.exp(e - top).sum(axis=-1)                        # (..., N, M): 0 for a masked or future key
    logits = xp.where(total > 0, xp.log(xp.where(total > 0, total, 1.0)) + top[..., 0], -xp.inf)
    top = _finite_or_zero(logits.max(axis=-1, keepdims=True))
    p = xp.exp(logits - top)
    den = p.sum(axis=-1, keepdims=True)
    return xp.where(den > 0, p / xp.where(den > 0, den, 1.0), 0.0) @ v


def loop(q, k, v, *, features, causal=False, key_mask=None, kernel="positive"):
    """Readable per-step form (a Python loop over positions), for tests."""
    if causal and kernel != "trig":
        scale = q.shape[-1] ** -0.25
        w = _check_features(features, q.shape[-1], q.shape[:-2], q.dtype)
        b, a, _ = _log_features(q * scale, k * scale, w, kernel, key_mask)
        return _causal_loop(b, a, v)
    phi_q, phi_k = feature_maps(q, k, features=features, kernel=kernel, causal=causal, key_mask=key_mask)
    return kernel_attention_loop(phi_q, phi_k, v, causal=causal)


def default_features(d):
    """m ~ d log d is the paper's guidance; we use m = max(2 d, 8) (128 for d = 64; the paper uses 256)."""
    return max(2 * d, 8)


def setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """One orthogonal draw of m = max(2d, 8) features per head ((H, m, d)); causal chunk below small n."""
    feats = asarray(draw_features(rng, default_features(d), d, heads=heads), dtype=dtype)
    config = {"features": feats}
    if causal:
        config["chunk"] = max(2, min(128, n // 3))
    return {}, config


# ----------------------------------------------------------------------------- decoding
def init_state(*, lead, d, dv, dtype="float64", features, kernel="positive", chunk=128):
    """The empty decoder state (:class:`effattn.nn.kernel_attention.KernelState`) for inputs with
    leading axes ``lead`` (batch, heads), with :func:`forward`'s ``features`` (m, d) or (H, m, d),
    ``kernel`` and ``chunk`` (the prefill's parallel pass). It holds, per head, with m' = m
    ("positive") or 2m ("hyperbolic", "trig") features:

    - positive / hyperbolic: S (m', dv) and z (m') of the keys so far *relative to* their running
      max s (m') over the unmasked keys, S = sum_j exp(a_j - s) v_j^T (a_j = w . y_j - |y_j|^2/2),
      and s itself: m' (dv + 2) numbers, bounded. A step rescales S and z by exp(s_old - s_new)
      when the max grows, so every factor stays <= 1 (module docstring, "causal").
    - trig: S = phi(K)^T V and z = phi(K)^T 1 of the signed features (no stabiliser): m' (dv + 1).
    """
    lead = tuple(check_int("lead", x) for x in lead)
    d, dv = check_int("d", d), check_int("dv", dv)
    check_choice("kernel", kernel, KERNELS)
    chunk = check_int("chunk", chunk)
    w = _check_features(features, d, lead, dtype)
    m = w.shape[-2] * (1 if kernel == "positive" else 2)
    return kernel_attention_init_state(lead, m, dv, dtype=dtype, name="performer", shifted=kernel != "trig",
                                       xp=get_namespace(w),
                                       config={"features": w, "kernel": kernel, "chunk": chunk, "d": d})


def prefill(q, k, v, state, *, key_mask=None):
    """The prompt q, k (..., T, d), v (..., T, dv) in one pass: its rows from the causal chunked
    :func:`forward`, and the state after it from the same features: positive / hyperbolic
    s = max_j a_j over the unmasked keys, S = exp(A - s)^T V, z = exp(A - s)^T 1; trig
    S = phi(K)^T V, z = phi(K)^T 1. ``state`` must be fresh. Returns (out (..., T, dv), state)."""
    check_kernel_state(state, "performer")
    if state.t != 0:
        raise ValueError(f"prefill needs a fresh state (from init_state), this one is at position {state.t}")
    cfg = state.config
    check_prompt(q, k, v, state.s.shape[:-2], cfg["d"], state.s.shape[-1])
    if cfg["kernel"] == "trig":
        out, cache = forward(q, k, v, features=cfg["features"], causal=True, key_mask=key_mask, kernel="trig",
                             chunk=cfg["chunk"])
        return out, kernel_attention_prefill(cache.kernel, state)
    check_qkv(q, k, v, key_mask=key_mask, self_attention=True)
    out, _, a = _causal_positive(q, k, v, cfg["features"], cfg["kernel"], key_mask, cfg["chunk"])
    xp = get_namespace(a)
    a = xp.broadcast_to(a, state.shift.shape[:-1] + a.shape[-2:])
    shift = a.max(axis=-2)                                         # (..., m'): -inf where every key is masked
    key = xp.exp(a - _finite_or_zero(shift)[..., None, :])         # (..., T, m'), <= 1; masked keys 0
    s = key.swapaxes(-1, -2) @ v                                   # (..., m', T) @ (..., T, dv) -> (..., m', dv)
    return out, state._replace(s=s, z=key.sum(axis=-2), shift=shift, t=q.shape[-2])


def step(q_t, k_t, v_t, state, *, key_mask_t=None):
    """One causal decoding step: q_t, k_t (..., d), v_t (..., dv), key_mask_t (...) bool or None
    (False: token t is no key for anyone). Returns (out_t (..., dv), state), equal to row t of the
    causal parallel :func:`forward`. O(m' (d + dv)) whatever the position."""
    check_kernel_state(state, "performer")
    cfg = state.config
    lead, dv = state.s.shape[:-2], state.s.shape[-1]
    check_step_inputs(q_t, k_t, v_t, key_mask_t, lead, cfg["d"], dv)
    if q_t.dtype != state.s.dtype:
        raise ValueError(f"q_t must have the state's dtype {state.s.dtype}, got {q_t.dtype}")
    xp = get_namespace(q_t, k_t, v_t)
    km = None if key_mask_t is None else xp.broadcast_to(key_mask_t, lead)[..., None]       # (..., 1)
    w, scale = cfg["features"], cfg["d"] ** -0.25
    xq, xk = (q_t * scale)[..., None, :], (k_t * scale)[..., None, :]                       # (..., 1, d)
    if cfg["kernel"] == "trig":
        phi_q, _ = _trig_features(xq, w, is_query=True)
        phi_k, _ = _trig_features(xk, w, is_query=False, key_mask=km, causal=True)          # masked: 0
        return kernel_attention_step(phi_q[..., 0, :], phi_k[..., 0, :], v_t, state)
    b, a, _ = _log_features(xq, xk, w, cfg["kernel"], km)
    return _shifted_step(b[..., 0, :], a[..., 0, :], v_t, state)


MECHANISM = register(Mechanism(
    name="performer",
    title="Performer (FAVOR+)",
    citation="Choromanski et al., 2021",
    url="https://arxiv.org/abs/2009.14794",
    classes=("KR",),
    complexity="O(N)",
    causal=True,
    exact=False,
    kind="kernel",
    notebook="06_kernels",
    forward=forward,
    backward=backward,
    weights=weights,
    setup=setup,
    reference=reference,
    init_state=init_state,
    prefill=prefill,
    step=step,
    bounded_state=True,
    sizes=("chunk",),
    summary="Positive orthogonal random features estimate the softmax kernel: linear time, unbiased.",
))
