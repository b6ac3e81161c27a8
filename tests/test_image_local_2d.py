"""Image Transformer 2-D local attention: the fast path against a per-query loop with the
paper's rule written in pixel coordinates, the image layouts of effattn.nn.image against
fancy-index gathers, the default image shape, ragged images, validation and figures."""
import numpy as np
import pytest

import effattn
from effattn.attention import image_local_1d as il1
from effattn.attention import image_local_2d as il2
from effattn.figures import FIGURES
from effattn.gradcheck import check_gradients
from effattn.nn import image
from effattn.nn.loops import masked_loop


def qkv(rng, lead, n, d=4, dv=3):
    return rng.standard_normal((*lead, n, d)), rng.standard_normal((*lead, n, d)), rng.standard_normal((*lead, n, dv))


def rule_2d(shape, qs, fl, causal):
    w = shape[1]

    def allowed(i, j):
        (r, c), (rj, cj) = divmod(i, w), divmod(j, w)
        top, left = (r // qs[0]) * qs[0], (c // qs[1]) * qs[1]
        return (top - fl[0] <= rj < top + qs[0] and left - fl[1] <= cj < left + qs[1] + fl[1]
                and (not causal or j <= i))
    return allowed


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
    out, _ = il2.forward(q, k, v, image_shape=shape, query_shape=qs, memory_flange=fl, causal=causal, key_mask=km)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            ref = masked_loop(q[b, h], k[b, h], v[b, h], allowed=rule_2d(shape, qs, fl, causal), key_mask=km[b, 0])
            np.testing.assert_allclose(out[b, h], ref, rtol=0, atol=1e-12)
            ref = il2.loop(q[b, h], k[b, h], v[b, h], image_shape=shape, query_shape=qs, memory_flange=fl,
                           causal=causal, key_mask=km[b, 0])
            np.testing.assert_allclose(out[b, h], ref, rtol=0, atol=1e-12)


def test_pattern_helper_is_the_rule():
    n, shape, qs, fl = 22, (4, 6), (2, 4), (1, 2)
    cfg = {"image_shape": shape, "query_shape": qs, "memory_flange": fl, "xp": np}
    for causal in (False, True):
        a = rule_2d(shape, qs, fl, causal)
        ref = np.array([[a(i, j) for j in range(n)] for i in range(n)])
        assert np.array_equal(il2.build_pattern(n, causal=causal, **cfg), ref)
    assert np.array_equal(il2.build_pattern(n, causal=True, **cfg), np.tril(il2.build_pattern(n, **cfg)))


def test_memory_blocks_2d_is_a_gather_and_its_adjoint():
    rng = np.random.default_rng(0)
    n, shape, qs, fl = 21, (4, 6), (2, 4), (1, 2)
    x = rng.standard_normal((2, n, 3))
    mem = image.memory_blocks_2d(x, shape, qs, fl)
    _, kpos = image.positions_2d(np, n, shape, qs, fl)
    inside = (kpos >= 0) & (kpos < n)
    np.testing.assert_array_equal(mem, np.where(inside[..., None], x[:, np.clip(kpos, 0, n - 1)], 0.0))
    g = rng.standard_normal(mem.shape)
    back = image.memory_blocks_2d_backward(g, n, shape, qs, fl)
    np.testing.assert_allclose((mem * g).sum(), (x * back).sum(), rtol=1e-12)
    qb = image.query_blocks_2d(x, shape, qs)
    np.testing.assert_array_equal(image.query_blocks_2d_backward(qb, n, shape, qs), x)


def test_raster_coords_are_unravel_index():
    shape = (3, 4, 5)
    pos = np.arange(60).reshape(6, 10)
    for got, want in zip(image.raster_coords(pos, shape), np.unravel_index(pos, shape)):
        np.testing.assert_array_equal(got, want)


def test_2d_with_row_blocks_and_no_flange_is_1d_blocks():
    """query_shape (1, W) and flange (0, 0): each image row is one block attending to itself."""
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, (1, 1), 20)
    a, _ = il2.forward(q, k, v, image_shape=(4, 5), query_shape=(1, 5), memory_flange=(0, 0), causal=True)
    b, _ = il1.forward(q, k, v, block_length=5, memory_length=0, causal=True)
    np.testing.assert_allclose(a, b, atol=1e-14)


def test_default_image_shape_for_any_length():
    for n in range(1, 300):
        h, w = image.default_image_shape(n)
        assert (h - 1) * w < n <= h * w and abs(h - w) <= 1
    assert il2.setup(np.random.default_rng(0), n=45, d=4, heads=2)[1]["image_shape"] == (7, 7)


def test_gradients_of_non_default_configurations():
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, (1, 2), 14, d=3, dv=2)
    km = rng.random((1, 1, 14)) > 0.3
    cfgs = [{"image_shape": (3, 5), "query_shape": (2, 3), "memory_flange": (1, 2), "causal": True, "key_mask": km},
            {"image_shape": (4, 4), "query_shape": (3, 2), "memory_flange": (2, 0)}]
    for cfg in cfgs:
        errors = check_gradients(il2.forward, il2.backward, {"q": q, "k": k, "v": v}, cfg, rng=rng)
        assert max(errors.values()) < 1e-7, (cfg, errors)


def test_validation():
    q = np.zeros((1, 10, 2))
    with pytest.raises(ValueError, match="image_shape"):
        il2.forward(q, q, q, image_shape=(2, 4))                              # 8 cells < 10 positions
    with pytest.raises(ValueError, match="image_shape"):
        il2.forward(q, q, q, image_shape=(5, 4))                              # a whole empty row
    with pytest.raises(ValueError, match="memory_flange"):
        il2.forward(q, q, q, image_shape=(2, 5), memory_flange=(1, -1))
    with pytest.raises(ValueError, match="query_shape"):
        il2.forward(q, q, q, image_shape=(2, 5), query_shape=(2,))


def test_registry_entry_and_figures(tmp_path):
    spec = effattn.get("image_local_2d")
    assert spec.notebook == "01_fixed_patterns" and spec.classes == ("FP",) and spec.complexity == "O(N·m)"
    paths = FIGURES["image_local_2d"](str(tmp_path), np.random.default_rng(0))
    assert paths and all("image_local_2d_" in p for p in paths)
