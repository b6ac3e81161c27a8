"""Memory-compressed attention: the fast path against the slot-by-slot dense oracle, the
compression against an explicit strided convolution, the causal slot-visibility rule,
key masks, special cases that reduce to known attentions, gradients of the parameters."""
import numpy as np
import pytest

import effattn
from effattn.attention import memory_compressed as mc
from effattn.attention.full import forward as full_forward
from effattn.figures import FIGURES
from effattn.gradcheck import check_gradients
from effattn.nn.decode import state_size


def make(rng, lead, n, m, d, dv, k):
    q = rng.standard_normal((*lead, n, d))
    kk = rng.standard_normal((*lead, m, d))
    v = rng.standard_normal((*lead, m, dv))
    return q, kk, v, mc.init_compression(rng, k, d)


@pytest.mark.parametrize("n,m,k,causal,masked", [(13, 13, 3, True, False), (13, 13, 3, False, True),
                                                 (10, 10, 4, True, True), (7, 15, 2, False, True),
                                                 (12, 5, 5, False, False), (16, 16, 1, True, True),
                                                 (9, 9, 9, True, False)])
def test_matches_dense_reference(n, m, k, causal, masked):
    rng = np.random.default_rng(n * m + k)
    q, kk, v, params = make(rng, (2, 2), n, m, 4, 3, k)
    km = (rng.random((2, 1, m)) > 0.3) if masked else None
    out, _ = mc.forward(q, kk, v, causal=causal, key_mask=km, **params)
    ref = mc.reference(q, kk, v, causal=causal, key_mask=km, **params)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


def test_compression_is_a_strided_convolution():
    """K^c_s = sum_o K_{sk+o} W_o: compare with a convolution written as sliding dot products."""
    rng = np.random.default_rng(0)
    n, d, k = 12, 3, 3
    q, kk, v, p = make(rng, (1,), n, n, d, 2, k)
    out, cache = mc.forward(q, kk, v, **p)
    kc = cache.attend.k                                                       # (1, 4, d)
    for s in range(n // k):
        window = kk[0, s * k:(s + 1) * k]                                     # (k, d)
        expect = np.array([(window * p["conv_k"][:, :, e]).sum() for e in range(d)])
        np.testing.assert_allclose(kc[0, s], expect, atol=1e-12)
        np.testing.assert_allclose(cache.attend.v[0, s], p["conv_v"] @ v[0, s * k:(s + 1) * k], atol=1e-12)


def test_k_equal_one_with_identity_is_full_attention():
    rng = np.random.default_rng(1)
    q, kk, v, _ = make(rng, (2, 2), 11, 11, 4, 4, 1)
    params = {"conv_k": np.eye(4)[None], "conv_v": np.ones(1)}
    km = rng.random((2, 1, 11)) > 0.3
    for causal in (False, True):
        out, _ = mc.forward(q, kk, v, causal=causal, key_mask=km, **params)
        ref, _ = full_forward(q, kk, v, causal=causal, key_mask=km)
        np.testing.assert_allclose(out, ref, atol=1e-12)


def test_causal_slot_visibility_rule():
    n, k = 14, 4                                                              # slots end at 3, 7, 11; 12..13 partial
    vis = mc.slot_visibility(n, n, k, True, np)
    ends = [3, 7, 11, 15]                                                     # the partial slot never completes
    assert np.array_equal(vis, np.array([[e <= i for e in ends] for i in range(n)]))
    assert not vis[:, 3].any()
    assert mc.slot_visibility(n, n, k, False, np) is None
    # queries before the end of the first slot see nothing: zero output, zero gradient
    rng = np.random.default_rng(2)
    q, kk, v, p = make(rng, (1, 1), n, n, 3, 2, k)
    out, cache = mc.forward(q, kk, v, causal=True, **p)
    assert np.all(out[..., :3, :] == 0) and np.all(out[..., 3:, :] != 0)
    g = mc.backward(np.ones_like(out), cache)
    assert np.all(g["q"][..., :3, :] == 0)
    # a slot becomes visible exactly at its last position: changing position 7 changes outputs
    # from 7 on and leaves 0..6 bit-for-bit equal
    k2 = kk.copy()
    k2[..., 7, :] += 1.0
    out2, _ = mc.forward(q, k2, v, causal=True, **p)
    assert np.array_equal(out[..., :7, :], out2[..., :7, :])
    assert not np.allclose(out[..., 7, :], out2[..., 7, :])


def test_key_mask_zeroes_positions_and_removes_empty_slots():
    rng = np.random.default_rng(3)
    n, k = 12, 3
    q, kk, v, p = make(rng, (1, 1), n, n, 3, 2, k)
    km = np.ones((1, 1, n), bool)
    km[..., 3:6] = False                                                      # slot 1 entirely masked
    km[..., 7] = False                                                        # slot 2 partly masked
    out, cache = mc.forward(q, kk, v, key_mask=km, **p)
    assert np.all(cache.attend.p[..., 1] == 0)
    w = mc.weights(cache)
    assert np.all(w[..., ~km[0, 0]] == 0)
    np.testing.assert_allclose(out, w @ v, atol=1e-12)
    # slot 2 is what the unmasked call gives when position 7 is zero
    k0, v0 = kk.copy(), v.copy()
    k0[..., 7, :] = 0
    v0[..., 7, :] = 0
    _, cache0 = mc.forward(q, k0, v0, **p)
    np.testing.assert_allclose(cache.attend.k[..., 2, :], cache0.attend.k[..., 2, :], atol=1e-12)


def test_weights_with_mask_and_cross_attention():
    rng = np.random.default_rng(4)
    q, kk, v, p = make(rng, (2, 1), 6, 17, 3, 4, 4)
    km = rng.random((2, 1, 17)) > 0.4
    out, cache = mc.forward(q, kk, v, key_mask=km, **p)
    w = mc.weights(cache)
    assert w.shape == (2, 1, 6, 17)
    np.testing.assert_allclose(out, w @ v, atol=1e-12)


def test_gradients_including_parameters():
    rng = np.random.default_rng(5)
    for n, m, k, causal in ((10, 10, 3, True), (7, 11, 4, False)):
        q, kk, v, p = make(rng, (2, 1), n, m, 3, 2, k)
        km = rng.random((2, 1, m)) > 0.3
        km[..., 0] = True
        errors = check_gradients(mc.forward, mc.backward, {"q": q, "k": kk, "v": v, **p},
                                 {"causal": causal, "key_mask": km}, rng=rng)
        assert set(errors) == {"q", "k", "v", "conv_k", "conv_v"}
        assert max(errors.values()) < 1e-7, errors


def test_validation():
    rng = np.random.default_rng(6)
    q, kk, v, p = make(rng, (1,), 8, 8, 3, 2, 2)
    with pytest.raises(ValueError, match="conv_k"):
        mc.forward(q, kk, v, conv_k=np.zeros((2, 3, 4)), conv_v=p["conv_v"])
    with pytest.raises(ValueError, match="conv_v"):
        mc.forward(q, kk, v, conv_k=p["conv_k"], conv_v=np.zeros(3))
    with pytest.raises(ValueError, match="conv_v"):
        mc.forward(q, kk, v, conv_k=p["conv_k"], conv_v=p["conv_v"].astype(np.float32))
    with pytest.raises(ValueError, match="causal"):
        mc.forward(q, kk[:, :5], v[:, :5], causal=True, **p)


def test_registry_entry_and_figures(tmp_path):
    spec = effattn.get("memory_compressed")
    assert spec.notebook == "01_fixed_patterns" and spec.classes == ("FP", "M") and spec.reference is not None
    paths = FIGURES["memory_compressed"](str(tmp_path), np.random.default_rng(0))
    assert len(paths) == 2 and all("memory_compressed_" in p for p in paths)


def test_setup_compression_option():
    params, config = mc.setup(np.random.default_rng(0), n=100, d=4, heads=2, compression=5)
    assert params["conv_k"].shape == (5, 4, 4) and params["conv_v"].shape == (5,) and config == {}
    assert mc.setup(np.random.default_rng(0), n=20, d=4, heads=2)[0]["conv_v"].shape == (3,)
    with pytest.raises(ValueError, match="compression"):
        mc.setup(np.random.default_rng(0), n=20, d=4, heads=2, compression=0)


@pytest.mark.parametrize("n,k,b,causal,masked", [(13, 3, 4, True, True), (13, 3, 4, False, False),
                                                 (9, 2, 20, False, True), (16, 4, 4, True, False),
                                                 (11, 5, 1, True, True)])
def test_local_block_option_matches_reference_and_weights(n, k, b, causal, masked):
    rng = np.random.default_rng(n + 10 * b)
    q, kk, v, p = make(rng, (2, 2), n, n, 4, 3, k)
    km = (rng.random((2, 1, n)) > 0.3) if masked else None
    out, cache = mc.forward(q, kk, v, causal=causal, key_mask=km, local_block=b, **p)
    ref = mc.reference(q, kk, v, causal=causal, key_mask=km, local_block=b, **p)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out, mc.weights(cache) @ v, rtol=0, atol=1e-12)


def test_local_block_gradients_causality_and_validation():
    rng = np.random.default_rng(7)
    q, kk, v, p = make(rng, (1, 2), 11, 11, 3, 2, 3)
    km = rng.random((1, 1, 11)) > 0.3
    errors = check_gradients(mc.forward, mc.backward, {"q": q, "k": kk, "v": v, **p},
                             {"causal": True, "key_mask": km, "local_block": 4}, rng=rng)
    assert max(errors.values()) < 1e-7, errors
    out, _ = mc.forward(q, kk, v, causal=True, local_block=4, **p)
    assert np.all(np.abs(out[..., 0, :]) > 0)                                 # the first query sees itself now
    for t in (1, 5, 9):
        q2, k2, v2 = q.copy(), kk.copy(), v.copy()
        for x in (q2, k2, v2):
            x[..., t:, :] = rng.standard_normal(x[..., t:, :].shape)
        out2, _ = mc.forward(q2, k2, v2, causal=True, local_block=4, **p)
        assert np.array_equal(out[..., :t, :], out2[..., :t, :])
    with pytest.raises(ValueError, match="local_block"):
        mc.forward(q, kk, v, local_block=0, **p)
    with pytest.raises(ValueError, match="local_block"):
        mc.forward(q[..., :5, :], kk, v, local_block=2, **p)


# --------------------------------------------------------------------------- decoding
def _decode(q, kk, v, p, prompt, km=None, **config):
    """prefill the first ``prompt`` tokens, then step; returns the rows and the states after each token."""
    lead, d, dv = q.shape[:-2], q.shape[-1], v.shape[-1]
    state = mc.init_state(lead=lead, d=d, dv=dv, **p, **config)
    kmb = None if km is None else np.broadcast_to(km, q.shape[:-1])
    out, state = mc.prefill(q[..., :prompt, :], kk[..., :prompt, :], v[..., :prompt, :], state,
                            key_mask=None if kmb is None else kmb[..., :prompt])
    rows, states = [out], [state]
    for t in range(prompt, q.shape[-2]):
        o, state = mc.step(q[..., t, :], kk[..., t, :], v[..., t, :], state,
                           key_mask_t=None if kmb is None else kmb[..., t])
        rows.append(o[..., None, :])
        states.append(state)
    return np.concatenate(rows, axis=-2), states


@pytest.mark.parametrize("n,k,b,prompt", [(17, 3, None, 1), (17, 3, None, 6), (17, 4, 3, 2), (17, 2, 5, 9),
                                          (12, 5, 1, 3), (10, 3, 40, 4), (8, 1, None, 1)])
def test_decoding_equals_the_causal_forward(n, k, b, prompt):
    rng = np.random.default_rng(n + k + prompt)
    q, kk, v, p = make(rng, (2, 3), n, n, 4, 3, k)
    km = rng.random((2, 1, n)) > 0.3
    km[..., 0] = True
    for mask in (None, km):
        want, _ = mc.forward(q, kk, v, causal=True, key_mask=mask, local_block=b, **p)
        got, _ = _decode(q, kk, v, p, prompt, mask, local_block=b)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_decoding_state_is_the_completed_slots_and_the_incomplete_block():
    """After t tokens: floor(t / k) slots, each compressed once when its k-th position arrives (equal to the
    forward's K^c, V^c), and the raw rows from the start of the incomplete slot (or the local block) to t - 1."""
    rng = np.random.default_rng(8)
    n, k, d, dv = 23, 4, 3, 2
    q, kk, v, p = make(rng, (1, 2), n, n, d, dv, k)
    _, states = _decode(q, kk, v, p, 5)
    _, _, kc, vc, _ = mc._compress(kk, v, p["conv_k"], p["conv_v"], None)
    for state in states:
        t = state.t
        assert state.kc.shape[-2] == t // k and state.start == (t // k) * k
        assert state.tail_k.shape[-2] == t % k
        np.testing.assert_allclose(state.kc, kc[..., :t // k, :], rtol=0, atol=1e-12)
        np.testing.assert_allclose(state.vc, vc[..., :t // k, :], rtol=0, atol=1e-12)
        assert state_size(state) == 2 * (t // k + t % k) * (d + dv + 1)
    for before, after in zip(states, states[1:]):                             # a slot, once made, is kept as is
        assert np.array_equal(after.kc[..., :before.kc.shape[-2], :], before.kc)
    _, states = _decode(q, kk, v, p, 2, local_block=6)                        # the local block reaches back further
    for state in states:
        t = state.t
        assert state.start == min((t // k) * k, (t // 6) * 6)
        assert state.tail_k.shape[-2] == t - state.start < max(k, 6)


def test_decoding_a_partial_slot_is_never_seen():
    """Row t does not depend on whether tokens follow it: the forward over the first t + 1 tokens gives
    the same row t as the forward over all of them (the partial slot at the end stays invisible)."""
    rng = np.random.default_rng(9)
    n, k = 14, 4
    q, kk, v, p = make(rng, (1, 1), n, n, 3, 2, k)
    out, _ = mc.forward(q, kk, v, causal=True, **p)
    for t in range(n):
        short, _ = mc.forward(q[..., :t + 1, :], kk[..., :t + 1, :], v[..., :t + 1, :], causal=True, **p)
        np.testing.assert_allclose(short[..., t, :], out[..., t, :], rtol=0, atol=1e-12)


def test_decoding_validation():
    rng = np.random.default_rng(10)
    q, kk, v, p = make(rng, (1, 2), 6, 6, 3, 2, 2)
    with pytest.raises(ValueError, match="conv_k"):
        mc.init_state(lead=(1, 2), d=4, dv=2, **p)
    with pytest.raises(ValueError, match="conv_v"):
        mc.init_state(lead=(1, 2), d=3, dv=2, conv_k=p["conv_k"], conv_v=np.zeros(3))
    with pytest.raises(ValueError, match="local_block"):
        mc.init_state(lead=(1, 2), d=3, dv=2, local_block=0, **p)
    state = mc.init_state(lead=(1, 2), d=3, dv=2, **p)
    with pytest.raises(ValueError, match="q must have shape"):
        mc.prefill(q[0], kk[0], v[0], state)
    _, state = mc.prefill(q[..., :3, :], kk[..., :3, :], v[..., :3, :], state)
    with pytest.raises(ValueError, match="fresh"):
        mc.prefill(q, kk, v, state)
    with pytest.raises(ValueError, match="v_t"):
        mc.step(q[..., 3, :], kk[..., 3, :], v[..., 3, :1], state)
    with pytest.raises(TypeError, match="state"):
        mc.step(q[..., 3, :], kk[..., 3, :], v[..., 3, :], (state.kc, state.vc))
