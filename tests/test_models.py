"""Whole-model backward of the three modes against central differences (float64, every parameter),
plus causality, padding invariance, generation and bad input."""
import numpy as np
import pytest

import effattn
from effattn import registry
from effattn.validate import check_causal
from effattn.gradcheck import rel_error
from effattn.models import IGNORE, Decoder, Encoder, EncoderDecoder

H = 1e-5


def tiny(mode, rng, **kw):
    common = dict(d_model=8, heads=2, layers=2, d_ff=12, max_len=8, dtype="float64")
    common.update(kw)
    if mode == "encoder":
        return Encoder(7, 3, rng, **common)
    if mode == "decoder":
        return Decoder(7, rng, **common)
    return EncoderDecoder(7, 6, rng, **common)


def tiny_batch(mode, rng):
    if mode == "encoder":
        x = rng.integers(0, 7, (3, 6))
        mask = np.ones((3, 6), bool)
        mask[0, 4:] = False                          # padding in one sequence
        return {"x": x, "mask": mask, "y": rng.integers(0, 3, 3)}
    if mode == "decoder":
        y = rng.integers(0, 7, (2, 6))
        y[0, -1] = IGNORE                           # an ignored target
        return {"x": rng.integers(0, 7, (2, 6)), "y": y}
    src_mask = np.ones((2, 5), bool)
    src_mask[1, 3:] = False
    y = rng.integers(0, 6, (2, 4))
    y[1, 0] = IGNORE
    return {"src": rng.integers(0, 7, (2, 5)), "src_mask": src_mask, "tgt": rng.integers(0, 6, (2, 4)), "y": y}


def sampled_numerical(model, batch, p, idx):
    """Central differences of the loss at the flat entries ``idx`` of parameter ``p``."""
    flat = p.reshape(-1)
    out = []
    for i in idx:
        old = flat[i]
        flat[i] = old + H
        lp = model.loss_and_backward(batch, backward=False)[0]
        flat[i] = old - H
        lm = model.loss_and_backward(batch, backward=False)[0]
        flat[i] = old
        out.append((lp - lm) / (2 * H))
    return np.array(out)


@pytest.mark.parametrize("mode,kw", [
    ("encoder", {}), ("encoder", {"pool": "cls", "positions": "learned"}),
    ("decoder", {}), ("decoder", {"positions": "learned"}),
    ("encoder-decoder", {}),
])
def test_model_gradients_every_parameter(mode, kw):
    rng = np.random.default_rng(0)
    model = tiny(mode, rng, **kw)
    batch = tiny_batch(mode, rng)
    model.zero_grad()
    model.loss_and_backward(batch)
    grads = dict(model.gradients())
    names = [n for n, _ in model.parameters()]
    assert len(names) == len(set(names)) and len(names) > 20
    for name, p in model.parameters():
        idx = np.arange(p.size) if p.size <= 6 else rng.choice(p.size, 6, replace=False)
        num = sampled_numerical(model, batch, p, idx)
        ana = grads[name].reshape(-1)[idx]
        scale = max(np.abs(ana).max(), np.abs(num).max())
        err = rel_error(ana, num) if scale > 1e-7 else np.abs(ana - num).max()
        assert err < 1e-6, f"{mode} {name}: {err} (analytic {ana}, numeric {num})"


def test_decoder_is_causal_and_encoder_ignores_padding():
    rng = np.random.default_rng(1)
    dec = tiny("decoder", rng)
    x = rng.integers(0, 7, (2, 8))
    a = dec.forward(x)
    x2 = x.copy()
    x2[:, 5:] = (x2[:, 5:] + 1) % 7
    b = dec.forward(x2)
    assert np.array_equal(a[:, :5], b[:, :5])
    enc = tiny("encoder", rng)
    mask = np.ones((2, 8), bool)
    mask[:, 6:] = False
    c = enc.forward(x, mask)
    d = enc.forward(x2 * 0 + np.where(mask, x, 3), mask)
    assert np.allclose(c, enc.forward(np.where(mask, x, 0), mask))
    assert np.allclose(c, d)


def test_encoder_decoder_ignores_source_padding():
    rng = np.random.default_rng(2)
    m = tiny("encoder-decoder", rng)
    src = rng.integers(0, 7, (2, 6))
    mask = np.ones((2, 6), bool)
    mask[0, 3:] = False
    tgt = rng.integers(0, 6, (2, 5))
    a = m.forward(src, tgt, mask)
    src2 = np.where(mask, src, 1)
    assert np.allclose(a, m.forward(src2, tgt, mask))


def test_generation_greedy_and_sampling():
    rng = np.random.default_rng(3)
    dec = tiny("decoder", rng)
    prompt = rng.integers(0, 7, (2, 3))
    out = dec.generate(prompt, 7)
    assert out.shape == (2, 10) and np.array_equal(out[:, :3], prompt)
    for t in range(3, 8):                            # greedy: each token is the argmax of a re-run
        assert np.array_equal(out[:, t], dec.forward(out[:, :t])[:, -1].argmax(-1))
    s1 = dec.generate(prompt, 5, temperature=1.0, rng=np.random.default_rng(9))
    s2 = dec.generate(prompt, 5, temperature=1.0, rng=np.random.default_rng(9))
    assert np.array_equal(s1, s2)
    cold = dec.generate(prompt, 5, temperature=1e-6, rng=np.random.default_rng(9))
    assert np.array_equal(cold, dec.generate(prompt, 5))
    with pytest.raises(ValueError, match="rng"):
        dec.generate(prompt, 2, temperature=0.5)
    s2s = tiny("encoder-decoder", rng)
    src = rng.integers(0, 7, (2, 5))
    g = s2s.generate(src, bos=1, steps=4)
    assert g.shape == (2, 4)
    full = np.concatenate([np.ones((2, 1), int), g], 1)
    assert np.array_equal(g[:, -1], s2s.forward(src, full[:, :-1])[:, -1].argmax(-1))


def test_bad_input():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="divide"):
        tiny("encoder", rng, heads=3)
    dec = tiny("decoder", rng)
    with pytest.raises(ValueError, match="max_len"):
        dec.forward(rng.integers(0, 7, (1, 9)))
    with pytest.raises(ValueError, match="unknown attention"):
        tiny("decoder", rng, attention="nope")


def test_decoder_with_a_kernel_that_cannot_decode(monkeypatch):
    registry._discover()

    def fwd(q, k, v, *, causal=False, key_mask=None):
        check_causal(causal, False, "toy pools every position")
        return effattn.get("full").forward(q, k, v, key_mask=key_mask)

    monkeypatch.setitem(registry._REGISTRY, "toy_pool", registry.Mechanism(
        name="toy_pool", title="t", citation="t", url="u", classes=("TR",), complexity="O(N^2)", causal=False,
        exact=False, kind="kernel", notebook="00_background", forward=fwd,
        backward=lambda d, c: effattn.get("full").backward(d, c), setup=lambda rng, **kw: ({}, {})))
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="cannot decode.*toy pools every position"):
        tiny("decoder", rng, attention="toy_pool")
    tiny("encoder", rng, attention="toy_pool")       # fine without causality
    with pytest.raises(ValueError, match="cannot decode"):
        tiny("encoder-decoder", rng, attention="toy_pool")
    tiny("encoder-decoder", rng, attention="toy_pool", decoder_attention="full")
