"""Image Transformer 1-D local attention: the fast path against a per-query loop with the
paper's rule written pair by pair, the pattern helper, the tensor2tensor convention,
validation and figures."""
import numpy as np
import pytest
from test_contract import decode

import effattn
from effattn.attention import image_local_1d as il1
from effattn.attention import local
from effattn.figures import FIGURES
from effattn.gradcheck import check_gradients
from effattn.nn.decode import MIN_CAPACITY, state_size
from effattn.nn.loops import masked_loop
from effattn.registry import Case


def qkv(rng, lead, n, d=4, dv=3):
    return rng.standard_normal((*lead, n, d)), rng.standard_normal((*lead, n, d)), rng.standard_normal((*lead, n, dv))


def rule_1d(lq, lm, causal):
    def allowed(i, j):
        g = i // lq
        return g * lq - lm <= j < (g + 1) * lq and (not causal or j <= i)
    return allowed


@pytest.mark.parametrize("n,lq,lm,causal", [(20, 4, 6, True), (20, 4, 6, False), (13, 5, 0, True),
                                            (17, 3, 10, False), (6, 8, 3, True)])
def test_1d_matches_per_query_loop(n, lq, lm, causal):
    rng = np.random.default_rng(n + lq + lm)
    q, k, v = qkv(rng, (2, 2), n)
    km = rng.random((2, 1, n)) > 0.25
    out, _ = il1.forward(q, k, v, block_length=lq, memory_length=lm, causal=causal, key_mask=km)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            ref = masked_loop(q[b, h], k[b, h], v[b, h], allowed=rule_1d(lq, lm, causal), key_mask=km[b, 0])
            np.testing.assert_allclose(out[b, h], ref, rtol=0, atol=1e-12)
            ref = il1.loop(q[b, h], k[b, h], v[b, h], block_length=lq, memory_length=lm, causal=causal,
                           key_mask=km[b, 0])
            np.testing.assert_allclose(out[b, h], ref, rtol=0, atol=1e-12)


def test_pattern_helper_is_the_rule():
    n = 22
    for causal in (False, True):
        a = rule_1d(5, 7, causal)
        ref = np.array([[a(i, j) for j in range(n)] for i in range(n)])
        assert np.array_equal(il1.build_pattern(n, block_length=5, memory_length=7, causal=causal, xp=np), ref)


def test_tensor2tensor_masked_local_1d_is_local_with_one_block_of_look_back():
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, (1, 2), 29)
    a, _ = il1.forward(q, k, v, block_length=6, memory_length=6, causal=True)
    b, _ = local.forward(q, k, v, block=6, look_back=1, causal=True)
    np.testing.assert_allclose(a, b, atol=1e-14)


def test_gradients_of_a_non_default_configuration():
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, (1, 2), 14, d=3, dv=2)
    km = rng.random((1, 1, 14)) > 0.3
    cfg = {"block_length": 4, "memory_length": 5, "key_mask": km}
    errors = check_gradients(il1.forward, il1.backward, {"q": q, "k": k, "v": v}, cfg, rng=rng)
    assert max(errors.values()) < 1e-7, (cfg, errors)


def test_validation():
    q = np.zeros((1, 10, 2))
    with pytest.raises(ValueError, match="memory_length"):
        il1.forward(q, q, q, block_length=2, memory_length=-1)


def test_registry_entry_and_figures(tmp_path):
    spec = effattn.get("image_local_1d")
    assert spec.notebook == "01_fixed_patterns" and spec.classes == ("FP",) and spec.complexity == "O(N·m)"
    paths = FIGURES["image_local_1d"](str(tmp_path), np.random.default_rng(0))
    assert paths and all("image_local_1d_" in p for p in paths)


# --------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("lq,lm,prompt", [(7, 11, 1), (7, 11, 40), (5, 0, 13), (16, 3, 100)])
def test_decoding_holds_the_block_and_its_memory_only(lq, lm, prompt):
    """A sequence many windows long: stepping equals the causal forward (key mask included), and
    before token t the state holds exactly the keys [floor(t / l_q) l_q - l_m, t): never more than
    l_m + l_q - 1, whatever t is."""
    n, (b, h, d, dv) = 300, (2, 2, 4, 3)
    rng = np.random.default_rng(lq + lm + prompt)
    q, k, v = qkv(rng, (b, h), n, d, dv)
    km = rng.random((b, 1, n)) > 0.3
    cfg = {"block_length": lq, "memory_length": lm}
    want, _ = il1.forward(q, k, v, causal=True, key_mask=km, **cfg)
    got, sizes = decode(effattn.get("image_local_1d"), Case(inputs={"q": q, "k": k, "v": v}, config=cfg),
                        np.broadcast_to(km, (b, h, n)), prompt)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    rows = [s // (b * h * (d + dv + 1)) for s in sizes]
    expected = [t - max(0, t // lq * lq - lm) for t in range(prompt, n + 1)]
    assert rows == expected
    assert max(rows) <= lm + lq - 1


def test_decoding_buffers_stay_bounded():
    """The buffers behind the window are compacted: their capacity does not grow with t either."""
    lq, lm, n = 4, 6, 500
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng, (1, 1), n)
    state = il1.init_state(lead=(1, 1), d=4, dv=3, block_length=lq, memory_length=lm)
    out, state = il1.prefill(q[..., :2, :], k[..., :2, :], v[..., :2, :], state)
    for t in range(2, n):
        _, state = il1.step(q[..., t, :], k[..., t, :], v[..., t, :], state)
        assert state.k.shape[-2] <= 2 * (2 * (lq + lm) + MIN_CAPACITY), t
    assert state_size(state) == (n - (n // lq * lq - lm)) * (4 + 3 + 1)


def test_decoding_refuses_bad_configuration():
    with pytest.raises(ValueError, match="block_length"):
        il1.init_state(lead=(1,), d=2, dv=2, block_length=0)
    with pytest.raises(ValueError, match="memory_length"):
        il1.init_state(lead=(1,), d=2, dv=2, memory_length=-1)
