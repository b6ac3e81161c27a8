"""Kernelised (linearised) attention given feature maps: the shared core of
Performer (:mod:`effattn.attention.performer`) and the Linear Transformer
(:mod:`effattn.attention.linear`).

Both replace the softmax kernel exp(q . k / sqrt(d)) by a dot product of
feature maps phi(q) . phi(k) (phi: R^d -> R^m). Then the N x M attention
matrix never has to be formed, because matrix products re-associate
(Katharopoulos et al. 2020, eq. 4-6; Choromanski et al. 2021, eq. 4):

    out_i = sum_j (phi(q_i) . phi(k_j)) v_j / sum_j phi(q_i) . phi(k_j)
          = phi(q_i)^T S / (phi(q_i)^T z + eps),    S = sum_j phi(k_j) v_j^T  (m, dv)
                                                     z = sum_j phi(k_j)        (m,)

Non-causal: S and z are one sum over all keys: O(M m dv) + O(N m dv) time,
O((N + M) m) memory.

Causal (query i sees keys j <= i): S and z become prefix sums S_i, z_i. A
cumulative sum of the (N, m, dv) outer products would cost O(N m dv) memory
(4 GiB at N = 65536, m = 256, dv = 64 in float32), so we work in chunks of C
positions (``chunk``): inside a chunk the (C x C) lower-triangular block of
phi(Q) phi(K)^T is used directly, across chunks the state of all earlier chunks
is carried (an *exclusive* cumulative sum over chunks, never "inclusive minus
own chunk", which would let later positions of the chunk leak in through
rounding):

    S_b = sum_{b' < b} phi(K_b')^T V_b'        (n_chunks, m, dv)
    A_b = tril(phi(Q_b) phi(K_b)^T)            (n_chunks, C, C)
    num_b = phi(Q_b) S_b + A_b V_b,  den_b = phi(Q_b) z_b + A_b 1

Time O(N C (m + dv) + N m dv), memory O(N C + (N / C) m dv). Padding to a
multiple of C adds zero features (padded keys contribute nothing, padded
queries are cut off).

The readable per-step form (:func:`kernel_attention_loop`, the recurrent view
of Katharopoulos et al. §3.4: S_i = S_{i-1} + phi(k_i) v_i^T) is tested equal.

Decoding (the protocol of :mod:`effattn.nn.decode`): the state is a :class:`KernelState`,
(S, z) after the tokens so far, O(m dv) numbers per head whatever the position.
:func:`kernel_attention_init_state` makes the empty one, :func:`kernel_attention_prefill`
adds a prompt's keys from the cache of the causal chunked forward (S = phi(K)^T V,
z = phi(K)^T 1: one product, no loop), and :func:`kernel_attention_step` adds one token and
returns its row, O(m dv). A mechanism whose features are shifted by a running max
(Performer's positive features) keeps that max in ``shift`` and updates S and z itself.

Denominator: ``eps`` is added to phi(q_i)^T z_i (fast-transformers adds 1e-6;
the Performer code adds nothing to the denominator but 1e-6 to every feature).
When den + eps is exactly 0 (every key masked, or features that underflowed)
the output row is 0 and so is its gradient — never NaN.

Backward (r = 1 / (den + eps), out = num r):

    dnum = dout r,   dden = -rowsum(dout * out) r
    non-causal: dphi(Q) = dnum S^T + dden z^T,  dS = phi(Q)^T dnum,  dz = phi(Q)^T dden,
                dphi(K) = V dS^T + 1 dz^T,      dV = phi(K) dS
    causal:     dA = tril(dnum V^T + dden 1^T)  (per chunk)
                dphi(Q_b) = dnum_b S_b^T + dden_b z_b^T + dA_b phi(K_b)
                dphi(K_b) = dA_b^T phi(Q_b) + V_b G_b^T + 1 g_b^T,   dV_b = A_b^T dnum_b + phi(K_b) G_b
                with G_b = sum_{b' > b} phi(Q_b')^T dnum_b' (reverse exclusive cumsum of dS), g_b likewise.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import get_namespace
from .decode import check_state
from .sparse import pad_axis, round_up


class KernelAttentionCache(NamedTuple):
    phi_q: object    # (..., N, m) or chunked (..., nc, C, m)
    phi_k: object    # (..., M, m) or chunked (..., nc, C, m), zero at masked keys
    v: object        # (..., M, dv) or chunked (..., nc, C, dv)
    s: object        # (..., m, dv) key-value state, or (..., nc, m, dv) exclusive prefix states
    z: object        # (..., m) key sum, or (..., nc, m) exclusive prefix sums
    a: object        # causal: (..., nc, C, C) lower-triangular phi(Q_b) phi(K_b)^T; else None
    out: object      # (..., N, dv) (chunked when causal)
    inv: object      # (..., N, 1) 1 / (den + eps), 0 where den + eps == 0
    causal: bool
    n: int           # true query length (before padding)


def _safe_inverse(den, eps):
    xp = get_namespace(den)
    den = den + eps
    ok = den != 0
    return xp.where(ok, 1.0 / xp.where(ok, den, 1.0), 0.0).astype(den.dtype, copy=False)


def kernel_attention_forward(phi_q, phi_k, v, *, causal=False, chunk=128, eps=0.0):
    """out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps) (see the module docstring).

    phi_q (..., N, m), phi_k (..., M, m) (zero rows for masked keys), v (..., M, dv).
    Causal needs N == M and works in chunks of ``chunk`` positions.
    Returns out (..., N, dv) and a :class:`KernelAttentionCache`.
    """
    xp = get_namespace(phi_q, phi_k, v)
    n = phi_q.shape[-2]
    if not causal:
        s = phi_k.swapaxes(-1, -2) @ v                    # (..., m, M) @ (..., M, dv) -> (..., m, dv)
        z = phi_k.sum(axis=-2)                            # (..., m)
        num = phi_q @ s                                   # (..., N, m) @ (..., m, dv) -> (..., N, dv)
        den = phi_q @ z[..., None]                        # (..., N, m) @ (..., m, 1) -> (..., N, 1)
        inv = _safe_inverse(den, eps)
        out = num * inv                                   # (..., N, dv)
        return out, KernelAttentionCache(phi_q, phi_k, v, s, z, None, out, inv, False, n)
    c = min(chunk, n)
    length = round_up(n, c)
    nc = length // c
    lead = phi_q.shape[:-2]
    pq = pad_axis(phi_q, length).reshape(lead + (nc, c, phi_q.shape[-1]))   # (..., nc, C, m)
    pk = pad_axis(phi_k, length).reshape(lead + (nc, c, phi_k.shape[-1]))   # (..., nc, C, m)
    pv = pad_axis(v, length).reshape(lead + (nc, c, v.shape[-1]))           # (..., nc, C, dv)
    kv = pk.swapaxes(-1, -2) @ pv                         # (..., nc, m, C) @ (..., nc, C, dv) -> (..., nc, m, dv)
    kz = pk.sum(axis=-2)                                  # (..., nc, m)
    # exclusive prefix over chunks: S_b = sum_{b' < b} kv_b'
    s = xp.concatenate([xp.zeros_like(kv[..., :1, :, :]), xp.cumsum(kv[..., :-1, :, :], axis=-3)], axis=-3)
    z = xp.concatenate([xp.zeros_like(kz[..., :1, :]), xp.cumsum(kz[..., :-1, :], axis=-2)], axis=-2)
    tri = xp.tril(xp.ones((c, c), dtype=bool))            # (C, C): j <= i inside the chunk
    a = pq @ pk.swapaxes(-1, -2)                          # (..., nc, C, m) @ (..., nc, m, C) -> (..., nc, C, C)
    a *= tri
    num = pq @ s + a @ pv                                 # (..., nc, C, dv)
    den = pq @ z[..., None] + a.sum(axis=-1, keepdims=True)   # (..., nc, C, 1)
    inv = _safe_inverse(den, eps)
    out = num * inv                                       # (..., nc, C, dv)
    cache = KernelAttentionCache(pq, pk, pv, s, z, a, out, inv, True, n)
    return out.reshape(lead + (length, v.shape[-1]))[..., :n, :], cache


def kernel_attention_backward(dout, cache):
    """Gradients {"phi_q", "phi_k", "v"} of :func:`kernel_attention_forward`."""
    phi_q, phi_k, v, s, z, a, out, inv, causal, n = cache
    xp = get_namespace(dout)
    if not causal:
        dnum = dout * inv                                          # (..., N, dv)
        dden = -(dout * out).sum(axis=-1, keepdims=True) * inv     # (..., N, 1)
        dphi_q = dnum @ s.swapaxes(-1, -2) + dden * z[..., None, :]    # (..., N, m)
        ds = phi_q.swapaxes(-1, -2) @ dnum                         # (..., m, dv)
        dz = (dden.swapaxes(-1, -2) @ phi_q)[..., 0, :]            # (..., 1, N) @ (..., N, m) -> (..., m)
        dphi_k = v @ ds.swapaxes(-1, -2) + dz[..., None, :]        # (..., M, m)
        dv = phi_k @ ds                                            # (..., M, dv)
        return {"phi_q": dphi_q, "phi_k": dphi_k, "v": dv}
    lead = phi_q.shape[:-3]
    nc, c = phi_q.shape[-3:-1]
    dout = pad_axis(dout, nc * c).reshape(out.shape)               # (..., nc, C, dv)
    dnum = dout * inv
    dden = -(dout * out).sum(axis=-1, keepdims=True) * inv         # (..., nc, C, 1)
    tri = xp.tril(xp.ones((c, c), dtype=bool))
    da = dnum @ v.swapaxes(-1, -2) + dden                          # (..., nc, C, C)
    da *= tri
    dphi_q = dnum @ s.swapaxes(-1, -2) + dden * z[..., None, :] + da @ phi_k     # (..., nc, C, m)
    ds = phi_q.swapaxes(-1, -2) @ dnum                             # (..., nc, m, dv): dL/dS_b
    dz = (phi_q * dden).sum(axis=-2)                               # (..., nc, m)
    # S_b uses chunks b' < b, so chunk b' receives the sum of dS_b over b > b'
    rs = xp.flip(xp.cumsum(xp.flip(ds, axis=-3), axis=-3), axis=-3)   # inclusive reverse sums
    g = xp.concatenate([rs[..., 1:, :, :], xp.zeros_like(rs[..., :1, :, :])], axis=-3)
    rz = xp.flip(xp.cumsum(xp.flip(dz, axis=-2), axis=-2), axis=-2)
    gz = xp.concatenate([rz[..., 1:, :], xp.zeros_like(rz[..., :1, :])], axis=-2)
    dphi_k = da.swapaxes(-1, -2) @ phi_q + v @ g.swapaxes(-1, -2) + gz[..., None, :]   # (..., nc, C, m)
    dv = a.swapaxes(-1, -2) @ dnum + phi_k @ g                     # (..., nc, C, dv)
    length = nc * c
    return {
        "phi_q": dphi_q.reshape(lead + (length, -1))[..., :n, :],
        "phi_k": dphi_k.reshape(lead + (length, -1))[..., :n, :],
        "v": dv.reshape(lead + (length, -1))[..., :n, :],
    }


def kernel_attention_weights(cache):
    """The implied attention matrix W (..., N, M) = D^-1 phi(Q) phi(K)^T (lower-triangular when
    causal), D = diag(den + eps): out == W @ v. Dense: small sizes only."""
    phi_q, phi_k, v, s, z, a, out, inv, causal, n = cache
    xp = get_namespace(phi_q)
    if not causal:
        return (phi_q @ phi_k.swapaxes(-1, -2)) * inv              # (..., N, M)
    lead = phi_q.shape[:-3]
    length = phi_q.shape[-3] * phi_q.shape[-2]
    pq = phi_q.reshape(lead + (length, -1))[..., :n, :]
    pk = phi_k.reshape(lead + (length, -1))[..., :n, :]
    w = pq @ pk.swapaxes(-1, -2)                                   # (..., N, N)
    w *= xp.tril(xp.ones((n, n), dtype=bool))
    return w * inv.reshape(lead + (length, 1))[..., :n, :]


class KernelState(NamedTuple):
    """The decoder state of causal kernel attention after ``t`` tokens (the RNN view)."""

    s: object        # (..., m, dv): S = sum_{j<t} phi(k_j) v_j^T (masked keys: phi = 0)
    z: object        # (..., m): z = sum_{j<t} phi(k_j)
    shift: object    # (..., m) running max of the key exponents the features are relative to, or None
    t: int           # tokens seen
    eps: float       # added to the denominator
    name: str        # the mechanism that made it
    config: dict     # the mechanism's feature-map configuration (constants, not state)

    def held(self):
        """Numbers the state holds: S, z (and the shift): lead * (m dv + m [+ m]), whatever t is."""
        return sum(int(x.size) for x in (self.s, self.z, self.shift) if x is not None)


def kernel_attention_init_state(lead, m, dv, *, dtype="float64", eps=0.0, name="kernel attention",
                                config=None, shifted=False, xp=None):
    """The empty :class:`KernelState`: S = zeros (*lead, m, dv), z = zeros (*lead, m) (and, with
    ``shifted``, a running max of -inf (*lead, m)), on ``xp`` (default: the active backend)."""
    xp = get_namespace() if xp is None else xp
    lead = tuple(int(x) for x in lead)
    shift = xp.full(lead + (m,), -xp.inf, dtype=dtype) if shifted else None
    return KernelState(xp.zeros(lead + (m, dv), dtype=dtype), xp.zeros(lead + (m,), dtype=dtype), shift, 0,
                       float(eps), name, dict(config or {}))


def check_kernel_state(state, name):
    """``state`` must be a :class:`KernelState` made by mechanism ``name``."""
    check_state(state, KernelState, name)
    if state.name != name:
        raise TypeError(f"state must come from {name}.init_state (or a previous step), got one of {state.name}")
    return state


def kernel_attention_prefill(cache, state):
    """The state after a prompt, from the :class:`KernelAttentionCache` of its causal forward:
    S += phi(K)^T V, z += phi(K)^T 1 over the prompt's keys (chunk padding adds zero features).
    ``state`` must be fresh (from init_state)."""
    if state.t != 0:
        raise ValueError(f"prefill needs a fresh state (from init_state), this one is at position {state.t}")
    if not cache.causal:
        raise ValueError("cache must come from a causal forward")
    lead, m, dv = cache.phi_k.shape[:-3], cache.phi_k.shape[-1], cache.v.shape[-1]
    pk = cache.phi_k.reshape(lead + (-1, m))                      # (..., L, m), padded rows zero
    pv = cache.v.reshape(lead + (-1, dv))                         # (..., L, dv)
    s = state.s + pk.swapaxes(-1, -2) @ pv                        # (..., m, L) @ (..., L, dv) -> (..., m, dv)
    z = state.z + pk.sum(axis=-2)                                 # (..., m)
    return state._replace(s=s, z=z, t=cache.n)


def kernel_attention_step(phi_q_t, phi_k_t, v_t, state):
    """One decoding step of causal kernel attention (the RNN view):

        S_t = S_{t-1} + phi(k_t) v_t^T,   z_t = z_{t-1} + phi(k_t)
        out_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)

    phi_q_t, phi_k_t (..., m) (phi_k_t zero for a masked key), v_t (..., dv), state a
    :class:`KernelState`. Returns (out_t (..., dv), the next state), O(m dv) whatever t is.
    The state's arrays are updated in place (a state is consumed by the call it is given to).
    """
    s, z = state.s, state.z
    s += phi_k_t[..., :, None] * v_t[..., None, :]                 # (..., m, dv)
    z += phi_k_t                                                   # (..., m)
    num = (phi_q_t[..., None, :] @ s)[..., 0, :]                   # (..., 1, m) @ (..., m, dv) -> (..., dv)
    den = (phi_q_t * z).sum(axis=-1, keepdims=True)                # (..., 1)
    return num * _safe_inverse(den, state.eps), state._replace(t=state.t + 1)


def kernel_attention_loop(phi_q, phi_k, v, *, causal=False, eps=0.0):
    """Readable reference: causal one step at a time with :func:`kernel_attention_step`;
    non-causal as one explicit sum. Slow (a Python loop over positions): tests only."""
    xp = get_namespace(phi_q, phi_k, v)
    if not causal:
        s = sum(phi_k[..., j, :, None] * v[..., j, None, :] for j in range(phi_k.shape[-2]))
        z = phi_k.sum(axis=-2)
        den = (phi_q * z[..., None, :]).sum(axis=-1, keepdims=True)
        return (phi_q @ s) * _safe_inverse(den, eps)
    lead = (phi_q[..., :1, :1] + phi_k[..., :1, :1] + v[..., :1, :1]).shape[:-2]
    state = kernel_attention_init_state(lead, phi_q.shape[-1], v.shape[-1], dtype=phi_q.dtype, eps=eps, xp=xp)
    outs = []
    for t in range(phi_q.shape[-2]):
        o, state = kernel_attention_step(phi_q[..., t, :], phi_k[..., t, :], v[..., t, :], state)
        outs.append(o)
    return xp.stack(outs, axis=-2)
