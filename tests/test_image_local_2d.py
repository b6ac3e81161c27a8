"""Image Transformer 2-D local attention: the fast path against a per-query loop with the
paper's rule written in pixel coordinates, the image layouts of effattn.nn.image against
fancy-index gathers, the default image shape, ragged images, validation and figures."""
import numpy as np
import pytest
from test_contract import decode

import effattn
from effattn.attention import image_local_1d as il1
from effattn.attention import image_local_2d as il2
from effattn.figures import FIGURES
from effattn.gradcheck import check_gradients
from effattn.nn import image
from effattn.nn.loops import masked_loop
from effattn.registry import Case


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


# --------------------------------------------------------------------------- decoding
def stepped(q, k, v, prompt, key_mask=None, **config):
    """Prefill + token-by-token steps (the contract's driver): out and the state sizes."""
    return decode(effattn.get("image_local_2d"), Case(inputs={"q": q, "k": k, "v": v}, config=config),
                  key_mask, prompt)


@pytest.mark.parametrize("shape,qs,fl,ragged", [((12, 11), (2, 3), (3, 2), 0), ((12, 11), (3, 2), (1, 4), 5),
                                               ((9, 8), (4, 8), (0, 0), 3), ((6, 5), (1, 1), (2, 2), 0)])
def test_decoding_keeps_exactly_the_keys_a_later_query_reaches(shape, qs, fl, ragged):
    """Stepping equals the causal forward (ragged images and key masks included; the prompt's own
    rows are the image's first rows), and on a full image the window holds exactly the keys some
    later query's memory holds -- counted from build_pattern -- never more than (h_q + h_m) W."""
    h, w = shape
    n = h * w - ragged
    b, heads, d, dv = 2, 2, 4, 3
    rng = np.random.default_rng(n + qs[0] + fl[1])
    q, k, v = qkv(rng, (b, heads), n, d, dv)
    km = np.broadcast_to(rng.random((b, 1, n)) > 0.3, (b, heads, n))
    cfg = {"image_shape": shape, "query_shape": qs, "memory_flange": fl}
    want, _ = il2.forward(q, k, v, causal=True, key_mask=km, **cfg)
    for prompt in (1, w + 2, n - 1):
        got, sizes = stepped(q, k, v, prompt, km, **cfg)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        rows = [s // (b * heads * (d + dv + 1)) for s in sizes]
        assert max(rows) <= (qs[0] + fl[0]) * w
        if not ragged:
            pat = il2.build_pattern(n, causal=True, xp=np, **cfg)
            assert rows == [int(pat[t:, :t].any(axis=0).sum()) for t in range(prompt, n + 1)]


def test_decoding_state_is_bounded_by_the_image_width():
    """A tall image (many row blocks): the window's size repeats with every row block."""
    shape, qs, fl = (40, 6), (2, 2), (1, 1)
    n = shape[0] * shape[1]
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng, (1, 1), n)
    _, sizes = stepped(q, k, v, 3, image_shape=shape, query_shape=qs, memory_flange=fl)
    rows = [s // 8 for s in sizes]
    period = qs[0] * shape[1]
    assert max(rows[2 * period:]) == max(rows[2 * period:3 * period]) <= (qs[0] + fl[0]) * shape[1]


def test_decoding_stops_at_the_last_cell_of_the_image():
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, (1,), 7)
    cfg = {"image_shape": (2, 3), "query_shape": (1, 2), "memory_flange": (1, 1)}
    state = il2.init_state(lead=(1,), d=4, dv=3, **cfg)
    with pytest.raises(ValueError, match="^q brings 7"):
        il2.prefill(q, k, v, state)
    out, state = il2.prefill(q[..., :5, :], k[..., :5, :], v[..., :5, :], state)
    out, state = il2.step(q[..., 5, :], k[..., 5, :], v[..., 5, :], state)
    with pytest.raises(ValueError, match="^q_t brings 1 token"):
        il2.step(q[..., 6, :], k[..., 6, :], v[..., 6, :], state)
    with pytest.raises(ValueError, match="image_shape"):
        il2.init_state(lead=(1,), d=4, dv=3, image_shape=(0, 3))
    with pytest.raises(ValueError, match="memory_flange"):
        il2.init_state(lead=(1,), d=4, dv=3, image_shape=(2, 3), memory_flange=(-1, 0))
