"""Reformer LSH attention: independent oracles (dense masked attention, a loop over chunks,
the paper's round-combination formula). The hash and the sorted layout: tests/test_lsh.py."""
import numpy as np
import pytest

import effattn
from effattn.attention import reformer as R
from effattn.gradcheck import check_gradients

full = effattn.get("full").forward


def unit(k, eps=1e-6):
    return k / np.sqrt((k * k).mean(-1, keepdims=True) + eps) / np.sqrt(k.shape[-1])


def make(rng, b=2, h=2, n=29, d=4, rounds=1, buckets=6, per_head=True):
    q, k, v = (rng.standard_normal((b, h, n, d)) for _ in range(3))
    rot = R.draw_rotations(rng, d, buckets, rounds, heads=h if per_head else None)
    return q, k, v, rot


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunking", ["sorted", "bucket"])
def test_one_round_equals_dense_masked_by_induced_pattern(causal, chunking):
    rng = np.random.default_rng(0)
    for n in (7, 16, 29):
        q, k, v, rot = make(rng, n=n)
        km = rng.random((2, 1, n)) > 0.25
        km[..., 0] = True
        out, cache = R.forward(q, k, v, rotations=rot, chunk_size=4, causal=causal, key_mask=km, chunking=chunking)
        ref, _ = full(q, unit(k), v, mask=R.pattern(cache), scale=1.0)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_loop_over_chunks_oracle(causal):
    rng = np.random.default_rng(1)
    for n, c in ((10, 3), (24, 4), (31, 8)):
        q, k, v = (rng.standard_normal((n, 5)) for _ in range(3))
        rot = R.draw_rotations(rng, 5, 4, 1)
        out, _ = R.forward(q, k, v, rotations=rot, chunk_size=c, causal=causal, chunking="sorted")
        np.testing.assert_allclose(out, R.loop(q, k, v, rotations=rot, chunk_size=c, causal=causal),
                                   rtol=0, atol=1e-12)


def test_shared_qk_keys_are_normalised():
    rng = np.random.default_rng(3)
    q, k, v, rot = make(rng, rounds=2)
    a, _ = R.forward(q, k, v, rotations=rot, chunk_size=4, norm_eps=1e-30)
    b, _ = R.forward(q, 3.0 * k, v, rotations=rot, chunk_size=4, norm_eps=1e-30)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_identical_rounds_equal_one_round():
    """Buckets that coincide in every round: the union is one round's window, each key once."""
    rng = np.random.default_rng(4)
    q, k, v, rot = make(rng, rounds=1, per_head=False)
    one, _ = R.forward(q, k, v, rotations=rot, chunk_size=4)
    rot3 = np.concatenate([rot, rot, rot], axis=0)
    for dedupe in (True, False):
        three, _ = R.forward(q, k, v, rotations=rot3, chunk_size=4, dedupe=dedupe)
        np.testing.assert_allclose(three, one, rtol=0, atol=1e-12)


def test_rounds_with_duplicate_correction_are_dense_over_the_union():
    rng = np.random.default_rng(5)
    q, k, v, rot = make(rng, rounds=3, per_head=False)
    out, cache = R.forward(q, k, v, rotations=rot, chunk_size=4, self_penalty=None)
    union = np.zeros(q.shape[:-2] + (q.shape[-2],) * 2, bool)
    for r in range(3):
        _, c1 = R.forward(q, k, v, rotations=rot[r:r + 1], chunk_size=4, self_penalty=None)
        union |= R.pattern(c1)
    ref, _ = full(q, unit(k), v, mask=union, scale=1.0)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


def test_without_duplicate_correction_keys_count_once_per_round():
    """dedupe=False (HF, trax): W_ij proportional to N_ij exp(q_i . k_j) over the union."""
    rng = np.random.default_rng(6)
    q, k, v, rot = make(rng, rounds=3, per_head=False)
    _, cache = R.forward(q, k, v, rotations=rot, chunk_size=4, self_penalty=None, dedupe=False)
    counts = 0
    for r in range(3):
        _, c1 = R.forward(q, k, v, rotations=rot[r:r + 1], chunk_size=4, self_penalty=None)
        counts = counts + R.pattern(c1)
    s = np.exp(q @ np.swapaxes(unit(k), -1, -2)) * counts
    expected = s / s.sum(-1, keepdims=True)
    np.testing.assert_allclose(R.weights(cache), expected, rtol=0, atol=1e-12)
    assert counts.max() > 1   # some key really was seen twice


def test_mean_combination_is_the_average_of_rounds():
    rng = np.random.default_rng(7)
    q, k, v, rot = make(rng, rounds=2)
    out, _ = R.forward(q, k, v, rotations=rot, chunk_size=4, combine="mean")
    rounds = [R.forward(q, k, v, rotations=rot[:, r:r + 1], chunk_size=4)[0] for r in range(2)]
    np.testing.assert_allclose(out, (rounds[0] + rounds[1]) / 2, rtol=0, atol=1e-12)


def test_self_attention_only_when_nothing_else_is_visible():
    rng = np.random.default_rng(8)
    q, k, v, rot = make(rng, n=17)
    _, cache = R.forward(q, q.copy(), v, rotations=rot, chunk_size=4, causal=True)
    W = R.weights(cache)
    assert W[..., 0, 0].min() == 1.0                      # the first token sees only itself
    diag = np.diagonal(W, axis1=-2, axis2=-1)
    offrow = (W > 0).sum(-1) - (diag > 0)
    assert np.all(diag[offrow > 0] == 0)                  # never itself when another key is visible


def test_bucket_chunking_is_strictly_causal_and_sorted_chunking_leaks():
    """Chunks of the global sort depend on later tokens' buckets (the paper's causal mode leaks);
    per-bucket chunks do not."""
    leaked = False
    for seed in range(30):
        rng = np.random.default_rng(seed)
        q, k, v, rot = make(rng, n=24, buckets=4)
        t = 12
        k2 = k.copy()
        k2[..., t:, :] = rng.standard_normal(k2[..., t:, :].shape)
        for chunking in ("bucket", "sorted"):
            a, _ = R.forward(q, k, v, rotations=rot, chunk_size=3, causal=True, chunking=chunking)
            b, _ = R.forward(q, k2, v, rotations=rot, chunk_size=3, causal=True, chunking=chunking)
            same = np.array_equal(a[..., :t, :], b[..., :t, :])
            if chunking == "bucket":
                assert same
            else:
                leaked |= not same
    assert leaked


@pytest.mark.parametrize("options", [
    {"combine": "mean"}, {"shared_qk": False}, {"dedupe": False}, {"chunking": "sorted", "causal": True},
    {"chunks_before": 2, "chunks_after": 1}, {"scale": 0.7, "self_penalty": 50.0},
])
def test_gradients_of_other_options(options):
    rng = np.random.default_rng(9)
    q, k, v, rot = make(rng, b=1, n=11, d=3, rounds=2)
    config = {"rotations": rot, "chunk_size": 3, **options}
    errors = check_gradients(R.forward, R.backward, {"q": q, "k": k, "v": v}, config, rng=rng)
    assert max(errors.values()) < 1e-6, errors


def test_weights_rows_and_layout():
    rng = np.random.default_rng(10)
    q, k, v, rot = make(rng, n=21, rounds=2)
    km = np.ones((2, 1, 21), bool)
    km[0, 0, 15:] = False
    out, cache = R.forward(q, k, v, rotations=rot, chunk_size=4, key_mask=km)
    W = R.weights(cache)
    np.testing.assert_allclose(W[0][:, :15, :].sum(-1), 1.0, atol=1e-12)   # real rows sum to one
    np.testing.assert_allclose(W[1].sum(-1), 1.0, atol=1e-12)
    assert np.all(W[0][..., 15:] == 0)
    # every token sits in exactly one slot per round; masked tokens in the padding bucket
    assert np.all(cache.buckets[0][..., 15:] == 6)
    st = cache.slot_token
    for r in range(2):
        toks = np.sort(st[0, 0, r][st[0, 0, r] < 21])
        np.testing.assert_array_equal(toks, np.arange(21))


def test_bad_arguments():
    rng = np.random.default_rng(11)
    q, k, v, rot = make(rng)
    with pytest.raises(ValueError, match="rotations"):
        R.forward(q, k, v, chunk_size=4)
    with pytest.raises(ValueError, match="rotations"):
        R.forward(q, k, v, rotations=rot[..., :3, :], chunk_size=4)
    with pytest.raises(ValueError, match="combine"):
        R.forward(q, k, v, rotations=rot, chunk_size=4, combine="max")
    with pytest.raises(ValueError, match="n_buckets"):
        R.draw_rotations(rng, 4, 5)
