"""ETC: per-query loop oracle of the four pieces with Shaw-style relative embeddings,
hard segment masks, gradients of rel_emb, and the refusal to decode."""
import numpy as np
import pytest

import effattn
from effattn.attention import etc
from effattn.gradcheck import check_gradients

SPEC = effattn.get("etc")


def loop_oracle(q, k, v, ng, r, kmax, rel_emb, seg, hard_l2g, key_mask):
    """e_ij = q_i . (k_j + a_{clip(j-i)}) / sqrt(d) on g2g and l2l, q_i . k_j / sqrt(d) on g2l / l2g."""
    bsz, heads, n, d = q.shape
    out = np.zeros(v.shape)
    km = np.ones((bsz, 1, n), bool) if key_mask is None else np.broadcast_to(key_mask, (bsz, 1, n))
    for b in range(bsz):
        for h in range(heads):
            for i in range(n):
                keys, logits = [], []
                for j in range(n):
                    ig, jg = i < ng, j < ng
                    if ig and not jg and seg is not None and seg[j - ng] != i:
                        continue                                     # hard g2l
                    if not ig and jg and hard_l2g and seg[i - ng] != j:
                        continue                                     # hard l2g
                    if not ig and not jg and abs(i - j) > r:
                        continue                                     # l2l radius
                    if not km[b, 0, j]:
                        continue
                    key = k[b, h, j].copy()
                    if ig == jg:                                     # g2g and l2l carry the distance label
                        key = key + rel_emb[min(max(j - i, -kmax), kmax) + kmax]
                    keys.append(j)
                    logits.append(q[b, h, i] @ key / np.sqrt(d))
                if not keys:
                    continue
                s = np.array(logits)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, h, i] = sum(pj * v[b, h, j] for pj, j in zip(p, keys))
    return out


@pytest.mark.parametrize("segments,hard_l2g", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("n,ng,r,kmax", [(14, 2, 3, 2), (25, 3, 2, 4), (9, 1, 5, 1), (33, 4, 4, 4)])
def test_forward_matches_loop_oracle(n, ng, r, kmax, segments, hard_l2g):
    rng = np.random.default_rng(n * 7 + ng)
    q, k, v = (rng.standard_normal((2, 2, n, 4)) for _ in range(3))
    rel = rng.standard_normal((2 * kmax + 1, 4))
    seg = etc.contiguous_segments(n - ng, ng) if segments else None
    if segments:
        seg = seg.copy()
        seg[1] = -1                                            # a long token in no segment
    key_mask = rng.random((2, 1, n)) > 0.25
    key_mask[:, :, 0] = True
    cfg = dict(n_global=ng, radius=r, max_distance=kmax, rel_emb=rel, segment_ids=seg, hard_l2g=hard_l2g)
    out, cache = etc.forward(q, k, v, key_mask=key_mask, **cfg)
    ref = loop_oracle(q, k, v, ng, r, kmax, rel, seg, hard_l2g, key_mask)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(etc.reference(q, k, v, key_mask=key_mask, **cfg), ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(etc.weights(cache) @ v, out, rtol=0, atol=1e-10)


def test_relative_labels_are_clipped():
    lab = etc.relative_labels(np.arange(6), np.arange(6), 2, np)
    assert lab[0, 5] == 4 and lab[5, 0] == 0 and lab[3, 3] == 2 and lab[2, 3] == 3


def test_far_embeddings_only_reach_clipped_distances():
    """With radius r > k, a_{+-k} is shared by every distance >= k: changing a row of rel_emb
    changes exactly the pairs whose clipped label is that row (checked on the logits via W)."""
    rng = np.random.default_rng(5)
    n, ng, r, kmax = 20, 2, 5, 2
    q, k, v = (rng.standard_normal((1, 1, n, 4)) for _ in range(3))
    rel = rng.standard_normal((2 * kmax + 1, 4))
    cfg = dict(n_global=ng, radius=r, max_distance=kmax)
    W1 = etc.weights(etc.forward(q, k, v, rel_emb=rel, **cfg)[1])[0, 0]
    rel2 = rel.copy()
    rel2[2 * kmax] += 1.0                                       # the label "j - i >= k"
    W2 = etc.weights(etc.forward(q, k, v, rel_emb=rel2, **cfg)[1])[0, 0]
    changed_rows = np.flatnonzero(np.abs(W1 - W2).max(-1) > 1e-12)
    # every row with a key at distance >= k to the right (among those it attends) changes
    for i in range(n):
        lo = i < ng
        has_far = any((j - i) >= kmax and ((j < ng) == lo) and (lo or abs(j - i) <= r) for j in range(n))
        assert (i in changed_rows) == has_far, i


@pytest.mark.parametrize("hard", [False, True])
def test_gradients_with_segments_and_key_mask(hard):
    rng = np.random.default_rng(6)
    n, ng = 13, 3
    q, k, v = (rng.standard_normal((1, 2, n, 3)) for _ in range(3))
    rel = rng.standard_normal((5, 3))
    km = rng.random((1, 1, n)) > 0.3
    km[..., 0] = True
    config = dict(n_global=ng, radius=2, max_distance=2, segment_ids=etc.contiguous_segments(n - ng, ng),
                  hard_l2g=hard, key_mask=km)
    errors = check_gradients(etc.forward, etc.backward, {"q": q, "k": k, "v": v, "rel_emb": rel}, config, rng=rng)
    assert max(errors.values()) < 1e-6, errors


def test_causal_raises_with_the_reason():
    case = SPEC.example(np.random.default_rng(0), batch=1, heads=1, n=10, d=4)
    with pytest.raises(ValueError, match="global tokens summarise the whole input"):
        SPEC.forward(**case.inputs, **{**case.config, "causal": True})


def test_build_pattern_is_the_support_and_refuses_causal():
    rng = np.random.default_rng(8)
    n, ng = 17, 3
    q, k, v = (rng.standard_normal((1, 1, n, 4)) for _ in range(3))
    seg = etc.contiguous_segments(n - ng, ng, xp=np)
    _, cache = etc.forward(q, k, v, n_global=ng, radius=2, max_distance=2, rel_emb=rng.standard_normal((5, 4)),
                           segment_ids=seg, hard_l2g=True)
    pat = etc.build_pattern(n, n_global=ng, radius=2, segment_ids=seg, hard_l2g=True)
    np.testing.assert_array_equal(etc.weights(cache)[0, 0] != 0, pat)
    with pytest.raises(ValueError, match="global tokens summarise the whole input"):
        etc.build_pattern(n, n_global=ng, radius=2, causal=True)


def test_bad_configuration_raises():
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 1, 10, 4)) for _ in range(3))
    rel = rng.standard_normal((5, 4))
    ok = dict(n_global=2, radius=2, max_distance=2, rel_emb=rel)
    etc.forward(q, k, v, **ok)
    with pytest.raises(ValueError, match="rel_emb"):
        etc.forward(q, k, v, **{**ok, "rel_emb": rel[:4]})
    with pytest.raises(ValueError, match="n_global"):
        etc.forward(q, k, v, **{**ok, "n_global": 10})
    with pytest.raises(ValueError, match="segment_ids"):
        etc.forward(q, k, v, **ok, segment_ids=np.full(8, 2))
    with pytest.raises(ValueError, match="segment_ids"):
        etc.forward(q, k, v, **ok, segment_ids=np.zeros(7, int))
    with pytest.raises(ValueError, match="segment_ids"):
        etc.forward(q, k, v, **ok, hard_l2g=True)


def test_registry_entry():
    assert SPEC.classes == ("FP", "M") and not SPEC.causal and SPEC.exact
    assert SPEC.complexity == "O(N_g^2 + N N_g)"
