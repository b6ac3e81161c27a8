"""Funnel Transformer's pooled-query attention (effattn.layers.funnel) and the pooling of
effattn.nn.pooling: the groups of the paper's rule (written out by hand), the layer against its
per-position reference for every pooling option, gradients of max pooling and other strides,
the key-mask rule ("a pooled position is real if any of its positions is"), the upsampling of the
decoder, and bad configuration."""
import numpy as np
import pytest

import effattn
from effattn.gradcheck import check_gradients
from effattn.layers import funnel
from effattn.nn import pooling

SPEC = effattn.get("funnel")


def case(seed, B=2, N=9, heads=2, d=3):
    rng = np.random.default_rng(seed)
    D = heads * d
    return rng, rng.standard_normal((B, N, D)), funnel.init_params(rng, D)


@pytest.mark.parametrize("n,stride,cls,want", [
    (7, 2, True, [[0, -1], [1, 2], [3, 4], [5, 6]]),
    (8, 2, True, [[0, -1], [1, 2], [3, 4], [5, 6], [7, -1]]),
    (6, 2, False, [[0, 1], [2, 3], [4, 5]]),
    (7, 3, False, [[0, 1, 2], [3, 4, 5], [6, -1, -1]]),
    (1, 2, True, [[0, -1]]),
])
def test_groups_follow_the_paper_rule(n, stride, cls, want):
    """Consecutive positions by the stride; [CLS] (position 0) alone when kept out of the pooling."""
    g = np.asarray(pooling.pool_groups(n, stride, cls))
    np.testing.assert_array_equal(g, want)
    assert g.shape[0] == pooling.pooled_length(n, stride, cls)
    members = np.sort(g[g >= 0])
    np.testing.assert_array_equal(members, np.arange(n))          # a partition of the positions


@pytest.mark.parametrize("pool", ["mean", "max"])
@pytest.mark.parametrize("stride,cls", [(2, True), (2, False), (3, True), (4, False)])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_equals_the_per_position_reference(pool, stride, cls, masked):
    rng, x, p = case(stride * 7 + cls, N=11)
    km = rng.random((2, 11)) > 0.3 if masked else None
    if km is not None:
        km[:, 0] = True
    cfg = dict(heads=2, stride=stride, pool=pool, separate_cls=cls, key_mask=km)
    out, c = funnel.forward(x, **cfg, **p)
    ref = funnel.reference(x, **cfg, **p)
    rows = np.ones(out.shape[:-1], bool) if km is None else funnel.pooled_mask(c)
    np.testing.assert_allclose(out[rows], ref[rows], rtol=0, atol=1e-12)


@pytest.mark.parametrize("pool,stride,cls", [("max", 2, True), ("mean", 3, False), ("max", 4, False)])
def test_gradients_of_every_pooling(pool, stride, cls):
    rng, x, p = case(5, N=10)
    km = np.ones((2, 10), bool)
    km[0, 6:] = False
    for mask in (None, km):
        errors = check_gradients(funnel.forward, funnel.backward, {"x": x, **p},
                                 dict(heads=2, stride=stride, pool=pool, separate_cls=cls, key_mask=mask), rng=rng)
        assert max(errors.values()) < 1e-6, errors


def test_a_pooled_position_is_real_if_any_member_is_and_masked_inputs_change_nothing():
    rng, x, p = case(8, B=1, N=9)
    km = np.array([[True, True, False, False, False, True, False, True, True]])
    for pool in ("mean", "max"):
        out, c = funnel.forward(x, heads=2, pool=pool, key_mask=km, **p)
        # groups {0}, {1,2}, {3,4}, {5,6}, {7,8}
        np.testing.assert_array_equal(funnel.pooled_mask(c), [[True, True, False, True, True]])
        x2 = x.copy()
        x2[~km] = 50 * rng.standard_normal(x2[~km].shape)
        out2, _ = funnel.forward(x2, heads=2, pool=pool, key_mask=km, **p)
        real = funnel.pooled_mask(c)
        np.testing.assert_allclose(out2[real], out[real], rtol=0, atol=1e-12)


def test_mean_pooling_of_a_full_sequence_is_the_plain_average():
    """Without a mask, a group's pooled query is the plain mean of its members (the paper's pool)."""
    x = np.arange(2 * 7 * 2, dtype=float).reshape(2, 7, 2)
    y, mask, _ = pooling.pool_forward(x, pooling.pool_groups(7, 2, True), mode="mean")
    assert mask is None
    np.testing.assert_array_equal(y[0, 0], x[0, 0])
    np.testing.assert_array_equal(y[0, 1], (x[0, 1] + x[0, 2]) / 2)
    np.testing.assert_array_equal(y[1, 3], (x[1, 5] + x[1, 6]) / 2)
    z, _, _ = pooling.pool_forward(x, pooling.pool_groups(7, 2, True), mode="max")
    np.testing.assert_array_equal(z[1, 2], np.maximum(x[1, 3], x[1, 4]))


def test_upsampling_repeats_each_row_over_its_group_and_its_backward_sums():
    rng = np.random.default_rng(3)
    g = pooling.pool_groups(9, 2, True)
    h = rng.standard_normal((2, g.shape[0], 3))
    up, c = pooling.upsample_forward(h, g, 9)
    np.testing.assert_array_equal(up[:, 1], h[:, 1])       # groups {0}, {1, 2}, {3, 4}, {5, 6}, {7, 8}
    np.testing.assert_array_equal(up[:, 2], h[:, 1])
    np.testing.assert_array_equal(up[:, 8], h[:, 4])
    np.testing.assert_array_equal(up[:, 0], h[:, 0])
    errors = check_gradients(lambda h: pooling.upsample_forward(h, g, 9),
                             lambda d, c: {"h": pooling.upsample_backward(d, c)}, {"h": h})
    assert errors["h"] < 1e-8


def test_the_attention_reads_every_real_position():
    """weights: (B, h, N', N), rows sum to 1 over the real positions, zero on masked ones."""
    rng, x, p = case(4, N=8)
    km = np.ones((2, 8), bool)
    km[1, 5:] = False
    _, c = funnel.forward(x, heads=2, key_mask=km, **p)
    w = funnel.weights(c)
    assert w.shape == (2, 2, 5, 8)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)
    assert not w[1, :, :, 5:].any()


def test_causal_is_refused_with_the_reason_and_bad_options_are_named():
    rng, x, p = case(1)
    with pytest.raises(ValueError, match="pooled query summarises"):
        funnel.forward(x, causal=True, **p)
    for bad, name in (({"pool": "min"}, "pool"), ({"stride": 0}, "stride"), ({"heads": 4}, "heads"),
                      ({"separate_cls": "yes"}, "separate_cls")):
        with pytest.raises(ValueError, match=name):
            funnel.forward(x, **bad, **p)
    q = dict(p)
    del q["Wo"]
    with pytest.raises(ValueError, match="Wo"):
        funnel.forward(x, **q)
