"""The Transformer-XL language model (effattn.models.recurrence) and ``train --arch xl``: backward
against central differences with the memory held fixed (the paper's stop-gradient), a batch's
gradient as the sum of its segments', memory that carries the past and only the past, and
training that needs the memory (the recall task)."""
import numpy as np
import pytest

from effattn.gradcheck import rel_error
from effattn.models.recurrence import XLDecoder
from effattn.nn import functional as F
from effattn.nn.functional import IGNORE
from effattn.tools.train import train_model

H = 1e-6


def model(rng, **kw):
    cfg = dict(d_model=8, heads=2, layers=2, d_ff=12, segment=4, mem_len=4)
    cfg.update(kw)
    return XLDecoder(7, rng, **cfg)


def segment_loss(m, memory, x, y, backward=True):
    """One segment's mean cross-entropy with the memory set to ``memory`` (held fixed)."""
    m.memory = None if memory is None else [(a.copy(), None if b is None else b.copy()) for a, b in memory]
    logits = m.forward(x)
    loss, cache = F.cross_entropy_forward(logits, y, ignore_index=IGNORE)
    if backward:
        m.backward(F.cross_entropy_backward(cache).astype(logits.dtype))
    return float(loss)


def test_gradients_of_one_segment_with_its_memory_held_fixed():
    rng = np.random.default_rng(0)
    m = model(rng)
    x = rng.integers(0, 7, (2, 8))
    m.reset_memory()
    m.forward(x[:, :4])
    memory = [(a.copy(), b) for a, b in m.memory]         # what the first segment left, a constant
    y = rng.integers(0, 7, (2, 4))
    m.zero_grad()
    segment_loss(m, memory, x[:, 4:], y)
    grads = dict(m.gradients())
    names = [n for n, _ in m.parameters()]
    assert len(names) == len(set(names)) and any(n.endswith("attn.Wr") for n in names)
    for name, p in m.parameters():
        idx = np.arange(p.size) if p.size <= 4 else rng.choice(p.size, 4, replace=False)
        flat, num = p.reshape(-1), []
        for i in idx:
            old = flat[i]
            flat[i] = old + H
            lp = segment_loss(m, memory, x[:, 4:], y, backward=False)
            flat[i] = old - H
            lm = segment_loss(m, memory, x[:, 4:], y, backward=False)
            flat[i] = old
            num.append((lp - lm) / (2 * H))
        num, ana = np.array(num), grads[name].reshape(-1)[idx]
        scale = max(np.abs(ana).max(), np.abs(num).max())
        err = rel_error(ana, num) if scale > 1e-7 else np.abs(ana - num).max()
        assert err < 1e-6, f"{name}: {err}"


def test_a_batch_gradient_is_the_sum_of_its_segments_with_the_memory_a_constant():
    """loss_and_backward = the count-weighted sum of each segment's loss and gradient, each
    segment given the memory the one before left: no gradient flows through the memory."""
    rng = np.random.default_rng(1)
    m = model(rng)
    x = rng.integers(0, 7, (2, 12))
    y = rng.integers(0, 7, (2, 12))
    y[0, :3] = IGNORE
    m.zero_grad()
    loss, _, count = m.loss_and_backward({"x": x, "y": y})
    want_grads = {n: g.copy() for n, g in m.gradients()}
    total, acc, memory = 0.0, {}, None
    for a, b in m.segments(12):
        c = int((y[:, a:b] != IGNORE).sum())
        m.zero_grad()
        total += segment_loss(m, memory, x[:, a:b], y[:, a:b]) * c
        memory = m.memory
        for n, g in m.gradients():
            acc[n] = acc.get(n, 0) + g * c / count
    assert count == int((y != IGNORE).sum())
    assert loss == pytest.approx(total / count, rel=1e-12)
    for n, g in want_grads.items():
        np.testing.assert_allclose(g, acc[n], rtol=1e-10, atol=1e-13, err_msg=n)


def test_memory_carries_the_past_and_mem_len_zero_carries_nothing():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 7, (2, 12))
    x2 = x.copy()
    x2[:, :4] = (x2[:, :4] + 1) % 7                          # only the first segment changes
    for mem_len, moved in ((4, True), (0, False)):
        m = model(np.random.default_rng(3), mem_len=mem_len)
        a, b = m.forward_batch({"x": x}), m.forward_batch({"x": x2})
        assert np.allclose(a[:, 4:], b[:, 4:]) != moved, mem_len
    # and a later segment never reaches back: changing the last segment leaves the others alone
    m = model(np.random.default_rng(3))
    x3 = x.copy()
    x3[:, 8:] = (x3[:, 8:] + 1) % 7
    np.testing.assert_array_equal(m.forward_batch({"x": x})[:, :8], m.forward_batch({"x": x3})[:, :8])


def test_a_longer_memory_at_evaluation_keeps_more_states():
    m = model(np.random.default_rng(4), mem_len=4)
    ids = np.random.default_rng(5).integers(0, 7, (2, 4))
    m.forward(ids), m.forward(ids)
    assert m.memory[0][0].shape == (2, 4, 8)
    m.set_mem_len(8)
    m.reset_memory()
    m.forward(ids), m.forward(ids), m.forward(ids)
    assert m.memory[0][0].shape == (2, 8, 8)
    with pytest.raises(ValueError, match="ids: a batch of 3"):
        m.forward(np.zeros((3, 4), int))
    with pytest.raises(ValueError, match="mem_len"):
        m.set_mem_len(-1)


def test_recall_needs_the_memory():
    """train --task recall --arch xl: the answers of the second segment lie in the first; with a
    memory of one segment the model learns them, without it it stays near chance (1/8 on 15 of
    the 17 counted targets of a sequence; 2 are inside their own segment)."""
    common = dict(arch="xl", segment=8, seq_len=16, steps=150, d_model=16, heads=2, eval_every=0)
    with_mem = train_model("recall", mem_len=8, **common)["result"]
    without = train_model("recall", mem_len=0, **common)["result"]
    assert with_mem["accuracy"] > 0.9, with_mem
    assert without["accuracy"] < 0.4, without


def test_xl_settings_are_refused_where_they_do_not_apply():
    with pytest.raises(ValueError, match="--arch xl builds a language model"):
        train_model("listops", arch="xl", steps=1)
    with pytest.raises(ValueError, match="--mem-len is an option of --arch xl"):
        train_model("lm", mem_len=4, steps=1)
    with pytest.raises(ValueError, match="--attention"):
        train_model("lm", "local", arch="xl", steps=1)
    with pytest.raises(ValueError, match="--segment must be an integer >= 1"):
        train_model("lm", arch="xl", segment=0, steps=1)


def test_a_compressed_memory_makes_every_layer_compressive_and_reaches_further_back():
    """cmem_len > 0: the blocks are the compressive layer; a segment whose memory has been
    overwritten still depends on the first segment through the compressed memory, and the
    reconstruction loss of each segment is recorded."""
    rng = np.random.default_rng(6)
    x = rng.integers(0, 7, (2, 16))
    x2 = x.copy()
    x2[:, :4] = (x2[:, :4] + 1) % 7
    xl_only = model(np.random.default_rng(7), layers=1, mem_len=4)
    comp = model(np.random.default_rng(7), layers=1, mem_len=4, cmem_len=4, rate=2)
    assert comp.blocks[0].attn.spec.name == "compressive" and xl_only.blocks[0].attn.spec.name == "transformer_xl"
    # one layer, memory 4 = one segment: segment 3 (positions 8..11) no longer sees segment 1 without compression
    a, b = xl_only.forward_batch({"x": x}), xl_only.forward_batch({"x": x2})
    np.testing.assert_allclose(a[:, 8:12], b[:, 8:12], rtol=0, atol=1e-12)
    a, b = comp.forward_batch({"x": x}), comp.forward_batch({"x": x2})
    assert not np.allclose(a[:, 8:12], b[:, 8:12])
    comp.zero_grad()
    comp.loss_and_backward({"x": x, "y": rng.integers(0, 7, (2, 16))})
    assert comp.recon[0] == 0.0 and all(r > 0 for r in comp.recon[1:])
    assert np.abs(dict(comp.gradients())["blocks.0.attn.Wc"]).max() > 0
