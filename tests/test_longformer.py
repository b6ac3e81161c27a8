"""Longformer: per-query loop oracle (the paper's rule), HuggingFace's global-projection
convention, per-head dilation, gradients of the separate global projections."""
import numpy as np
import pytest
from test_contract import decode

import effattn
from effattn.attention import longformer as lf
from effattn.gradcheck import check_gradients
from effattn.registry import Case

SPEC = effattn.get("longformer")


def loop_oracle(q, k, v, qg, kg, vg, w, dils, gpos, causal, key_mask):
    """Row by row, head by head: build the key set from the rule, softmax over it."""
    q, k, v, qg, kg, vg = (np.asarray(x, dtype=np.float64) for x in (q, k, v, qg, kg, vg))
    bsz, heads, n, d = q.shape
    out = np.zeros(v.shape)
    km = np.ones((bsz, 1, n), bool) if key_mask is None else np.broadcast_to(key_mask, (bsz, 1, n))
    per_batch = isinstance(gpos, list)                 # one global set per batch element (global_mask)
    for b in range(bsz):
        g = set(gpos[b]) if per_batch else set(gpos)
        for h in range(heads):
            delta = dils[h] if len(dils) > 1 else dils[0]
            for i in range(n):
                if i in g:              # global row: q_global_i against k_global of every position
                    keys = [j for j in range(n) if (not causal or j <= i)]
                    qi, kk, vv = qg[b, h, i], kg[b, h], vg[b, h]
                else:                   # dilated band + the global positions, local projections
                    keys = {i + t * delta for t in range(-w, w + 1)} | g
                    keys = [j for j in sorted(keys) if 0 <= j < n and (not causal or j <= i)]
                    qi, kk, vv = q[b, h, i], k[b, h], v[b, h]
                keys = [j for j in keys if km[b, 0, j]]
                if not keys:
                    continue
                s = np.array([qi @ kk[j] for j in keys]) / np.sqrt(d)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, h, i] = sum(pj * vv[j] for pj, j in zip(p, keys))
    return out


def _inputs(rng, bsz, heads, n, d, separate):
    x = [rng.standard_normal((bsz, heads, n, d)) for _ in range(6)]
    return x if separate else x[:3] * 2


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("n,w,dils,gpos", [(17, 2, (1, 2), (0, 9)), (23, 3, (1, 3), (5,)), (9, 1, (2, 2), ()),
                                            (30, 4, (1, 1), (0, 3, 4, 29))])
def test_forward_matches_loop_oracle(n, w, dils, gpos, separate, causal):
    rng = np.random.default_rng(n + w)
    q, k, v, qg, kg, vg = _inputs(rng, 2, 2, n, 4, separate)
    key_mask = rng.random((2, 1, n)) > 0.25
    key_mask[:, :, 0] = True
    extra = {"q_global": qg, "k_global": kg, "v_global": vg} if separate else {}
    out, cache = lf.forward(q, k, v, w=w, dilation=dils, global_positions=gpos, causal=causal,
                            key_mask=key_mask, **extra)
    ref = loop_oracle(q, k, v, qg, kg, vg, w, dils, gpos, causal, key_mask)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-10)
    dense = lf.reference(q, k, v, w=w, dilation=dils, global_positions=gpos, causal=causal, key_mask=key_mask, **extra)
    np.testing.assert_allclose(dense, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("separate", [False, True])
def test_a_global_set_per_batch_element(causal, separate):
    """global_mask (B, N), HuggingFace's global_attention_mask: each element its own global
    tokens (questions of different lengths), two elements sharing one set, one with none."""
    rng = np.random.default_rng(7)
    n, bsz = 15, 4
    q, k, v, qg, kg, vg = _inputs(rng, bsz, 2, n, 4, separate)
    sets = [[0, 1, 2], [0], [0, 1, 2], []]
    gm = np.zeros((bsz, n), bool)
    for b, g in enumerate(sets):
        gm[b, g] = True
    key_mask = rng.random((bsz, 1, n)) > 0.25
    key_mask[:, :, 0] = True
    extra = {"q_global": qg, "k_global": kg, "v_global": vg} if separate else {}
    config = {"w": 2, "dilation": (1, 2), "global_mask": gm, "causal": causal, "key_mask": key_mask}
    out, cache = lf.forward(q, k, v, **config, **extra)
    np.testing.assert_allclose(out, loop_oracle(q, k, v, qg, kg, vg, 2, (1, 2), sets, causal, key_mask), rtol=0,
                               atol=1e-10)
    np.testing.assert_allclose(lf.reference(q, k, v, **config, **extra), out, rtol=0, atol=1e-10)
    pat = lf.pattern(cache)                                                   # (B, H, N, N)
    for b, g in enumerate(sets):
        np.testing.assert_array_equal(pat[b], lf.build_pattern(n, w=2, dilation=(1, 2), global_positions=g,
                                                               causal=causal))
    if not separate:
        np.testing.assert_allclose(lf.weights(cache) @ v, out, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal,separate", [(False, True), (True, False)])
def test_gradients_with_a_global_set_per_batch_element(causal, separate):
    rng = np.random.default_rng(8)
    n = 8
    q, k, v, qg, kg, vg = _inputs(rng, 3, 1, n, 2, separate)
    gm = np.zeros((3, n), bool)
    gm[0, [0, 5]] = gm[2, [0, 5]] = gm[1, 3] = True
    key_mask = np.ones((3, 1, n), bool)
    key_mask[1, :, 6] = False
    extra = {"q_global": qg, "k_global": kg, "v_global": vg} if separate else {}
    errors = check_gradients(lf.forward, lf.backward, {"q": q, "k": k, "v": v, **extra},
                             {"w": 2, "global_mask": gm, "causal": causal, "key_mask": key_mask}, rng=rng)
    assert max(errors.values()) < 1e-6, errors


def test_global_mask_errors_name_it():
    q = np.zeros((2, 1, 6, 3))
    with pytest.raises(ValueError, match="not both"):
        lf.forward(q, q, q, w=2, global_positions=(0,), global_mask=np.zeros((2, 6), bool))
    with pytest.raises(ValueError, match="global_mask must have shape"):
        lf.forward(q, q, q, w=2, global_mask=np.zeros((3, 6), bool))
    with pytest.raises(ValueError, match="global_mask must be a boolean"):
        lf.forward(q, q, q, w=2, global_mask=np.zeros((2, 6)))


def test_huggingface_projection_convention():
    """Local rows read only q, k, v (global keys through the LOCAL k, v); global rows read only
    q_global at their position and k_global, v_global of all positions."""
    rng = np.random.default_rng(0)
    n, gpos = 20, (0, 7)
    q, k, v, qg, kg, vg = _inputs(rng, 1, 2, n, 4, True)
    cfg = {"w": 2, "dilation": 1, "global_positions": gpos}
    out, _ = lf.forward(q, k, v, q_global=qg, k_global=kg, v_global=vg, **cfg)
    local = np.setdiff1d(np.arange(n), gpos)
    # perturb the global projections: local rows unchanged, global rows change
    out2, _ = lf.forward(q, k, v, q_global=qg, k_global=kg + 1.0, v_global=vg * 2, **cfg)
    np.testing.assert_array_equal(out[..., local, :], out2[..., local, :])
    assert not np.allclose(out[..., gpos, :], out2[..., gpos, :])
    # perturb the local k, v: global rows unchanged
    out3, _ = lf.forward(q, k * 3, v - 1, q_global=qg, k_global=kg, v_global=vg, **cfg)
    np.testing.assert_array_equal(out[..., gpos, :], out3[..., gpos, :])
    # q_global is read only at the global positions
    qg2 = qg.copy()
    qg2[..., local, :] += 5
    out4, _ = lf.forward(q, k, v, q_global=qg2, k_global=kg, v_global=vg, **cfg)
    np.testing.assert_array_equal(out, out4)


def test_attention_window_mapping_and_no_double_count():
    """HF attention_window = 2w: an interior row sees 2w + 1 band keys plus the globals,
    and a global key inside the band has its weight once (rows of W sum to 1)."""
    n, attention_window = 32, 6
    w = attention_window // 2
    gpos = (15,)
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 1, n, 4)) for _ in range(3))
    out, cache = lf.forward(q, k, v, w=w, global_positions=gpos)
    W = lf.weights(cache)[0, 0]
    np.testing.assert_allclose(W.sum(-1), 1.0, atol=1e-12)
    support = W != 0
    assert support[5].sum() == 2 * w + 1 + 1         # band of 7 + the global 15 outside it
    assert support[14].sum() == 2 * w + 1             # 15 lies in the band of 14: counted once
    assert support[15].all() and support[:, 15].all()
    np.testing.assert_array_equal(support, lf.pattern(cache))


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_of_separate_global_projections(causal):
    rng = np.random.default_rng(2)
    case = lf.separate_global_case(rng, batch=1, heads=2, n=11, d=3, causal=causal, w=2, global_positions=(0, 6))
    km = rng.random((1, 1, 11)) > 0.3
    km[..., 0] = True
    for extra in ({}, {"key_mask": km}):
        errors = check_gradients(lf.forward, lf.backward, case.inputs, {**case.config, **extra}, rng=rng)
        assert set(errors) == {"q", "k", "v", "q_global", "k_global", "v_global"}
        assert max(errors.values()) < 1e-6, errors


def test_causal_band_and_globals_ignore_the_future():
    rng = np.random.default_rng(3)
    n = 19
    case = lf.separate_global_case(rng, batch=1, heads=2, n=n, d=4, causal=True, w=3, dilation=(1, 2),
                                   global_positions=(0, 5, 12))
    out, cache = lf.forward(**case.inputs, **case.config)
    pat = lf.pattern(cache)
    assert not np.triu(pat, 1).any()
    for t in (3, 9, 15):
        changed = {key: x.copy() for key, x in case.inputs.items()}
        for x in changed.values():
            x[..., t:, :] = rng.standard_normal(x[..., t:, :].shape)
        out2, _ = lf.forward(**changed, **case.config)
        np.testing.assert_array_equal(out[..., :t, :], out2[..., :t, :])


def test_per_head_dilation_pattern():
    pat = lf.build_pattern(24, w=2, dilation=(1, 3))
    assert pat.shape == (2, 24, 24)
    i = 12
    assert set(np.flatnonzero(pat[0, i])) == {10, 11, 12, 13, 14}
    assert set(np.flatnonzero(pat[1, i])) == {6, 9, 12, 15, 18}


def test_bad_configuration_raises():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 2, 10, 4)) for _ in range(3))
    with pytest.raises(ValueError, match="dilation"):
        lf.forward(q, k, v, w=2, dilation=(1, 2, 3))
    with pytest.raises(ValueError, match="global_positions"):
        lf.forward(q, k, v, w=2, global_positions=(0, 10))
    with pytest.raises(ValueError, match="q_global"):
        lf.forward(q, k, v, w=2, q_global=q)
    with pytest.raises(ValueError, match="k_global"):
        lf.forward(q, k, v, w=2, q_global=q, k_global=k[..., :5, :], v_global=v)


def test_registry_entry():
    assert SPEC.classes == ("FP", "M")
    assert SPEC.causal and SPEC.exact
    assert SPEC.notebook == "02_combination_of_patterns"


def test_neighbour_blocks_backward_is_the_adjoint():
    """<neighbour_blocks(x), y> == <x, neighbour_blocks_backward(y)> for random x, y."""
    from effattn.nn.blockwise import neighbour_blocks, neighbour_blocks_backward

    rng = np.random.default_rng(8)
    for before, after in ((1, 1), (1, 0), (2, 1)):
        x = rng.standard_normal((2, 5, 3, 4))
        y = rng.standard_normal((2, 5, 3 * (before + 1 + after), 4))
        lhs = (neighbour_blocks(x, before, after) * y).sum()
        rhs = (x * neighbour_blocks_backward(y, before, after)).sum()
        assert abs(lhs - rhs) < 1e-10
        w = neighbour_blocks(np.arange(5.0)[:, None, None] * np.ones((5, 3, 1)), before, after)   # block ids
        assert w[2, 0, 0] == 2 - before and w[2, -1, 0] == 2 + after


# --------------------------------------------------------------------------- decoding
def stepped(q, k, v, prompt, key_mask=None, **config):
    """Prefill + token-by-token steps (the contract's driver): out and the state sizes."""
    return decode(SPEC, Case(inputs={"q": q, "k": k, "v": v}, config=config), key_mask, prompt)


@pytest.mark.parametrize("w,dils,gpos", [(3, (1, 3), (0, 5, 77)), (4, 2, ()), (2, (1, 2), (1,)), (500, 1, (7,))])
def test_decoding_keeps_everything_until_the_last_global_then_the_band(w, dils, gpos):
    """Stepping equals the causal forward (per-head dilation, key masks, globals before, inside and
    after the prompt). While a global position lies ahead the state holds every key; after the
    last one only the band of w delta_max positions and the g global keys -- bounded over a long
    sequence."""
    n, b, heads, d, dv = 200, 2, 2, 4, 3
    rng = np.random.default_rng(w + len(gpos))
    q, k, v = (rng.standard_normal((b, heads, n, x)) for x in (d, d, dv))
    km = np.broadcast_to(rng.random((b, 1, n)) > 0.3, (b, heads, n))
    cfg = {"w": w, "dilation": dils, "global_positions": gpos}
    want, _ = lf.forward(q, k, v, causal=True, key_mask=km, **cfg)
    reach = w * max(np.atleast_1d(dils))
    last = max(gpos, default=-1)
    for prompt in (1, 6, 90):
        got, sizes = stepped(q, k, v, prompt, km, **cfg)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        rows = [s // (b * heads * (d + dv + 1)) for s in sizes]
        for t, r in zip(range(prompt, n + 1), rows):
            if t <= last:
                assert r == t, (t, r)                      # a global query ahead reads every key
            else:
                assert r == min(t, reach + sum(p < t - reach for p in gpos)), (t, r)


def test_decoding_a_global_set_per_batch_element():
    """global_mask (B, N): each element's own global rows and keys, stepping equals the forward; the
    window keeps the union of the elements' global keys beside the band."""
    n, w = 60, 2
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((3, 2, n, 4)) for _ in range(3))
    gm = np.zeros((3, n), bool)
    gm[0, [0, 1]] = True
    gm[1, [10, 30]] = True                                    # element 2: no global position
    km = np.broadcast_to(rng.random((3, 1, n)) > 0.3, (3, 2, n))
    cfg = {"w": w, "dilation": (1, 2), "global_mask": gm}
    want, _ = lf.forward(q, k, v, causal=True, key_mask=km, **cfg)
    for prompt in (1, 5, 20, 45):
        got, sizes = stepped(q, k, v, prompt, km, **cfg)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        assert sizes[-1] // (3 * 2 * 9) == 2 * w + 4


def test_decoding_refuses_separate_global_projections_and_bad_globals():
    q = np.zeros((1, 2, 5, 4))
    with pytest.raises(ValueError, match="^q_global, k_global, v_global: separate global projections"):
        lf.init_state(lead=(1, 2), d=4, dv=4, w=2, q_global=q, k_global=q, v_global=q)
    with pytest.raises(ValueError, match="^global_positions must be >= 0"):
        lf.init_state(lead=(1, 2), d=4, dv=4, w=2, global_positions=(-1, 3))
    with pytest.raises(ValueError, match="^global_mask must have shape"):
        lf.init_state(lead=(1, 2), d=4, dv=4, w=2, global_mask=np.zeros((2, 5), bool))
    with pytest.raises(ValueError, match="not both"):
        lf.init_state(lead=(1, 2), d=4, dv=4, w=2, global_positions=(0,), global_mask=np.zeros((1, 5), bool))
    with pytest.raises(ValueError, match="^dilation has 3 entries but lead"):
        lf.init_state(lead=(1, 2), d=4, dv=4, w=2, dilation=(1, 2, 3))
