"""Linear attention (the Linear Transformer): attention as a kernel, phi(x) = elu(x) + 1.

Katharopoulos, Vyas, Pappas, Fleuret, 2020, *Transformers are RNNs: Fast
Autoregressive Transformers with Linear Attention*, https://arxiv.org/abs/2006.16236

Intuition: softmax attention weighs value j by sim(q_i, k_j) = exp(q_i . k_j /
sqrt(d)). Any non-negative similarity works as long as the weights are
normalised; if sim(q, k) = phi(q) . phi(k) is a dot product of feature maps,
the sums over keys can be done *once* for all queries (re-associate
(phi(Q) phi(K)^T) V = phi(Q) (phi(K)^T V)), and the cost becomes linear in N.
This is a different attention, not an approximation of softmax: its own exact
formula is W_ij = phi(q_i) . phi(k_j) / sum_l phi(q_i) . phi(k_l).

Equations (paper eq. 4-6, 8-9 and 16-20), phi(x) = elu(x) + 1 (> 0 elementwise):

    non-causal: V'_i = phi(Q_i)^T sum_j phi(K_j) V_j^T / (phi(Q_i)^T sum_j phi(K_j) + eps)
    causal:     S_i = sum_{j<=i} phi(K_j) V_j^T,   Z_i = sum_{j<=i} phi(K_j)
                V'_i = phi(Q_i)^T S_i / (phi(Q_i)^T Z_i + eps)

The causal form is an RNN with state (S, Z) of size (d, dv) + (d,). The parallel
form uses chunked prefix sums (:mod:`effattn.nn.kernel_attention`): O(N C d + N d dv).

Decoding (:mod:`effattn.nn.decode`): the state is (S, Z) after the tokens so far, a
:class:`effattn.nn.kernel_attention.KernelState` of d dv + d numbers per head, bounded.
:func:`init_state` (config: ``eps``, ``chunk``) makes the empty one; :func:`prefill` runs the
causal chunked forward over the prompt for its rows and adds S = phi(K)^T V, Z = phi(K)^T 1
(masked keys: phi = 0); :func:`step` adds one token, S += phi(k_t) v_t^T, Z += phi(k_t), and
returns phi(q_t)^T S / (phi(q_t)^T Z + eps), O(d dv) whatever the position.

No 1/sqrt(d) scaling is used (as in the paper and fast-transformers).

``eps`` (default 1e-6) is added to the denominator, as fast-transformers'
``LinearAttention`` / ``CausalLinearAttention`` do (``eps=1e-6``). Since
elu + 1 > 0, the denominator is positive whenever a key is visible; a row
with every key masked gives out = 0 (its denominator is eps, the numerator 0).

Shapes: q (..., N, d), k (..., M, d), v (..., M, dv) -> out (..., N, dv).
key_mask (..., M): masked keys get phi(k_j) = 0, hence exactly zero weight.

Complexity: O(N d dv) time, O(N d) memory non-causal; causal adds the C x C
intra-chunk blocks: O(N C (d + dv)) time, O(N C + (N / C) d dv) memory.

Backward: through :func:`effattn.nn.kernel_attention.kernel_attention_backward`
(derived there) to dphi(Q), dphi(K), then elu's derivative (1 for x > 0,
exp(x) otherwise).

Peer mapping (tests/parity/peer_fast_transformers.py): fast-transformers 0.4.0
(idiap, the paper's code; torch 2.13) ``LinearAttention`` and
``CausalLinearAttention`` with the default ``elu_feature_map`` and ``eps=1e-6``
are this module's ``eps=1e-6`` with ``causal=False`` / ``True``; their
``key_lengths`` (a ``LengthMask``) is ``key_mask`` (a prefix of real keys, the
peer zeroes phi(k) there as here), and their (batch, length, heads, dim) layout
is transposed to (batch, heads, length, dim). Non-causal, float64: out and
gradients within 3e-16 (tolerance 1e-10). The peer's causal product is a C++
kernel that takes float32 only, so the causal fixture is the peer in float32:
out within 3e-7, gradients within 1.6e-7 (its float32 rounding; tolerance
5e-7 / 3e-7); the same peer in float64 with that product replaced by a dense
float64 one agrees to 2e-16.
"""
from __future__ import annotations

from typing import NamedTuple

from ..backend import get_namespace
from ..validate import check_causal, check_int, check_nonnegative_float, check_qkv
from ..nn.decode import check_step_inputs
from ..nn.functional import elu_backward, elu_forward
from ..nn.decode import check_prompt
from ..nn.kernel_attention import (check_kernel_state, kernel_attention_backward,
                                   kernel_attention_forward, kernel_attention_init_state, kernel_attention_loop,
                                   kernel_attention_prefill, kernel_attention_step, kernel_attention_weights)
from ..registry import Mechanism, backward_of, forward_of, reads_cache, register

EPS = 1e-6


class LinearCache(NamedTuple):
    kernel: object    # KernelAttentionCache: phi(Q), phi(K) (masked), v, states, 1 / den
    elu_q: object     # elu cache of q
    elu_k: object     # elu cache of k
    key_mask: object  # (..., M) bool or None


def feature_map(x):
    """phi(x) = elu(x) + 1 (elementwise, > 0). Returns (phi, cache)."""
    y, cache = elu_forward(x)
    return y + 1.0, cache


@forward_of("linear")
def forward(q, k, v, *, causal=False, key_mask=None, eps=EPS, chunk=128):
    """Linear attention. q (..., N, d), k (..., M, d), v (..., M, dv); causal needs N == M.

    eps >= 0 is added to the denominator; ``chunk`` is the block length of the
    causal prefix sums (any positive integer: same result up to rounding).
    Returns out (..., N, dv) and a :class:`LinearCache`.
    """
    n, m, d, _ = check_qkv(q, k, v, key_mask=key_mask, self_attention=bool(causal is True))
    causal = check_causal(causal, True)
    eps = check_nonnegative_float("eps", eps)
    chunk = check_int("chunk", chunk)
    phi_q, elu_q = feature_map(q)                     # (..., N, d)
    phi_k, elu_k = feature_map(k)                     # (..., M, d)
    if key_mask is not None:
        phi_k = phi_k * key_mask[..., :, None]        # masked keys: zero features, zero weight
    out, kcache = kernel_attention_forward(phi_q, phi_k, v, causal=causal, chunk=chunk, eps=eps)
    return out, LinearCache(kcache, elu_q, elu_k, key_mask)


@backward_of("linear")
def backward(dout, cache):
    """Returns {"q": dq, "k": dk, "v": dv}."""
    g = kernel_attention_backward(dout, cache.kernel)
    dphi_k = g["phi_k"]
    if cache.key_mask is not None:
        dphi_k = dphi_k * cache.key_mask[..., :, None]
    return {"q": elu_backward(g["phi_q"], cache.elu_q), "k": elu_backward(dphi_k, cache.elu_k), "v": g["v"]}


@reads_cache("linear")
def weights(cache):
    """W_ij = phi(q_i) . phi(k_j) / (sum_l phi(q_i) . phi(k_l) + eps) (causal: j <= i): out == W @ v."""
    return kernel_attention_weights(cache.kernel)


def reference(q, k, v, *, causal=False, key_mask=None, eps=EPS, chunk=128):
    """The explicit O(N^2) formula, as a readable oracle. ``chunk`` is accepted so that the
    configuration of :func:`forward` applies unchanged; the dense formula has no chunks."""
    xp = get_namespace(q, k, v)
    phi_q, phi_k = feature_map(q)[0], feature_map(k)[0]
    a = phi_q @ phi_k.swapaxes(-1, -2)                                   # (..., N, M)
    if key_mask is not None:
        a = a * key_mask[..., None, :]
    if causal:
        a = a * xp.tril(xp.ones(a.shape[-2:], dtype=bool))
    den = a.sum(axis=-1, keepdims=True) + eps
    return xp.where(den != 0, a / xp.where(den != 0, den, 1.0), 0.0) @ v


def loop(q, k, v, *, causal=False, key_mask=None, eps=EPS):
    """Readable per-step form (the RNN of §3.4), for tests."""
    phi_q, phi_k = feature_map(q)[0], feature_map(k)[0]
    if key_mask is not None:
        phi_k = phi_k * key_mask[..., :, None]
    return kernel_attention_loop(phi_q, phi_k, v, causal=causal, eps=eps)


# --------------------------------------------------------------------------- decoding
def init_state(*, lead, d, dv, dtype="float64", eps=EPS, chunk=128):
    """The empty decoder state (S, Z) = (zeros (*lead, d, dv), zeros (*lead, d)) on the active
    backend (:class:`effattn.nn.kernel_attention.KernelState`): d dv + d numbers per head
    (m = d features), whatever the position. ``lead`` is the (batch, heads) shape; ``eps`` and
    ``chunk`` are :func:`forward`'s (``chunk`` only shapes the prefill's parallel pass)."""
    lead = tuple(check_int("lead", x) for x in lead)
    d, dv = check_int("d", d), check_int("dv", dv)
    eps = check_nonnegative_float("eps", eps)
    chunk = check_int("chunk", chunk)
    return kernel_attention_init_state(lead, d, dv, dtype=dtype, eps=eps, name="linear", config={"chunk": chunk})


def prefill(q, k, v, state, *, key_mask=None):
    """The prompt q, k (..., T, d), v (..., T, dv) in one pass: its rows from the causal chunked
    :func:`forward`, and the state S = phi(K)^T V, Z = phi(K)^T 1 after it (from that forward's
    features). ``state`` must be fresh. Returns (out (..., T, dv), state)."""
    check_kernel_state(state, "linear")
    check_prompt(q, k, v, state.s.shape[:-2], state.s.shape[-2], state.s.shape[-1])
    out, cache = forward(q, k, v, causal=True, key_mask=key_mask, eps=state.eps, chunk=state.config["chunk"])
    return out, kernel_attention_prefill(cache.kernel, state)


def step(q_t, k_t, v_t, state, *, key_mask_t=None):
    """One causal decoding step: q_t, k_t (..., d), v_t (..., dv), key_mask_t (...) bool or None
    (False: token t is no key for anyone), state from :func:`init_state`, :func:`prefill` or a
    previous step. Returns (out_t (..., dv), state); equals row t of the causal parallel :func:`forward`."""
    check_kernel_state(state, "linear")
    lead, d, dv = state.s.shape[:-2], state.s.shape[-2], state.s.shape[-1]
    check_step_inputs(q_t, k_t, v_t, key_mask_t, lead, d, dv)
    if q_t.dtype != state.s.dtype:
        raise ValueError(f"q_t must have the state's dtype {state.s.dtype}, got {q_t.dtype}")
    phi_k = feature_map(k_t)[0]
    if key_mask_t is not None:
        phi_k = phi_k * get_namespace(phi_k).broadcast_to(key_mask_t, lead)[..., None]   # masked: zero features
    return kernel_attention_step(feature_map(q_t)[0], phi_k, v_t, state)


def setup(rng, *, n, d, heads, causal=False, dtype="float64"):
    """No parameters; a causal chunk shorter than small n so the chunk padding is exercised."""
    return {}, ({"chunk": max(2, min(128, n // 3))} if causal else {})


MECHANISM = register(Mechanism(
    name="linear",
    title="Linear Transformer",
    citation="Katharopoulos et al., 2020",
    url="https://arxiv.org/abs/2006.16236",
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
    summary="phi(x) = elu(x) + 1 feature maps: attention in O(N d^2), an RNN when causal.",
))
