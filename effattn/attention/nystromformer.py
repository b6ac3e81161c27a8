"""Nyströmformer: softmax attention through the Nyström method with landmarks.

Xiong, Zeng, Chakraborty, Tan, Fung, Li, Singh, 2021, *Nyströmformer: A
Nyström-Based Algorithm for Approximating Self-Attention*,
https://arxiv.org/abs/2102.03902

Intuition: a (nearly) low-rank matrix is determined by a few of its rows and
columns. Pick m "landmark" queries Q~ and keys K~ (segment means of Q and K),
compute three small softmax kernels and glue them with a pseudo-inverse:

    F = softmax(Q K~^T / sqrt(d))        (N, m)
    A = softmax(Q~ K~^T / sqrt(d))       (m, m)
    B = softmax(Q~ K^T / sqrt(d))        (m, M)
    softmax(Q K^T / sqrt(d)) V  ~=  F A^+ (B V)                           (paper eq. 13-14)

A^+ is approximated by the iterative Moore-Penrose scheme (Razavi et al. 2014;
paper eq. 15), 6 iterations by default:

    Z_0 = A^T / (||A||_1 ||A||_inf)
    Z_{j+1} = 1/4 Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j)))

With m < N, A is often nearly singular (landmarks of smooth inputs are nearly
collinear); then *more* iterations approach the exact A^+, whose huge entries
amplify the mismatch between F, A and B: the truncated iteration acts as a
regularised inverse (notebook 05_low_rank shows the error growing from 6 to 30
iterations). With m = N and enough iterations the result is exact softmax
attention (F = A = B = P, P P^+ P = P).

Norms: ||A||_1 = max column sum, ||A||_inf = max row sum (= 1 for a softmax).
We take both per (batch, head). The official code (mlpen/Nystromformer,
ported to HF ``transformers``) with its default ``init_option="original"``
uses 1 / max(column sums) with the max taken over the *whole batch* (all heads
and batch elements together; ||A||_inf = 1 is implied), lucidrains'
``nystrom-attention`` uses max(row sums) * max(column sums), also over the
whole batch. A batch-wide max couples the batch elements (one sequence's output
then depends on the others); per (batch, head) keeps each one independent and
gives the same result for a batch of one, up to the factor max row sum = 1.

Landmarks: position i belongs to segment floor(i m / N), so the m segments
have floor(N/m) or ceil(N/m) positions and none is empty (m <= N is required).
Q~_j, K~_j are the means over the segment's *unmasked* positions (masked
positions are excluded from both means, as in lucidrains' implementation, so
what sits at a padded position never reaches a real output; a segment whose
positions are all masked gets a zero landmark). For cross-attention (M != N)
``key_mask`` describes the keys only and Q~ averages every query. When m divides
N this is the official segment mean (reshape to (m, N/m) and average); the
official code requires that divisibility, lucidrains pads at the front.

Skip connection (optional, as the official code's ``conv_kernel_size``): a
depthwise convolution of V along the sequence, one filter per head,
``conv_w`` (H, conv_kernel): out += conv(V)_i = sum_t conv_w[h, t] V_{i + t - conv_kernel // 2}
(zero padding; the official Conv2d with padding kernel // 2). It is linear in
V, so the implied matrix is W = F Z B + C with C the banded (Toeplitz) matrix
of the filter, and out == W @ v still holds. Masked positions are zeroed in V
before the convolution.

Peer mapping (lucidrains ``nystrom_attention.NystromAttention`` 0.0.14, fixtures
``nystromformer__lucidrains_nystrom_attention__*``): num_landmarks = ``landmarks``,
pinv_iterations = ``iterations``, ``res_conv.weight[:, 0, :, 0]`` = ``conv_w`` (H, kernel),
residual_conv_kernel = ``conv_kernel`` (odd). The peer pads at the front to a multiple of m:
without a mask those are ordinary zero tokens (equal to this module on the front-padded q, k,
v); with a mask they are masked and the peer averages only unmasked queries and keys into the
landmarks, as here. Its 1e-8 in the landmark divisor is its constructor's ``eps`` (0 in the
fixtures). Its pseudo-inverse start uses max row sum x max column sum over the whole batch:
equal for B = H = 1 (out and the gradients of q, k, v, conv_w within 1.8e-15, N = 16 and 14,
with and without a key mask); at B = H = 2 the batch-wide start moves out by 2e-3.

Causal decoding is impossible (landmarks average over the whole segment,
future positions included): ``causal=True`` raises ValueError.

Complexity: O(N m d + N m dv + m^3 iterations) time, O(N m) memory; linear in N
for fixed m.

Backward, by hand:
- out = F (Z (B V)): through :func:`effattn.nn.sparse.attend_backward` for F
  (values = Z B V) and for B (values = V), giving dQ, dK~, d(ZBV), dQ~, dK, dV;
  dZ = d(ZBV) (BV)^T, d(BV) = Z^T d(ZBV).
- Each iteration (T = A Z, U1 = 7I - T, U2 = 15I - T U1, U3 = 13I - T U2, Z' = Z U3 / 4):
  dZ = dZ' U3^T / 4,  dU3 = Z^T dZ' / 4,  dT = -dU3 U2^T - dU2 U1^T - dU1,
  dU2 = -T^T dU3,  dU1 = -T^T dU2,  then dA += dT Z^T,  dZ += A^T dT.
- Z_0 = alpha A^T, alpha = 1 / (c r), c = max col sum, r = max row sum:
  dA += alpha dZ_0^T + dc e 1_{col c}^T... (d alpha = <dZ_0, A^T>, dc = -d alpha alpha / c at the
  argmax column, likewise dr at the argmax row: the max is differentiated at its argmax).
- A = softmax(...): softmax backward; landmarks are linear: dQ += Avg^T dQ~.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import asarray, get_namespace
from ..validate import check_causal, check_float_array, check_int, check_qkv, check_scale
from ..nn.functional import softmax_backward, softmax_forward
from ..nn.sparse import attend_backward, attend_forward
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register

WHY_NOT_CAUSAL = ("Nystromformer's landmarks are means over segments that include future positions, "
                  "so a query cannot be kept from seeing later keys")


class NystromCache(NamedTuple):
    f: object        # AttendCache of F (Q, K~, values Z B V)
    b: object        # AttendCache of B (Q~, K, V, masked)
    a: object        # (..., m, m) A
    zs: list         # [Z_0, ..., Z_T] each (..., m, m)
    alpha: object    # (..., 1, 1)
    ic: object       # (..., m) one-hot argmax column of A's column sums
    ir: object       # (..., m) one-hot argmax row of A's row sums
    csum: object     # (..., 1, 1) max column sum
    rsum: object     # (..., 1, 1) max row sum
    bv: object       # (..., m, dv)
    avg_q: object    # (..., m, N) segment averaging matrix for queries (masked positions excluded)
    avg_k: object    # (..., m, M) for keys (masked positions excluded)
    scale: float
    conv: object     # None or (conv_w (H, kernel), v padded (..., N + kernel - 1, dv), pad, key_mask)


def segment_averages(n, m, xp, dtype, mask=None):
    """(…, m, n) matrix whose row j averages segment j = {i : floor(i m / n) = j} over unmasked i."""
    seg = (xp.arange(n) * m) // n                                  # (n,) segment of each position
    onehot = (seg[None, :] == xp.arange(m)[:, None]).astype(dtype)  # (m, n)
    if mask is not None:
        onehot = onehot * mask[..., None, :]                       # (..., m, n)
    counts = onehot.sum(axis=-1, keepdims=True)
    return onehot / xp.maximum(counts, 1.0)


def pinv_forward(a, iterations):
    """Iterative Moore-Penrose pseudo-inverse of a (..., m, m) (Razavi et al. 2014; paper eq. 15):
    Z_0 = A^T / (||A||_1 ||A||_inf), then ``iterations`` steps
    Z_{j+1} = 1/4 Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j))); norms per (batch, head).

    Returns Z (..., m, m) and the cache of :func:`pinv_backward`
    (Z_0..Z_T, alpha = 1 / (c r), one-hot argmax column / row, c = ||A||_1, r = ||A||_inf)."""
    xp = get_namespace(a)
    m = a.shape[-1]
    colsum = a.sum(axis=-2)                                        # (..., m)
    rowsum = a.sum(axis=-1)                                        # (..., m)
    ic = (xp.arange(m) == colsum.argmax(axis=-1)[..., None]).astype(a.dtype)   # (..., m) one-hot
    ir = (xp.arange(m) == rowsum.argmax(axis=-1)[..., None]).astype(a.dtype)
    c = colsum.max(axis=-1)[..., None, None]                       # ||A||_1
    r = rowsum.max(axis=-1)[..., None, None]                       # ||A||_inf
    alpha = 1.0 / (c * r)
    eye = xp.eye(m, dtype=a.dtype)
    z = alpha * a.swapaxes(-1, -2)                                 # Z_0 = A^T / (||A||_1 ||A||_inf)
    zs = [z]
    for _ in range(iterations):
        t = a @ z                                                  # A Z_j
        z = 0.25 * z @ (13 * eye - t @ (15 * eye - t @ (7 * eye - t)))
        zs.append(z)
    return z, (zs, alpha, ic, ir, c, r)


def pinv_backward(dz, a, pcache):
    """dA from dZ through every iteration of :func:`pinv_forward` and its start Z_0 = alpha A^T
    (the norms' max differentiated at its argmax; derivation in the module docstring)."""
    zs, alpha, ic, ir, c, r = pcache
    xp = get_namespace(a)
    eye = xp.eye(a.shape[-1], dtype=a.dtype)
    at = a.swapaxes(-1, -2)
    da = xp.zeros_like(a)
    for z in reversed(zs[:-1]):
        t = a @ z
        u1 = 7 * eye - t
        u2 = 15 * eye - t @ u1
        u3 = 13 * eye - t @ u2
        du3 = 0.25 * z.swapaxes(-1, -2) @ dz
        dz_new = 0.25 * dz @ u3.swapaxes(-1, -2)
        tt = t.swapaxes(-1, -2)
        du2 = -(tt @ du3)
        du1 = -(tt @ du2)
        dt = -(du3 @ u2.swapaxes(-1, -2)) - du2 @ u1.swapaxes(-1, -2) - du1
        da += dt @ z.swapaxes(-1, -2)
        dz = dz_new + at @ dt
    # Z_0 = alpha A^T
    dalpha = (dz * at).sum(axis=(-2, -1), keepdims=True)
    da += alpha * dz.swapaxes(-1, -2)
    dc = -dalpha * alpha / c                                       # (..., 1, 1)
    dr = -dalpha * alpha / r
    da += dc * ic[..., None, :] + dr * ir[..., :, None]
    return da


def _conv_forward(v, w, kernel):
    """Depthwise conv along the sequence: v (..., H, N, dv), w (H, kernel)."""
    n = v.shape[-2]
    p = kernel // 2
    xp = get_namespace(v, w)
    pad = [(0, 0)] * v.ndim
    pad[-2] = (p, kernel - 1 - p)
    vp = xp.pad(v, pad)                                            # (..., N + kernel - 1, dv)
    out = xp.zeros_like(v)
    for t in range(kernel):                                        # a loop over filter taps, not tokens
        out += w[:, t, None, None] * vp[..., t:t + n, :]
    return out, (w, vp, p)


def _conv_backward(dout, conv):
    w, vp, p = conv
    xp = get_namespace(dout)
    n = dout.shape[-2]
    kernel = w.shape[-1]
    dvp = xp.zeros_like(vp)
    dw = xp.zeros_like(w)
    axes = tuple(i for i in range(dout.ndim) if i != dout.ndim - 3)
    for t in range(kernel):
        dvp[..., t:t + n, :] += w[:, t, None, None] * dout
        dw[:, t] = (dout * vp[..., t:t + n, :]).sum(axis=axes)
    return dvp[..., p:p + n, :], dw


@forward_of("nystromformer")
def forward(q, k, v, *, conv_w=None, causal=False, key_mask=None, landmarks=64, iterations=6,
            conv_kernel=None, scale=None):
    """Nyström attention. q (..., N, d), k (..., M, d), v (..., M, dv); landmarks m <= min(N, M);
    conv_w (H, conv_kernel) optional depthwise skip on V (needs N == M).
    Returns out (..., N, dv) and a :class:`NystromCache`."""
    n, mlen, d, _ = check_qkv(q, k, v, key_mask=key_mask)
    check_causal(causal, False, WHY_NOT_CAUSAL)
    m = check_int("landmarks", landmarks)
    iterations = check_int("iterations", iterations)
    if m > min(n, mlen):
        raise ValueError(f"landmarks must be <= the sequence length ({min(n, mlen)}), got {m}")
    if conv_kernel is not None:
        conv_kernel = check_int("conv_kernel", conv_kernel)
    if (conv_w is None) != (conv_kernel is None):
        raise ValueError("conv_w and conv_kernel must be given together (conv_w (H, conv_kernel))")
    if conv_w is not None:
        check_float_array("conv_w", conv_w, ndim=2)
        if q.ndim < 3:
            raise ValueError(f"conv_w (H, conv_kernel) is per head: q needs a head axis (..., H, N, d), "
                             f"got q {tuple(q.shape)}")
        heads = q.shape[-3]
        if tuple(conv_w.shape) != (heads, conv_kernel) or conv_w.dtype != q.dtype:
            raise ValueError(f"conv_w must have shape (H={heads}, conv_kernel={conv_kernel}) and dtype {q.dtype}, "
                             f"got {tuple(conv_w.shape)} {conv_w.dtype}")
        if n != mlen:
            raise ValueError(f"conv_w (skip convolution on V) needs N == M, got N={n}, M={mlen}")
    scale = check_scale(scale, d)
    xp = get_namespace(q, k, v)
    q_mask = key_mask if n == mlen else None                       # self-attention: padded queries too
    avg_q = segment_averages(n, m, xp, q.dtype, q_mask)            # (m, N) or (..., m, N)
    avg_k = segment_averages(mlen, m, xp, q.dtype, key_mask)       # (m, M) or (..., m, M)
    qt = avg_q @ q                                                 # (m, N) @ (..., N, d) -> (..., m, d): Q~
    kt = avg_k @ k                                                 # (..., m, d): K~
    s_a = (qt * scale) @ kt.swapaxes(-1, -2)                       # (..., m, m)
    a, _, _ = softmax_forward(s_a, inplace=True)                   # A = softmax(Q~ K~^T / sqrt(d))
    z, pcache = pinv_forward(a, iterations)                        # Z ~ A^+
    allowed = None if key_mask is None else key_mask[..., None, :]
    bv, _, b_cache = attend_forward(qt, k, v, allowed, scale)      # B V = softmax(Q~ K^T / sqrt(d)) V  (..., m, dv)
    zbv = z @ bv                                                   # (..., m, m) @ (..., m, dv) -> (..., m, dv)
    out, _, f_cache = attend_forward(q, kt, zbv, None, scale)      # F (Z B V)  (..., N, dv)
    conv = None
    if conv_w is not None:
        vm = v if key_mask is None else v * key_mask[..., :, None]
        cout, conv = _conv_forward(vm, conv_w, conv_kernel)
        out = out + cout
    zs, alpha, ic, ir, c, r = pcache
    return out, NystromCache(f_cache, b_cache, a, zs, alpha, ic, ir, c, r, bv, avg_q, avg_k, scale,
                             None if conv is None else (conv, key_mask))


@backward_of("nystromformer")
def backward(dout, cache):
    """Returns {"q", "k", "v"} and "conv_w" when the skip convolution is used."""
    f_cache, b_cache, a, zs, alpha, ic, ir, c, r, bv, avg_q, avg_k, scale, conv = cache
    gf = attend_backward(dout, f_cache)                            # dQ, dK~, d(ZBV)
    dzbv = gf["v"]
    z = zs[-1]
    dz = dzbv @ bv.swapaxes(-1, -2)                                # (..., m, m)
    dbv = z.swapaxes(-1, -2) @ dzbv                                # (..., m, dv)
    gb = attend_backward(dbv, b_cache)                             # dQ~, dK, dV
    da = pinv_backward(dz, a, (zs, alpha, ic, ir, c, r))
    ds_a = softmax_backward(da, (a, -1))                           # (..., m, m)
    qt, kt = b_cache.q, f_cache.k
    dqt = gb["q"] + (ds_a @ kt) * scale                            # (..., m, d)
    dkt = gf["k"] + (ds_a.swapaxes(-1, -2) @ qt) * scale
    dq = gf["q"] + avg_q.swapaxes(-1, -2) @ dqt                    # (..., N, d)
    dk = gb["k"] + avg_k.swapaxes(-1, -2) @ dkt                    # (..., M, d)
    grads = {"q": dq, "k": dk, "v": gb["v"]}
    if conv is not None:
        cc, key_mask = conv
        dvm, dw = _conv_backward(dout, cc)
        if key_mask is not None:
            dvm = dvm * key_mask[..., :, None]
        grads["v"] = grads["v"] + dvm
        grads["conv_w"] = dw
    return grads


@reads_cache("nystromformer")
def weights(cache):
    """The implied matrix W = F Z B + C (C the banded skip-convolution matrix, zero at masked keys):
    out == W @ v. (..., N, M), dense: small sizes only."""
    f_cache, b_cache = cache.f, cache.b
    w = f_cache.p @ cache.zs[-1] @ b_cache.p                      # (..., N, m) (m, m) (m, M) -> (..., N, M)
    if cache.conv is not None:
        (cw, vp, p), key_mask = cache.conv
        xp = get_namespace(w)
        n = w.shape[-1]
        kernel = cw.shape[-1]
        diff = xp.arange(n)[None, :] - xp.arange(n)[:, None] + p   # (N, N): tap t with j = i + t - p
        valid = (diff >= 0) & (diff < kernel)
        band = xp.where(valid, cw[:, xp.clip(diff, 0, kernel - 1)], 0.0)   # (H, N, N)
        if key_mask is not None:
            band = band * key_mask[..., None, :]
        w = w + band
    return w


def reference(q, k, v, *, conv_w=None, causal=False, key_mask=None, landmarks=64, iterations=6,
              conv_kernel=None, scale=None):
    """The paper's formula as a dense oracle: out = (F Z B + C) V with the landmarks built
    segment by segment, the N x M matrix formed explicitly and C the dense banded conv matrix."""
    check_causal(causal, False, WHY_NOT_CAUSAL)
    xp = get_namespace(q, k, v)
    n, mlen, d = q.shape[-2], k.shape[-2], q.shape[-1]
    m = landmarks
    scale = check_scale(scale, d)

    def means(x, length, mask):
        rows = []
        for j in range(m):                                     # segment j: floor(i m / length) == j
            lo, hi = -(-j * length // m), -(-(j + 1) * length // m)
            seg = x[..., lo:hi, :]
            w = xp.ones(seg.shape[:-1] + (1,), dtype=x.dtype) if mask is None else \
                xp.broadcast_to(mask[..., lo:hi, None], seg.shape[:-1] + (1,)).astype(x.dtype)
            rows.append((seg * w).sum(axis=-2) / xp.maximum(w.sum(axis=-2), 1.0))
        return xp.stack(rows, axis=-2)                        # (..., m, d)

    qt, kt = means(q, n, key_mask if n == mlen else None), means(k, mlen, key_mask)
    allowed = None if key_mask is None else key_mask[..., None, :]
    f = softmax_forward((q * scale) @ kt.swapaxes(-1, -2))[0]          # (..., N, m)
    a = softmax_forward((qt * scale) @ kt.swapaxes(-1, -2))[0]         # (..., m, m)
    b = softmax_forward((qt * scale) @ k.swapaxes(-1, -2), allowed)[0]  # (..., m, M)
    z = a.swapaxes(-1, -2) / (a.sum(axis=-2).max(axis=-1)[..., None, None] * a.sum(axis=-1).max(axis=-1)[..., None, None])
    eye = xp.eye(m, dtype=q.dtype)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    w = f @ z @ b                                              # (..., N, M)
    if conv_w is not None:
        i, j = xp.arange(n)[:, None], xp.arange(mlen)[None, :]
        band = xp.zeros((conv_w.shape[0], n, mlen), dtype=q.dtype)
        for t in range(conv_kernel):                           # C[i, i + t - kernel // 2] = conv_w[:, t]
            band = band + conv_w[:, t, None, None] * (j == i + t - conv_kernel // 2)
        if key_mask is not None:
            band = band * key_mask[..., None, :]
        w = w + band
    return w @ v


def default_landmarks(n):
    """64 landmarks at large n (the paper uses 32-64 on LRA), fewer than n so segments have several tokens."""
    return max(1, min(64, n // 2))


def init_conv(rng, heads, conv_kernel):
    """Initial skip-convolution filters conv_w (heads, conv_kernel): standard normal / conv_kernel,
    a host NumPy array."""
    return rng.standard_normal((heads, conv_kernel)) / conv_kernel


def setup(rng, *, n, d, heads, causal=False, dtype="float64", conv_kernel=3):
    """m = min(64, n // 2) landmarks, 6 iterations, a 3-tap skip convolution conv_w (H, 3) per head
    (:func:`init_conv`)."""
    config = {"landmarks": default_landmarks(n), "iterations": 6}
    params = {}
    if conv_kernel:
        params["conv_w"] = asarray(init_conv(rng, heads, conv_kernel), dtype=dtype)
        config["conv_kernel"] = conv_kernel
    return params, config


MECHANISM = register(Mechanism(
    name="nystromformer",
    title="Nyströmformer",
    citation="Xiong et al., 2021",
    url="https://arxiv.org/abs/2102.03902",
    classes=("LR",),
    complexity="O(N)",
    causal=False,
    exact=False,
    kind="kernel",
    notebook="05_low_rank",
    forward=forward,
    backward=backward,
    weights=weights,
    setup=setup,
    reference=reference,
    sizes=("landmarks", "iterations", "conv_kernel"),
    summary="Landmark means and an iterative pseudo-inverse: softmax ~ F A^+ B, O(N m).",
))
