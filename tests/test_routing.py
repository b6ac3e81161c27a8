"""Routing Transformer: balanced clusters, the online k-means step, the mean-of-clusters rule,
the decoding-safe causal selection, and gradients of the non-default options."""
import itertools

import numpy as np
import pytest

import effattn
from effattn.attention import routing as RT
from effattn.gradcheck import check_gradients
from effattn.nn.decode import state_size

full = effattn.get("full").forward


def ln(x, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def make(rng, b=2, h=2, n=30, d=5, c=5, per_head=True):
    q, k, v = (rng.standard_normal((b, h, n, d)) for _ in range(3))
    mu = RT.draw_centroids(rng, c, d, heads=h if per_head else None)
    return q, k, v, mu


def test_balanced_clusters_have_w_nearest_members():
    rng = np.random.default_rng(0)
    q, k, v, mu = make(rng, n=31, c=5)
    _, cache = RT.forward(q, k, v, centroids=mu)
    w = -(-31 // 5)
    assert cache.q_idx.shape == (2, 2, 5, w) and cache.k_idx.shape == (2, 2, 5, w)
    qn = ln(q)
    for b in range(2):
        for h in range(2):
            for a in range(5):
                members = cache.q_idx[b, h, a]
                assert len(set(members.tolist())) == w and np.all(np.diff(members) > 0)
                sim = qn[b, h] @ mu[h, a]
                # every member is at least as near to the centroid as every non-member
                outside = np.setdiff1d(np.arange(31), members)
                assert sim[members].min() >= sim[outside].max()


def test_online_kmeans_moves_centroids_towards_members():
    rng = np.random.default_rng(1)
    d, c = 4, 3
    centres = rng.standard_normal((c, d)) * 4
    x = centres[rng.integers(0, c, 200)] + 0.3 * rng.standard_normal((200, d))
    qn, kn = ln(x)[None], ln(x + 0.1 * rng.standard_normal(x.shape))[None]
    mu = RT.draw_centroids(rng, c, d)

    def spread(m):   # mean distance of every point to its nearest centroid
        return np.mean([np.min(np.linalg.norm(m - p, axis=-1)) for p in np.concatenate([qn[0], kn[0]])])

    # decay 0: the new centroid is the average of its query members' mean and key members' mean
    a_q, a_k = RT.assign(qn, mu)[0], RT.assign(kn, mu)[0]
    new = RT.update_centroids(mu, qn, kn, decay=0.0)
    for j in range(c):
        if (a_q == j).any() and (a_k == j).any():
            np.testing.assert_allclose(new[j], (qn[0][a_q == j].mean(0) + kn[0][a_k == j].mean(0)) / 2, atol=1e-12)
    # the paper's decay: a small step towards the members, and repeated steps reduce the spread
    step = RT.update_centroids(mu, qn, kn)
    np.testing.assert_allclose(step, 0.999 * mu + 0.001 * new, atol=1e-12)
    m = mu
    before = spread(m)
    for _ in range(20):
        m = RT.update_centroids(m, qn, kn, decay=0.5)
    assert spread(m) < 0.8 * before
    summed = RT.update_centroids(mu, qn, kn, decay=0.9, reduce="sum")
    a = RT.assign(qn, mu)[0]
    j = int(a[0])
    members_k = kn[0][RT.assign(kn, mu)[0] == j]
    assert np.allclose(summed[j] - 0.9 * mu[j], 0.05 * qn[0][a == j].sum(0) + 0.05 * members_k.sum(0))


@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_dense_reference(causal):
    rng = np.random.default_rng(2)
    for n in (6, 17, 30):
        q, k, v, mu = make(rng, n=n, c=3)
        km = rng.random((2, 1, n)) > 0.3
        km[..., 0] = True
        out, cache = RT.forward(q, k, v, centroids=mu, causal=causal, key_mask=km)
        np.testing.assert_allclose(out, RT.reference(q, k, v, centroids=mu, causal=causal, key_mask=km),
                                   rtol=0, atol=1e-12)
        np.testing.assert_allclose(out, RT.weights(cache) @ v, rtol=0, atol=1e-12)


def test_mean_over_clusters_by_hand():
    """A token in two clusters gets the mean of its two cluster outputs; in none, zero."""
    rng = np.random.default_rng(3)
    q, k, v, mu = make(rng, b=1, h=1, n=12, c=3, per_head=False)
    out, cache = RT.forward(q, k, v, centroids=mu, window=3)        # 3 x 3 = 9 slots < 12 tokens
    qn, kn = ln(q)[0, 0], ln(k)[0, 0]
    expect = np.zeros((12, 5))
    count = np.zeros(12)
    for a in range(3):
        qi, ki = cache.q_idx[0, 0, a], cache.k_idx[0, 0, a]
        s = qn[qi] @ kn[ki].T / np.sqrt(5)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        expect[qi] += p @ v[0, 0][ki]
        count[qi] += 1
    expect /= np.maximum(count, 1)[:, None]
    np.testing.assert_allclose(out[0, 0], expect, atol=1e-12)
    assert (count == 0).any() and np.all(out[0, 0][count == 0] == 0)


def test_pattern_is_shared_cluster_membership():
    rng = np.random.default_rng(4)
    q, k, v, mu = make(rng, n=20, c=4)
    _, cache = RT.forward(q, k, v, centroids=mu)
    pat = RT.pattern(cache)
    for b in range(2):
        for h in range(2):
            expect = np.zeros((20, 20), bool)
            for a in range(4):
                for i in cache.q_idx[b, h, a]:
                    for j in cache.k_idx[b, h, a]:
                        expect[i, j] = True
            np.testing.assert_array_equal(pat[b, h], expect)


def test_recent_selection_is_causal_and_topk_leaks():
    leaked = False
    for seed in range(20):
        rng = np.random.default_rng(seed)
        q, k, v, mu = make(rng, n=24, c=4)
        t = 12
        q2, k2 = q.copy(), k.copy()
        q2[..., t:, :] = rng.standard_normal(q2[..., t:, :].shape)
        k2[..., t:, :] = rng.standard_normal(k2[..., t:, :].shape)
        for selection in ("recent", "topk"):
            a, cache = RT.forward(q, k, v, centroids=mu, causal=True, selection=selection)
            b, _ = RT.forward(q2, k2, v, centroids=mu, causal=True, selection=selection)
            same = np.array_equal(a[..., :t, :], b[..., :t, :])
            if selection == "recent":
                assert same
                W = RT.weights(cache)
                assert np.all(np.triu(W, 1) == 0) and ((W > 0).sum(-1) <= 6).all()   # w = 24 / 4
            else:
                leaked |= not same
    assert leaked


@pytest.mark.parametrize("options", [
    {"causal": True, "selection": "topk"}, {"window": 2}, {"scale": 1.0}, {"selection": "recent"},
])
def test_gradients_of_other_options(options):
    rng = np.random.default_rng(5)
    q, k, v, mu = make(rng, b=1, n=10, d=3, c=3)
    errors = check_gradients(RT.forward, RT.backward, {"q": q, "k": k, "v": v}, {"centroids": mu, **options}, rng=rng)
    assert max(errors.values()) < 1e-6, errors


def test_padding_moves_no_centroid():
    rng = np.random.default_rng(8)
    q, k, _, mu = make(rng, n=12, c=3, per_head=False)
    km = np.ones((2, 1, 12), bool)
    km[:, :, 8:] = False
    qn, kn = ln(q), ln(k)
    a = RT.update_centroids(mu, qn, kn, key_mask=km)
    qn2, kn2 = qn.copy(), kn.copy()
    qn2[..., 8:, :] = 50.0
    kn2[..., 8:, :] = -50.0
    np.testing.assert_allclose(RT.update_centroids(mu, qn2, kn2, key_mask=km), a, atol=1e-12)
    np.testing.assert_allclose(a, RT.update_centroids(mu, qn[..., :8, :], kn[..., :8, :]), atol=1e-12)


def test_draw_centroids_from_data_picks_distinct_data_rows():
    rng = np.random.default_rng(7)
    x = ln(rng.standard_normal((2, 3, 20, 4)))
    mu = RT.draw_centroids_from_data(np.random.default_rng(0), x, 6)
    rows = x.reshape(-1, 4)
    hits = [np.flatnonzero((rows == m).all(-1)) for m in mu]
    assert all(len(h) == 1 for h in hits) and len({int(h[0]) for h in hits}) == 6
    with pytest.raises(ValueError, match="c must"):
        RT.draw_centroids_from_data(rng, x, 500)


def test_bad_arguments():
    rng = np.random.default_rng(6)
    q, k, v, mu = make(rng)
    with pytest.raises(ValueError, match="centroids"):
        RT.forward(q, k, v)
    with pytest.raises(ValueError, match="centroids"):
        RT.forward(q, k, v, centroids=mu[..., :2])
    with pytest.raises(ValueError, match="selection"):
        RT.forward(q, k, v, centroids=mu, selection="nearest")
    with pytest.raises(ValueError, match="decay"):
        RT.update_centroids(mu, ln(q), ln(k), decay=2.0)


# --------------------------------------------------------------------------- decoding
def _decode(q, k, v, prompt, km=None, **config):
    """prefill the first ``prompt`` tokens, then step: the rows and (copies of) the states after each token."""
    state = RT.init_state(lead=q.shape[:-2], d=q.shape[-1], dv=v.shape[-1], **config)
    kmb = None if km is None else np.broadcast_to(km, q.shape[:-1])
    snapshot = lambda s: s._replace(k=s.k.copy(), filled=s.filled.copy(), count=s.count.copy())  # noqa: E731
    out, state = RT.prefill(q[..., :prompt, :], k[..., :prompt, :], v[..., :prompt, :], state,
                            key_mask=None if kmb is None else kmb[..., :prompt])
    rows, states = [out], [snapshot(state)]
    for t in range(prompt, q.shape[-2]):
        o, state = RT.step(q[..., t, :], k[..., t, :], v[..., t, :], state,
                           key_mask_t=None if kmb is None else kmb[..., t])
        rows.append(o[..., None, :])
        states.append(snapshot(state))
    return np.concatenate(rows, axis=-2), states


@pytest.mark.parametrize("per_head,window,c", [(True, 6, 5), (False, 6, 5), (True, 1, 3), (True, 2, 2), (False, 50, 4)])
def test_decoding_equals_the_causal_forward(per_head, window, c):
    rng = np.random.default_rng(window + c)
    q, k, v, mu = make(rng, n=33, c=c, per_head=per_head)
    km = rng.random((2, 1, 33)) > 0.3
    km[..., 0] = True
    for mask in (None, km):
        want, _ = RT.forward(q, k, v, centroids=mu, window=window, causal=True, key_mask=mask)
        for prompt in (1, 10, 32):
            got, _ = _decode(q, k, v, prompt, mask, centroids=mu, window=window)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=f"prompt {prompt}")


def test_decoding_state_is_the_last_w_keys_of_every_cluster():
    """After t tokens each cluster's ring holds the layer-normalised keys of its last w real members (by plain
    Python), and the state's size is c w (d + dv + 1) + c per head from the start."""
    rng = np.random.default_rng(31)
    n, c, w, d = 30, 3, 4, 5
    q, k, v, mu = make(rng, b=1, h=2, n=n, d=d, c=c)
    km = rng.random((1, 1, n)) > 0.25
    km[..., 0] = True
    _, states = _decode(q, k, v, 4, km, centroids=mu, window=w)
    kn = ln(k)
    cluster = np.einsum("bhnd,hcd->bhnc", kn, mu).argmax(-1)
    assert {state_size(s) for s in states} == {2 * (c * w * (d + d + 1) + c)}
    for state in states:
        for h, a in itertools.product(range(2), range(c)):
            members = [j for j in range(state.t) if km[0, 0, j] and cluster[0, h, j] == a][-w:]
            held = state.k[0, h, a][state.filled[0, h, a]]
            want = kn[0, h, members]
            assert held.shape == want.shape
            np.testing.assert_allclose(held[np.lexsort(held.T)], want[np.lexsort(want.T)], rtol=0, atol=1e-14)


def test_decoding_refuses_topk_and_a_default_window():
    rng = np.random.default_rng(32)
    q, k, v, mu = make(rng)
    with pytest.raises(ValueError, match="selection='topk' with causal=True cannot decode"):
        RT.init_state(lead=(2, 2), d=5, dv=5, centroids=mu, window=4, selection="topk")
    with pytest.raises(ValueError, match="window must be given"):
        RT.init_state(lead=(2, 2), d=5, dv=5, centroids=mu)
    with pytest.raises(ValueError, match="centroids"):
        RT.init_state(lead=(2, 3), d=5, dv=5, centroids=mu, window=4)
    with pytest.raises(ValueError, match="window"):
        RT.init_state(lead=(2, 2), d=5, dv=5, centroids=mu, window=0)
    state = RT.init_state(lead=(2, 2), d=5, dv=5, centroids=mu, window=4)
    with pytest.raises(ValueError, match="v must have shape"):
        RT.prefill(q, k, v[..., :2], state)
    _, state = RT.prefill(q[..., :3, :], k[..., :3, :], v[..., :3, :], state)
    with pytest.raises(ValueError, match="fresh"):
        RT.prefill(q, k, v, state)
    with pytest.raises(ValueError, match="q_t"):
        RT.step(q[..., 3, :2], k[..., 3, :], v[..., 3, :], state)
