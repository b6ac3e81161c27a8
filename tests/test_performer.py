"""Performer: the implied matrix against its explicit construction from the paper's feature maps,
chunked causal prefix sums against the per-step loop, the statistics of the estimator, and the
stabiliser (issue 11): finite and exact at logits x 1e4, masked keys excluded, no causal leak."""
import math

import numpy as np
import pytest

from effattn.attention import performer
from effattn.gradcheck import check_gradients
from effattn.nn.decode import state_size


def softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def phi_paper(x, w, kernel):
    """The paper's feature maps, unstabilised (x already scaled by d^-1/4)."""
    u = x @ w.T
    sq = 0.5 * (x * x).sum(-1, keepdims=True)
    m = w.shape[0]
    if kernel == "positive":
        return np.exp(u - sq) / math.sqrt(m)
    if kernel == "hyperbolic":
        return np.exp(-sq) / math.sqrt(2 * m) * np.concatenate([np.exp(u), np.exp(-u)], -1)
    return np.exp(sq) / math.sqrt(m) * np.concatenate([np.sin(u), np.cos(u)], -1)


def explicit(q, k, v, w, kernel, causal=False, key_mask=None):
    d = q.shape[-1]
    a = phi_paper(q * d ** -0.25, w, kernel) @ np.swapaxes(phi_paper(k * d ** -0.25, w, kernel), -1, -2)
    if causal:
        a = np.tril(a)
    if key_mask is not None:
        a = a * key_mask[..., None, :]
    W = a / a.sum(-1, keepdims=True)
    return W @ v, W


@pytest.mark.parametrize("kernel", performer.KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_weights_match_explicit_construction(kernel, causal):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 2, 13, 4)) for _ in range(3))
    w = performer.draw_features(rng, 10, 4)
    km = rng.random((2, 1, 13)) > 0.3
    km[..., 0] = True
    ref, W = explicit(q, k, v, w, kernel, causal, km)
    for chunk in (1, 4, 13, 100):
        out, cache = performer.forward(q, k, v, features=w, kernel=kernel, causal=causal, key_mask=km, chunk=chunk)
        np.testing.assert_allclose(out, ref, atol=1e-10)
        np.testing.assert_allclose(performer.weights(cache), W, atol=1e-10)
    np.testing.assert_allclose(performer.loop(q, k, v, features=w, kernel=kernel, causal=causal, key_mask=km), ref, atol=1e-10)


@pytest.mark.parametrize("kernel", performer.KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_every_kernel(kernel, causal):
    rng = np.random.default_rng(1)
    inputs = {x: rng.standard_normal((1, 2, 7, 3)) for x in "qkv"}
    feats = performer.draw_features(rng, 5, 3, heads=2)    # one draw per head
    km = rng.random((1, 1, 7)) > 0.3
    km[..., 0] = True
    config = {"features": feats, "kernel": kernel, "causal": causal, "chunk": 3, "key_mask": km}
    errors = check_gradients(performer.forward, performer.backward, inputs, config, rng=rng)
    assert max(errors.values()) < 1e-6, errors


def test_estimate_approaches_softmax_as_features_grow():
    """Mean error over draws shrinks about as 1/sqrt(m) (fitted log-log slope near -1/2; heavier
    tails of the log-normal features make it a little slower for larger inputs)."""
    rng = np.random.default_rng(2)
    n, d = 24, 8
    q, k, v = (rng.standard_normal((1, 1, n, d)) * 0.3 for _ in range(3))
    exact = softmax(q @ np.swapaxes(k, -1, -2) / math.sqrt(d))
    ms = (16, 64, 256, 1024)
    err = []
    for m in ms:
        e = [np.abs(performer.weights(performer.forward(q, k, v, features=performer.draw_features(
            rng, m, d, orthogonal=False))[1]) - exact).mean() for _ in range(30)]
        err.append(np.mean(e))
    slope = np.polyfit(np.log(ms), np.log(err), 1)[0]
    assert -0.6 < slope < -0.38, (err, slope)
    assert all(a > b for a, b in zip(err, err[1:]))


def test_positive_features_never_give_negative_weights():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 2, 15, 4)) * 2 for _ in range(3))
    for causal in (False, True):
        _, cache = performer.forward(q, k, v, features=performer.draw_features(rng, 8, 4), causal=causal)
        W = performer.weights(cache)
        assert W.min() >= 0 and np.allclose(W.sum(-1), 1)
    _, cache = performer.forward(q, k, v, features=performer.draw_features(rng, 8, 4), kernel="trig")
    assert performer.weights(cache).min() < 0                # the trigonometric estimator does


def test_draw_features():
    rng = np.random.default_rng(4)
    w = performer.draw_features(rng, 12, 5, norms="fixed")
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), math.sqrt(5))
    block = w[:5] / math.sqrt(5)
    np.testing.assert_allclose(block @ block.T, np.eye(5), atol=1e-12)    # orthogonal within a block
    block = w[5:10] / math.sqrt(5)
    np.testing.assert_allclose(block @ block.T, np.eye(5), atol=1e-12)
    w = performer.draw_features(rng, 4000, 5)                # resampled norms: chi(5) distributed
    norms = np.linalg.norm(w, axis=1)
    assert abs(np.mean(norms ** 2) - 5) < 0.3
    assert performer.draw_features(rng, 7, 3, heads=4).shape == (4, 7, 3)
    with pytest.raises(ValueError, match="norms"):
        performer.draw_features(rng, 7, 3, norms="bad")


def test_causal_key_stabiliser_does_not_leak_and_stays_finite():
    """Outputs before t are bit-for-bit unchanged when a huge key arrives at t (no sequence-wide max)."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 1, 20, 4)) for _ in range(3))
    w = performer.draw_features(rng, 8, 4)
    out, _ = performer.forward(q, k, v, features=w, causal=True, chunk=8)
    k2 = k.copy()
    k2[..., 10, :] = 50.0
    out2, _ = performer.forward(q, k2, v, features=w, causal=True, chunk=8)
    assert np.array_equal(out[..., :10, :], out2[..., :10, :])
    assert np.isfinite(out2).all()
    out3, _ = performer.forward(q, k * 1e3, v, features=w)   # non-causal: the per-feature key max keeps it finite
    assert np.isfinite(out3).all()


@pytest.mark.parametrize("kernel", performer.KERNELS)
def test_features_are_unbiased_estimators_of_the_softmax_kernel(kernel):
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal(4) * 0.5, rng.standard_normal(4) * 0.5
    w = performer.draw_features(rng, 200000, 4, orthogonal=False)
    est = performer.random_features(x[None], w, kernel) @ performer.random_features(y[None], w, kernel).T
    assert abs(est[0, 0] / math.exp(x @ y) - 1) < 0.02


def test_causal_keys_cannot_overflow_in_float32_for_large_d():
    """Keys placed right on a feature direction give the largest possible exponent |w|^2/2 (about d/2);
    the causal shift by the running max keeps every feature <= 1 in float32 even for d = 256."""
    rng = np.random.default_rng(7)
    d, n = 256, 6
    w = performer.draw_features(rng, 32, d)
    k = np.repeat(w[:1] * d ** 0.25, n, axis=0)[None, None]          # x = k / d^(1/4) = w_1
    q, v = rng.standard_normal((1, 1, n, d)), rng.standard_normal((1, 1, n, 3))
    out32, _ = performer.forward(q.astype("float32"), k.astype("float32"), v.astype("float32"),
                                 features=w.astype("float32"), causal=True)
    out64, _ = performer.forward(q, k, v, features=w, causal=True)
    assert np.isfinite(out32).all()
    np.testing.assert_allclose(out32, out64, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- the stabiliser at huge logits
def huge_case(seed, causal, masked, dtype):
    """The issue-11 case: q and k x 100 (logits x 1e4), d = 8, m = 16 features per head, N = 33."""
    import effattn
    rng = np.random.default_rng(seed)
    case = effattn.get("performer").example(rng, batch=2, heads=2, n=33, d=8, causal=causal)
    km = rng.random((2, 1, 33)) > 0.3
    km[..., 0] = True
    q, k, v = (case.inputs[x] * c for x, c in (("q", 100.0), ("k", 100.0), ("v", 1.0)))
    config = {**case.config, "features": case.config["features"].astype(dtype), "key_mask": km if masked else None}
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), config


def visible(key_mask, causal, lead, n):
    """(*lead, N, N) bool: the unmasked keys each row attends to."""
    vis = np.ones((n, n), dtype=bool) if key_mask is None else key_mask[..., None, :]
    vis = vis & np.tril(np.ones((n, n), dtype=bool)) if causal else vis
    return np.broadcast_to(vis, tuple(lead) + (n, n))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_huge_logits_stay_finite_and_exact(causal, masked, dtype):
    """Before the fix: float64 with a key mask all-NaN for 13 of these 20 seeds (a masked key's feature
    exp(.) = inf, times 0), float32 inf for all 20 (denominators subnormal or 0), causal every row 0
    (every key feature underflowed). Now: every row is the convex combination the estimator defines,
    equal to the log-space formula of :func:`performer.reference` (float64 to 1e-9; float32 to its
    rounding of exponents ~1e4, against the float64 formula of the same rounded inputs)."""
    for seed in range(20):
        q, k, v, config = huge_case(seed, causal, masked, dtype)
        out, cache = performer.forward(q, k, v, **config)
        assert out.dtype == dtype and np.isfinite(out).all(), seed
        ref = performer.reference(*(x.astype("float64") for x in (q, k, v)),
                                  **{**config, "features": config["features"].astype("float64")})
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-9 if dtype == "float64" else 5e-3, err_msg=str(seed))
        # a convex combination of the values of the unmasked keys each row sees: positive, normalised weights
        vis = visible(config["key_mask"], causal, q.shape[:-2], q.shape[-2])
        vv = np.broadcast_to(v[..., None, :, :].astype("float64"), vis.shape + v.shape[-1:])
        lo = np.where(vis[..., None], vv, np.inf).min(axis=-2)
        hi = np.where(vis[..., None], vv, -np.inf).max(axis=-2)
        tol = 1e-12 if dtype == "float64" else 1e-5
        assert np.all((out >= lo - tol) & (out <= hi + tol)), seed
        W = performer.weights(cache)
        assert np.isfinite(W).all() and W.min() >= 0 and np.all(W[~vis] == 0), seed
        np.testing.assert_allclose(W.sum(axis=-1), 1, rtol=1e-5 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("kernel", ["positive", "hyperbolic"])
def test_huge_logits_match_the_per_step_loop_for_every_chunk(kernel):
    """Huge keys with ordinary ones here and there (a key far above the running max so far): chunks mix
    rows of the fast part and rows of the exact scan; the result equals the per-step running-max
    recurrence and the log-space formula."""
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((2, 2, 29, 4)) for _ in range(3))
    ordinary = np.zeros(29, dtype=bool)
    ordinary[[4, 13, 22]] = True
    k[..., ~ordinary, :] *= 100.0
    q[1] *= 40.0
    w = performer.draw_features(rng, 6, 4, heads=2)
    km = rng.random((2, 1, 29)) > 0.25
    km[0, :, :3] = False                                     # no key visible at the start of the first chunk
    ref = performer.loop(q, k, v, features=w, causal=True, key_mask=km, kernel=kernel)
    np.testing.assert_allclose(performer.reference(q, k, v, features=w, causal=True, key_mask=km, kernel=kernel),
                               ref, rtol=0, atol=1e-11)
    scanned = 0
    for chunk in (1, 2, 4, 7, 29, 128):
        out, cache = performer.forward(q, k, v, features=w, causal=True, key_mask=km, kernel=kernel, chunk=chunk)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-11, err_msg=f"chunk {chunk}")
        np.testing.assert_allclose(performer.weights(cache) @ v, out, rtol=0, atol=1e-11)
        scanned += int((~cache.kernel.safe).sum())
    assert scanned > 0                                       # the exact scan did run


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_masked_key_above_the_real_ones_changes_nothing(causal, dtype):
    """Real keys huge (x 100: exponents a ~ -1e4), the masked key ordinary, on a feature direction, or
    huge: its exponent may be far above every real key's. It takes part in no max and no exp, so its
    feature is exactly 0 (before: exp(a - max) = inf, times the mask's 0 = NaN)."""
    rng = np.random.default_rng(12)
    q, k, v = (rng.standard_normal((2, 2, 17, 8)) for _ in range(3))
    k *= 100.0
    w = performer.draw_features(rng, 16, 8, heads=2)
    km = np.ones((2, 1, 17), dtype=bool)
    km[:, :, 6] = False
    cast = lambda *xs: [x.astype(dtype) for x in xs]
    out, _ = performer.forward(*cast(q, k, v), features=w.astype(dtype), causal=causal, key_mask=km, chunk=5)
    assert np.isfinite(out).all()
    for masked_key in (np.zeros(8), w[0, 0] * 8 ** 0.25, np.full(8, 1e4)):
        k2, v2 = k.copy(), v.copy()
        k2[..., 6, :] = masked_key
        v2[..., 6, :] = 1e4
        out2, _ = performer.forward(*cast(q, k2, v2), features=w.astype(dtype), causal=causal, key_mask=km, chunk=5)
        np.testing.assert_array_equal(out2, out)


def test_fully_masked_batch_at_huge_logits_gives_zeros_and_finite_gradients():
    for causal in (False, True):
        for dtype in ("float64", "float32"):
            q, k, v, config = huge_case(0, causal, True, dtype)
            km = config["key_mask"].copy()
            km[1] = False                                    # batch 1: every key masked
            out, cache = performer.forward(q, k, v, **{**config, "key_mask": km})
            assert np.isfinite(out).all() and np.all(out[1] == 0)
            grads = performer.backward(np.ones_like(out), cache)
            assert all(np.isfinite(g).all() for g in grads.values())
            assert all(np.all(grads[x][1] == 0) for x in "qkv")


@pytest.mark.parametrize("causal", [False, True])
def test_float32_stays_finite_and_close_for_large_d(causal):
    """d = 256, ordinary inputs: the old data-free causal shift gave NaN rows in float32 here."""
    rng = np.random.default_rng(13)
    q, k, v = (rng.standard_normal((1, 2, 64, 256)) for _ in range(3))
    w = performer.draw_features(rng, 64, 256, heads=2)
    km = rng.random((1, 1, 64)) > 0.2
    km[..., 0] = True
    out64, _ = performer.forward(q, k, v, features=w, causal=causal, key_mask=km, chunk=16)
    out32, _ = performer.forward(*(x.astype("float32") for x in (q, k, v)), features=w.astype("float32"),
                                 causal=causal, key_mask=km, chunk=16)
    assert np.isfinite(out32).all()
    np.testing.assert_allclose(out32, out64, rtol=0, atol=1e-3)


# --------------------------------------------------------------------------- gradients of both causal paths
@pytest.mark.parametrize("kernel", ["positive", "hyperbolic"])
@pytest.mark.parametrize("headroom", [None, 0.5, 3.0])
def test_gradients_with_key_mask_through_fast_part_and_exact_scan(kernel, headroom, monkeypatch):
    """Finite differences with a key mask (leading masked keys, one batch fully masked): the default
    (every row on the fast part for these moderate inputs), a tiny headroom (nearly every row on the exact
    scan) and a mix. The stabilisers are constants of the backward; the output does not depend on them."""
    if headroom is not None:
        monkeypatch.setattr(performer, "_headroom", lambda xp, dtype: headroom)
    rng = np.random.default_rng(14)
    inputs = {x: rng.standard_normal((2, 2, 9, 3)) for x in "qkv"}
    feats = performer.draw_features(rng, 5, 3, heads=2)
    km = rng.random((2, 1, 9)) > 0.3
    km[0, :, :2] = False
    km[1, :, 0] = True
    scanned = 0
    for chunk in (1, 2, 4, 9):
        config = {"features": feats, "kernel": kernel, "causal": True, "chunk": chunk, "key_mask": km}
        errors = check_gradients(performer.forward, performer.backward, inputs, config, rng=rng)
        assert max(errors.values()) < 1e-6, (chunk, errors)
        scanned += int((~performer.forward(**inputs, **config)[1].kernel.safe).sum())
    assert (scanned > 0) == (headroom is not None)
    km_all = km.copy()
    km_all[1] = False
    config = {"features": feats, "kernel": kernel, "causal": False, "key_mask": km_all}
    errors = check_gradients(performer.forward, performer.backward, inputs, config, rng=rng)
    assert max(errors.values()) < 1e-6, errors


def test_fast_part_and_exact_scan_agree(monkeypatch):
    """Outputs and gradients of the two causal paths are the same numbers up to rounding."""
    rng = np.random.default_rng(15)
    q, k, v = (rng.standard_normal((2, 2, 23, 4)) for _ in range(3))
    w = performer.draw_features(rng, 8, 4, heads=2)
    km = rng.random((2, 1, 23)) > 0.3
    dout = rng.standard_normal((2, 2, 23, 4))
    fast, cf = performer.forward(q, k, v, features=w, causal=True, key_mask=km, chunk=6)
    assert cf.kernel.pick is None                            # ordinary inputs: no chunk needs the scan
    monkeypatch.setattr(performer, "_headroom", lambda xp, dtype: 0.0)
    exact, ce = performer.forward(q, k, v, features=w, causal=True, key_mask=km, chunk=6)
    assert ce.kernel.pick is not None
    np.testing.assert_allclose(exact, fast, rtol=0, atol=1e-13)
    gf, ge = performer.backward(dout, cf), performer.backward(dout, ce)
    for x in "qkv":
        np.testing.assert_allclose(ge[x], gf[x], rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 8, 20])
def test_causal_outputs_before_a_huge_key_are_bit_for_bit_unchanged(chunk):
    """A huge key at t (and anything else changed from t on) moves no bit of the outputs before t,
    whichever path (fast part or exact scan) the rows from t on take."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 1, 20, 4)) for _ in range(3))
    w = performer.draw_features(rng, 8, 4)
    out, _ = performer.forward(q, k, v, features=w, causal=True, chunk=chunk)
    for t in (0, 7, 10, 19):
        for value in (50.0, 1e4):
            k2, q2, v2 = k.copy(), q.copy(), v.copy()
            k2[..., t, :] = value
            q2[..., t:, :] *= 100.0
            v2[..., t:, :] = 3.0
            out2, _ = performer.forward(q2, k2, v2, features=w, causal=True, chunk=chunk)
            assert np.isfinite(out2).all()
            assert np.array_equal(out[..., :t, :], out2[..., :t, :]), (t, value)


# --------------------------------------------------------------------------- decoding
def _decode(q, k, v, km, prompt, **config):
    """Prefill ``prompt`` tokens, then step: the rows and the state sizes after each token."""
    lead = q.shape[:-2]
    kmb = None if km is None else np.broadcast_to(km, q.shape[:-1])
    state = performer.init_state(lead=lead, d=q.shape[-1], dv=v.shape[-1], **config)
    out, state = performer.prefill(q[..., :prompt, :], k[..., :prompt, :], v[..., :prompt, :], state,
                                   key_mask=None if kmb is None else kmb[..., :prompt])
    rows, sizes = [out], [state_size(state)]
    for t in range(prompt, q.shape[-2]):
        o, state = performer.step(q[..., t, :], k[..., t, :], v[..., t, :], state,
                                  key_mask_t=None if kmb is None else kmb[..., t])
        rows.append(o[..., None, :])
        sizes.append(state_size(state))
    return np.concatenate(rows, axis=-2), sizes


@pytest.mark.parametrize("kernel", ["positive", "hyperbolic", "trig"])
@pytest.mark.parametrize("shared", [False, True])
def test_decoding_equals_the_causal_forward_for_every_kernel(kernel, shared):
    """Prefill + steps equal the causal parallel forward for each feature map, with features shared
    by the heads (m, d) or one draw per head (H, m, d), with key masks; the state holds m' (dv + 2)
    numbers per head (S, z and the running max; trig: no max, m' (dv + 1)), m' = m or 2m."""
    rng = np.random.default_rng(21)
    q, k = rng.standard_normal((2, 2, 23, 4)) * 0.5, rng.standard_normal((2, 2, 23, 4)) * 0.5
    v = rng.standard_normal((2, 2, 23, 3))
    w = performer.draw_features(rng, 6, 4, heads=None if shared else 2)
    km = rng.random((2, 1, 23)) > 0.3
    km[..., 0] = True
    want, _ = performer.forward(q, k, v, features=w, causal=True, key_mask=km, kernel=kernel, chunk=4)
    mp = 6 if kernel == "positive" else 12
    for prompt in (1, 4, 9, 22):
        got, sizes = _decode(q, k, v, km, prompt, features=w, kernel=kernel, chunk=4)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10, err_msg=f"prompt {prompt}")
        assert set(sizes) == {2 * 2 * mp * (3 + (1 if kernel == "trig" else 2))}


@pytest.mark.parametrize("kernel", ["positive", "hyperbolic"])
def test_decoding_rescales_when_the_running_max_grows(kernel):
    """Huge keys that raise the running max now and then (and a first stretch of masked keys: the max
    starts at -inf): each step rescales S and z by exp(s_old - s_new) <= 1, stays finite and equals
    the causal forward (which scans such chunks exactly)."""
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((2, 2, 29, 4)) for _ in range(3))
    ordinary = np.zeros(29, dtype=bool)
    ordinary[[4, 13, 22]] = True
    k[..., ~ordinary, :] *= 100.0
    q[1] *= 40.0
    w = performer.draw_features(rng, 6, 4, heads=2)
    km = rng.random((2, 1, 29)) > 0.25
    km[0, :, :3] = False
    want, _ = performer.forward(q, k, v, features=w, causal=True, key_mask=km, kernel=kernel, chunk=7)
    for prompt in (1, 2, 10, 28):
        got, _ = _decode(q, k, v, km, prompt, features=w, kernel=kernel, chunk=7)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10, err_msg=f"prompt {prompt}")


def test_decoding_refuses_bad_configuration_and_states():
    rng = np.random.default_rng(22)
    w = performer.draw_features(rng, 6, 4)
    with pytest.raises(ValueError, match="^features"):
        performer.init_state(lead=(1, 2), d=3, dv=3, features=w)
    with pytest.raises(ValueError, match="^kernel"):
        performer.init_state(lead=(1, 2), d=4, dv=3, features=w, kernel="relu")
    from effattn.attention import linear
    q = rng.standard_normal((1, 2, 4))
    with pytest.raises(TypeError, match="^state must come from performer"):
        performer.step(q, q, q, linear.init_state(lead=(1, 2), d=4, dv=4))
