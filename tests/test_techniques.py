"""Efficiency techniques of the models (issue 16): chunked feed-forward, gradient checkpointing,
reversible blocks. Each is tested as "the same numbers, less memory": its gradients against the
plain version (or, for the reversible architecture, against finite differences and against the
same stack with every cache stored), and the memory claims of the issue measured by tracemalloc."""
import numpy as np
import pytest

from effattn.gradcheck import rel_error
from effattn.models import Decoder, Encoder, EncoderDecoder
from effattn.nn.modules import FeedForward
from effattn.tools import techniques

from test_models import sampled_numerical, tiny, tiny_batch


def grads_of(model, batch):
    model.zero_grad()
    loss = model.loss_and_backward(batch)[0]
    return loss, {k: np.array(g) for k, g in model.gradients()}


# ------------------------------------------------------------------------- chunked feed-forward
@pytest.mark.parametrize("chunk", [1, 4, 5, 64])
def test_chunked_ffn_equals_the_whole_one(chunk):
    """Output, input gradient and parameter gradients equal to the one-pass FFN (float64), for a
    chunk that does not divide the 3 x 7 = 21 rows and one longer than them."""
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((3, 7, 6)), rng.standard_normal((3, 7, 6))
    whole = FeedForward(6, 10, np.random.default_rng(1))
    part = FeedForward(6, 10, np.random.default_rng(1), chunk=chunk)
    outs = []
    for ff in (whole, part):
        ff.zero_grad()
        y = ff.forward(x)
        dx = ff.backward(dy)
        outs.append((y, dx, {k: np.array(g) for k, g in ff.gradients()}))
    (y0, dx0, g0), (y1, dx1, g1) = outs
    np.testing.assert_allclose(y1, y0, atol=1e-13)
    np.testing.assert_allclose(dx1, dx0, atol=1e-13)
    assert g0.keys() == g1.keys() and len(g0) == 4
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], atol=1e-12, err_msg=k)


def test_chunked_ffn_keeps_only_its_input():
    ff = FeedForward(4, 8, np.random.default_rng(0), chunk=2)
    x = np.random.default_rng(1).standard_normal((5, 4))
    ff.forward(x)
    assert ff.cache is x and ff.fc1.cache is None and ff.fc2.cache is None


def test_chunked_ffn_memory_claim():
    """Issue 16: chunk 128 at N = 16384, d_ff = 4 d_model, the FFN's working memory (peak less the
    output and input-gradient arrays every version returns) at most 1/20 of the whole one's."""
    whole = techniques.ffn_memory(16384, d_model=64)
    part = techniques.ffn_memory(16384, chunk=128, d_model=64)
    hidden = 16384 * 256 * 4                                        # one (N, d_ff) float32 array
    assert whole["working"] >= 2 * hidden                           # the whole one keeps h and GELU(h) at least
    assert part["working"] <= whole["working"] / 20, (part, whole)


# ------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("mode", ["encoder", "decoder", "encoder-decoder"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_checkpointing_gives_the_same_gradients(mode, k):
    """Every parameter's gradient equal to the plain stack's (float64), with 3 layers so that
    k = 2 leaves a shorter last segment; the encoder-decoder's memory gradient flows too."""
    rng = np.random.default_rng(0)
    batch = tiny_batch(mode, rng)
    loss0, g0 = grads_of(tiny(mode, np.random.default_rng(1), layers=3), batch)
    loss1, g1 = grads_of(tiny(mode, np.random.default_rng(1), layers=3, checkpoint=k), batch)
    assert loss1 == pytest.approx(loss0, abs=1e-14)
    for name in g0:
        np.testing.assert_allclose(g1[name], g0[name], atol=1e-12, err_msg=name)


def test_checkpointing_drops_the_block_caches():
    model = tiny("decoder", np.random.default_rng(0), layers=4, checkpoint=2)
    model.forward_batch(tiny_batch("decoder", np.random.default_rng(1)))
    for blk in model.stack.blocks:
        assert blk.ff.fc1.cache is None and blk.attn.kernel_cache is None
    assert len(model.stack._saved) == 2


# ------------------------------------------------------------------------- reversible blocks
@pytest.mark.parametrize("mode", ["encoder", "decoder", "encoder-decoder"])
def test_reversible_gradients_by_finite_differences(mode):
    """The reconstructing backward against central differences of the loss, every parameter."""
    rng = np.random.default_rng(0)
    model = tiny(mode, rng, reversible=True)
    batch = tiny_batch(mode, rng)
    _, grads = grads_of(model, batch)
    for name, p in model.parameters():
        idx = np.arange(p.size) if p.size <= 4 else rng.choice(p.size, 4, replace=False)
        num = sampled_numerical(model, batch, p, idx)
        ana = grads[name].reshape(-1)[idx]
        scale = max(np.abs(ana).max(), np.abs(num).max())
        err = rel_error(ana, num) if scale > 1e-7 else np.abs(ana - num).max()
        assert err < 1e-6, f"{mode} {name}: {err}"


@pytest.mark.parametrize("mode", ["encoder", "decoder", "encoder-decoder"])
def test_reversible_reconstruction_equals_the_stored_backward(mode):
    """Rebuilding each block's input from its output gives the gradients of the stored chain rule
    to 1e-10 (float64), and the rebuilt bottom input equals the real one."""
    batch = tiny_batch(mode, np.random.default_rng(0))
    rec = tiny(mode, np.random.default_rng(1), layers=4, reversible=True)
    sto = tiny(mode, np.random.default_rng(1), layers=4, reversible=True, reconstruct=False)
    loss_r, g_r = grads_of(rec, batch)
    loss_s, g_s = grads_of(sto, batch)
    assert loss_r == pytest.approx(loss_s, abs=1e-14)
    for name in g_s:
        np.testing.assert_allclose(g_r[name], g_s[name], atol=1e-10, err_msg=name)
    stacks = [rec.encoder, rec.decoder] if mode == "encoder-decoder" else [rec.stack]
    for st in stacks:
        assert st.reconstruction_error < 1e-12


def test_reversible_float32_reconstruction_error_is_small():
    """Reported in the notebook: float32 rounding grows as it is undone block by block, but stays
    near the float32 epsilon over 8 blocks."""
    r = techniques.reconstruction_error(8, n=64)
    assert 0 < r["input_error"] < 1e-4 and r["grad_error"] < 1e-4, r


def test_reversible_decoder_generates_by_recomputing():
    model = tiny("decoder", np.random.default_rng(0), reversible=True)
    assert "reversible" in model.stack.why_no_step()
    prompt = np.random.default_rng(1).integers(0, 7, (2, 3))
    out = model.generate(prompt, 4)
    assert out.shape == (2, 7)
    np.testing.assert_array_equal(out, model.generate(prompt, 4, by_steps=False))


# ------------------------------------------------------------------------- bad input, memory claims
@pytest.mark.parametrize("kw, word", [
    (dict(checkpoint=0), "checkpoint"), (dict(checkpoint=2.5), "checkpoint"),
    (dict(checkpoint=2, reversible=True), "checkpoint"), (dict(reversible="yes"), "reversible"),
    (dict(ffn_chunk=0), "ffn_chunk"),
])
def test_bad_technique_options(kw, word):
    with pytest.raises(ValueError, match=word):
        tiny("encoder", np.random.default_rng(0), **kw)


def test_memory_claims_of_the_issue():
    """Issue 16 (float32, N = 256, D = 64, 4 heads, batch 2): a reversible stack of 16 blocks
    within 1.3x of 2 blocks (a plain one grows several-fold); checkpointing every 4 of 16 blocks at
    most 0.4x the plain activation memory."""
    c = techniques.claims()
    assert c["plain_16_over_2"] > 3                      # the baseline really grows with depth
    assert c["reversible_16_over_2"] <= 1.3, c
    assert c["checkpoint_4_of_16_over_plain"] <= 0.4, c
