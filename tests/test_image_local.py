"""Image Transformer local attention (1-D and 2-D): the fast paths against a per-query loop
with the paper's rule written in pixel coordinates, the window copies against fancy-index
gathers, conventions, ragged images, validation and figures."""
import numpy as np
import pytest

import effattn
from effattn.attention import image_local as il
from effattn.attention import local
from effattn.gradcheck import check_gradients


def qkv(rng, lead, n, d=4, dv=3):
    return rng.standard_normal((*lead, n, d)), rng.standard_normal((*lead, n, d)), rng.standard_normal((*lead, n, dv))


def rule_1d(lq, lm, causal):
    def allowed(i, j):
        g = i // lq
        return g * lq - lm <= j < (g + 1) * lq and (not causal or j <= i)
    return allowed


def rule_2d(shape, qs, fl, causal):
    w = shape[1]

    def allowed(i, j):
        (r, c), (rj, cj) = divmod(i, w), divmod(j, w)
        top, left = (r // qs[0]) * qs[0], (c // qs[1]) * qs[1]
        return (top - fl[0] <= rj < top + qs[0] and left - fl[1] <= cj < left + qs[1] + fl[1]
                and (not causal or j <= i))
    return allowed


def check_against_loop(out, q, k, v, allowed, km):
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            ref = il.image_local_loop(q[b, h], k[b, h], v[b, h], allowed, key_mask=km[b, 0])
            np.testing.assert_allclose(out[b, h], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n,lq,lm,causal", [(20, 4, 6, True), (20, 4, 6, False), (13, 5, 0, True),
                                            (17, 3, 10, False), (6, 8, 3, True)])
def test_1d_matches_per_query_loop(n, lq, lm, causal):
    rng = np.random.default_rng(n + lq + lm)
    q, k, v = qkv(rng, (2, 2), n)
    km = rng.random((2, 1, n)) > 0.25
    out, _ = il.forward_1d(q, k, v, block_length=lq, memory_length=lm, causal=causal, key_mask=km)
    check_against_loop(out, q, k, v, rule_1d(lq, lm, causal), km)


@pytest.mark.parametrize("n,shape,qs,fl,causal", [(24, (4, 6), (2, 3), (1, 1), True),
                                                 (24, (4, 6), (2, 3), (1, 1), False),
                                                 (23, (4, 6), (2, 2), (2, 1), True),      # ragged last row
                                                 (13, (3, 5), (2, 2), (0, 0), False),
                                                 (17, (5, 4), (3, 3), (2, 3), True),
                                                 (7, (2, 4), (4, 8), (1, 1), False)])     # block bigger than image
def test_2d_matches_per_query_loop(n, shape, qs, fl, causal):
    rng = np.random.default_rng(n * 3 + qs[0])
    q, k, v = qkv(rng, (2, 2), n)
    km = rng.random((2, 1, n)) > 0.25
    out, _ = il.forward_2d(q, k, v, image_shape=shape, query_shape=qs, memory_flange=fl, causal=causal, key_mask=km)
    check_against_loop(out, q, k, v, rule_2d(shape, qs, fl, causal), km)


def test_pattern_helpers_are_the_rules():
    n, shape, qs, fl = 22, (4, 6), (2, 4), (1, 2)
    for causal in (False, True):
        a = rule_2d(shape, qs, fl, causal)
        ref = np.array([[a(i, j) for j in range(n)] for i in range(n)])
        assert np.array_equal(il.image_local_2d_pattern(n, shape, qs, fl, causal, xp=np), ref)
        a = rule_1d(5, 7, causal)
        ref = np.array([[a(i, j) for j in range(n)] for i in range(n)])
        assert np.array_equal(il.image_local_1d_pattern(n, 5, 7, causal, xp=np), ref)
    assert np.array_equal(il.image_local_2d_pattern(n, shape, qs, fl, True, xp=np),
                          np.tril(il.image_local_2d_pattern(n, shape, qs, fl, False, xp=np)))


def test_memory_blocks_2d_is_a_gather_and_its_adjoint():
    rng = np.random.default_rng(0)
    n, shape, qs, fl = 21, (4, 6), (2, 4), (1, 2)
    x = rng.standard_normal((2, n, 3))
    mem = il.memory_blocks_2d(x, shape, qs, fl)
    _, kpos = il.positions_2d(np, n, shape, qs, fl)
    inside = (kpos >= 0) & (kpos < n)
    np.testing.assert_array_equal(mem, np.where(inside[..., None], x[:, np.clip(kpos, 0, n - 1)], 0.0))
    g = rng.standard_normal(mem.shape)
    back = il.memory_blocks_2d_backward(g, n, shape, qs, fl)
    np.testing.assert_allclose((mem * g).sum(), (x * back).sum(), rtol=1e-12)
    qb = il.query_blocks_2d(x, shape, qs)
    np.testing.assert_array_equal(il.query_blocks_2d_backward(qb, n, shape, qs), x)


def test_tensor2tensor_masked_local_1d_is_local_with_one_block_of_look_back():
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, (1, 2), 29)
    a, _ = il.forward_1d(q, k, v, block_length=6, memory_length=6, causal=True)
    b, _ = local.forward(q, k, v, block=6, look_back=1, causal=True)
    np.testing.assert_allclose(a, b, atol=1e-14)


def test_2d_with_row_blocks_and_no_flange_is_1d_blocks():
    """query_shape (1, W) and flange (0, 0): each image row is one block attending to itself."""
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, (1, 1), 20)
    a, _ = il.forward_2d(q, k, v, image_shape=(4, 5), query_shape=(1, 5), memory_flange=(0, 0), causal=True)
    b, _ = il.forward_1d(q, k, v, block_length=5, memory_length=0, causal=True)
    np.testing.assert_allclose(a, b, atol=1e-14)


def test_image_shape_for_any_length():
    for n in range(1, 300):
        h, w = il.image_shape_for(n)
        assert (h - 1) * w < n <= h * w and abs(h - w) <= 1


def test_gradients_of_non_default_configurations():
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, (1, 2), 14, d=3, dv=2)
    km = rng.random((1, 1, 14)) > 0.3
    cfgs = [(il.forward_2d, il.backward_2d, {"image_shape": (3, 5), "query_shape": (2, 3), "memory_flange": (1, 2),
                                             "causal": True, "key_mask": km}),
            (il.forward_2d, il.backward_2d, {"image_shape": (4, 4), "query_shape": (3, 2), "memory_flange": (2, 0)}),
            (il.forward_1d, il.backward_1d, {"block_length": 4, "memory_length": 5, "key_mask": km})]
    for f, bwd, cfg in cfgs:
        errors = check_gradients(f, bwd, {"q": q, "k": k, "v": v}, cfg, rng=rng)
        assert max(errors.values()) < 1e-7, (cfg, errors)


def test_validation():
    q = np.zeros((1, 10, 2))
    with pytest.raises(ValueError, match="image_shape"):
        il.forward_2d(q, q, q, image_shape=(2, 4))                            # 8 cells < 10 positions
    with pytest.raises(ValueError, match="image_shape"):
        il.forward_2d(q, q, q, image_shape=(5, 4))                            # a whole empty row
    with pytest.raises(ValueError, match="memory_flange"):
        il.forward_2d(q, q, q, image_shape=(2, 5), memory_flange=(1, -1))
    with pytest.raises(ValueError, match="query_shape"):
        il.forward_2d(q, q, q, image_shape=(2, 5), query_shape=(2,))
    with pytest.raises(ValueError, match="memory_length"):
        il.forward_1d(q, q, q, block_length=2, memory_length=-1)


def test_registry_entries_and_figures(tmp_path):
    for name in ("image_local_1d", "image_local_2d"):
        spec = effattn.get(name)
        assert spec.notebook == "01_fixed_patterns" and spec.classes == ("FP",) and spec.complexity == "O(N·m)"
        paths = spec.figures(str(tmp_path), np.random.default_rng(0))
        assert paths and all(f"{name}_" in p for p in paths)
