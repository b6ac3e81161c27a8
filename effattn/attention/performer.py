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

Numerical stabiliser. exp(W x - |x|^2/2) overflows or underflows for large
inputs. A factor that is constant over all the features of one query cancels
in out_i (numerator and denominator), so for queries we subtract
max_l (w_l . x) per query (this also makes |x|^2/2 redundant: it is constant
per query and cancels exactly, so we drop it). For keys a factor must be common
to *all* keys a query sees. The official code (google-research
``fast_attention``, lucidrains ``performer-pytorch``) subtracts the maximum
over all keys and features of the sequence. In causal mode that is a leak: key
j's feature, hence the output at position i >= j, then depends (through
rounding, and through underflow to zero) on keys that come *later* than i. So:

- non-causal: subtract the max over all unmasked keys and features (as the official code, per batch and head);
- causal: subtract a constant that depends on the features only, never on the
  data. Because w . x - |x|^2/2 = |w|^2/2 - |x - w|^2/2 <= |w|^2/2, a positive
  key feature is at most exp(max_l |w_l|^2 / 2) whatever the input (about
  exp(d/2)). We subtract c = max(0, max_l |w_l|^2/2 - 60), so a key feature
  never exceeds e^60 (sums over 65536 keys x 256 features stay finite in
  float32), and nothing is subtracted for d up to about 110. Only keys far from
  every w underflow to 0 (and then carry no weight).

Variance: one positive feature is log-normal; the estimate of exp(x . y) has
variance growing like exp(|x + y|^2) (paper Lemma 2), so inputs with large norms
(peaked attention) need many more features before the 1/sqrt(m) regime starts
(notebook 06_kernels; exercise 3 there).

The stabilisers are constants in the backward pass, which is exact because the
output does not depend on them. The official code also adds 1e-6 to every
feature; we do not (it biases the estimate), and a row whose denominator is 0
(all keys masked) gives 0.

Shapes: q (..., N, d), k (..., M, d), v (..., M, dv); key_mask (..., M): masked
keys' features are set to zero (exactly zero weight).

Complexity: O(N m d) for the features, O(N m dv) for the attention;
memory O(N m). Causal adds chunked prefix sums: O(N C (m + dv)) time,
O(N C + (N / C) m dv) memory.

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
from ..nn.kernel_attention import (kernel_attention_backward, kernel_attention_forward,
                                   kernel_attention_loop, kernel_attention_weights)
from ..registry import Mechanism, register

KERNELS = ("positive", "hyperbolic", "trig")


class FeatureCache(NamedTuple):
    x: object        # (..., N, d) scaled input
    w: object        # (m, d) or (..., m, d) projection (hyperbolic: [W; -W])
    phi: object      # (..., N, m') features
    u: object        # trig only: (..., N, m) projections W x
    h: object        # trig only: (..., N, 1) exp(|x|^2/2 - c) / sqrt(m)
    kernel: str
    is_query: bool


class PerformerCache(NamedTuple):
    kernel: object   # KernelAttentionCache
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


def _features_forward(x, w, kernel, *, is_query, key_mask=None, causal=False):
    """phi(x) of the chosen kernel with its stabiliser (see module docstring). x (..., N, d), w (.., m, d)."""
    xp = get_namespace(x, w)
    wt = w.swapaxes(-1, -2)                                    # (..., d, m)
    m = w.shape[-2]
    if kernel == "trig":
        u = x @ wt                                             # (..., N, d) @ (..., d, m) -> (..., N, m)
        sq = 0.5 * (x * x).sum(axis=-1, keepdims=True)         # (..., N, 1): |x|^2 / 2
        if is_query:
            c = sq                                             # per query: cancels exactly
        elif causal:
            c = xp.zeros_like(sq)
        else:
            c = _masked_max(sq, key_mask, axes=(-2,))
        h = xp.exp(sq - c) / math.sqrt(m)                      # (..., N, 1)
        phi = xp.concatenate([h * xp.sin(u), h * xp.cos(u)], axis=-1)   # (..., N, 2m)
        return phi, FeatureCache(x, w, phi, u, h, kernel, is_query)
    if kernel == "hyperbolic":
        w = xp.concatenate([w, -w], axis=-2)                   # (..., 2m, d)
        wt = w.swapaxes(-1, -2)
    a = x @ wt                                                 # (..., N, m'): w_l . x
    log_norm = 0.5 * math.log(w.shape[-2])                     # phi = exp(.) / sqrt(m') = exp(. - log sqrt(m'))
    if is_query:
        a -= a.max(axis=-1, keepdims=True) + log_norm          # per query; -|x|^2/2 cancels too
    else:
        a -= 0.5 * (x * x).sum(axis=-1, keepdims=True) + log_norm   # w_l . x - |x|^2 / 2
        if not causal:
            a -= _masked_max(a, key_mask, axes=(-2, -1))
        else:
            bound = 0.5 * (w * w).sum(axis=-1).max(axis=-1)    # max_l |w_l|^2 / 2: per head, data-free
            a -= xp.maximum(bound - 60.0, 0.0)[..., None, None].astype(a.dtype, copy=False)
    phi = xp.exp(a, out=a)                                     # (..., N, m')
    return phi, FeatureCache(x, w, phi, None, None, kernel, is_query)


def _masked_max(a, key_mask, axes):
    """max of a over ``axes`` among unmasked keys (0 when none): a stop-gradient constant."""
    xp = get_namespace(a)
    if key_mask is not None:
        a = xp.where(key_mask[..., :, None], a, -xp.inf)
    c = a.max(axis=axes, keepdims=True)
    return xp.where(xp.isfinite(c), c, 0.0).astype(a.dtype, copy=False)


def _features_backward(dphi, fc):
    """dx of :func:`_features_forward` (stabilisers are constants)."""
    x, w, phi, u, h, kernel, is_query = fc
    if kernel == "trig":
        m = u.shape[-1]
        ds, dc = dphi[..., :m], dphi[..., m:]
        du = h * (ds * _cos(u) - dc * _sin(u))                  # (..., N, m)
        dx = du @ w                                            # (..., N, m) @ (..., m, d) -> (..., N, d)
        if not is_query:
            dx += x * (dphi * phi).sum(axis=-1, keepdims=True)  # d h / d x = h x
        return dx
    da = dphi * phi                                            # (..., N, m')
    dx = da @ w                                                # (..., N, d)
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
    """phi(Q), phi(K) (masked keys zero), their feature caches and the input scale d^(-1/4):
    x = q / d^(1/4), y = k / d^(1/4), so that x . y = q . k / sqrt(d)."""
    d = q.shape[-1]
    w = _check_features(features, d, q.shape[:-2], q.dtype)
    scale = d ** -0.25
    phi_q, fq = _features_forward(q * scale, w, kernel, is_query=True)
    phi_k, fk = _features_forward(k * scale, w, kernel, is_query=False, key_mask=key_mask, causal=causal)
    if key_mask is not None:
        phi_k = phi_k * key_mask[..., :, None]                  # masked keys: zero features
    return phi_q, phi_k, fq, fk, scale


def forward(q, k, v, *, features, causal=False, key_mask=None, kernel="positive", chunk=128):
    """FAVOR attention. q (..., N, d), k (..., M, d), v (..., M, dv), features (m, d) or (H, m, d).

    kernel: "positive" (FAVOR+), "hyperbolic" or "trig"; chunk: block length of the
    causal prefix sums. Returns out (..., N, dv) and a :class:`PerformerCache`.
    """
    check_qkv(q, k, v, key_mask=key_mask, self_attention=bool(causal is True))
    causal = check_causal(causal, True)
    check_choice("kernel", kernel, KERNELS)
    chunk = check_int("chunk", chunk)
    phi_q, phi_k, fq, fk, scale = _phi(q, k, features, kernel, causal, key_mask)
    out, kc = kernel_attention_forward(phi_q, phi_k, v, causal=causal, chunk=chunk)
    return out, PerformerCache(kc, fq, fk, key_mask, scale)


def backward(dout, cache):
    """Returns {"q": dq, "k": dk, "v": dv} (features are random draws, not parameters)."""
    g = kernel_attention_backward(dout, cache.kernel)
    dphi_k = g["phi_k"]
    if cache.key_mask is not None:
        dphi_k = dphi_k * cache.key_mask[..., :, None]
    dq = _features_backward(g["phi_q"], cache.fq) * cache.scale
    dk = _features_backward(dphi_k, cache.fk) * cache.scale
    return {"q": dq, "k": dk, "v": g["v"]}


def weights(cache):
    """The implied matrix W = D^-1 phi(Q) phi(K)^T (causal: lower-triangular), out == W @ v."""
    return kernel_attention_weights(cache.kernel)


def feature_maps(q, k, *, features, kernel="positive", causal=False, key_mask=None):
    """phi(Q), phi(K) exactly as :func:`forward` computes them (stabilised; masked keys zero)."""
    return _phi(q, k, features, kernel, causal, key_mask)[:2]


def reference(q, k, v, *, features, causal=False, key_mask=None, kernel="positive", chunk=128):
    """Explicit O(N^2) construction: W = D^-1 phi(Q) phi(K)^T built densely, out = W V.
    ``chunk`` is accepted so that the configuration of :func:`forward` applies unchanged."""
    xp = get_namespace(q, k, v)
    phi_q, phi_k = feature_maps(q, k, features=features, kernel=kernel, causal=causal, key_mask=key_mask)
    a = phi_q @ phi_k.swapaxes(-1, -2)                          # (..., N, M)
    if causal:
        a = a * xp.tril(xp.ones(a.shape[-2:], dtype=bool))
    den = a.sum(axis=-1, keepdims=True)
    return xp.where(den != 0, a / xp.where(den != 0, den, 1.0), 0.0) @ v


def loop(q, k, v, *, features, causal=False, key_mask=None, kernel="positive"):
    """Readable per-step form (a Python loop over positions), for tests."""
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
    sizes=("chunk",),
    summary="Positive orthogonal random features estimate the softmax kernel: linear time, unbiased.",
))
