"""Decoding the models token by token (issue 17): prefill + steps equal the causal forward, generation
by steps equals generation by recomputation, the fallback without ``step``, the state sizes and bad
input. Parametrized over every kernel that offers ``step``, so a kernel that gains it is covered."""
import numpy as np
import pytest

import effattn
from effattn import registry
from effattn.models import Decoder, Encoder, EncoderDecoder
from effattn.models.attention import MultiHeadAttention
from effattn.nn.decode import state_size

DECODERS = [n for n in effattn.names("kernel") if effattn.get(n).step is not None]
MAX, D, H = 12, 8, 2


def decoder(name, rng, *, config=None, **kw):
    common = dict(d_model=D, heads=H, layers=2, d_ff=12, max_len=MAX, dtype="float64")
    return Decoder(7, rng, attention=name, attn_config=config, **{**common, **kw})


def seq2seq(name, rng, *, config=None, **kw):
    common = dict(d_model=D, heads=H, layers=2, d_ff=12, max_len=MAX, dtype="float64")
    return EncoderDecoder(7, 6, rng, attention="full", decoder_attention=name, decoder_config=config,
                          **{**common, **kw})


def pinned(name):
    """The kernel's configuration for MAX tokens, given as attn_config so that every length uses it
    (the recomputing path otherwise re-runs setup(n) per length: local's default block ~ n / 4)."""
    return effattn.get(name).setup(np.random.default_rng(0), n=MAX, d=D // H, heads=H, causal=True,
                                   dtype="float64")[1]


def pinned_model(build, name, rng):
    """``build(name, rng, config=pinned(name))``, or a skip when the kernel refuses its max_len
    configuration at a shorter length (image_local_2d's image_shape fits one length only): the
    recomputing path then cannot run with the configuration the steps use."""
    model = build(name, rng, config=pinned(name))
    mha = next(m for n, m in model.attention_layers() if m.causal)
    try:
        for n in range(1, MAX):
            mha.forward(np.zeros((1, n, D)))
    except ValueError as exc:
        pytest.skip(f"{name}: its configuration for {MAX} tokens does not serve shorter ones ({exc})")
    return model


def padding(rng, b, n):
    km = rng.random((b, n)) > 0.25
    km[:, 0] = True                                  # every row sees at least its first key
    return km


def by_steps(model, ids, prompt, mask=None, state=None):
    """Prefill ``prompt`` tokens, then step: the logits (B, N, V) of every position."""
    kw = {} if mask is None else {"key_mask": mask[:, :prompt]}
    logits, state = model.prefill(ids[:, :prompt], state if state is not None else model.init_state(ids.shape[0]), **kw)
    rows = [logits]
    for t in range(prompt, ids.shape[1]):
        kw = {} if mask is None else {"key_mask_t": mask[:, t]}
        logits_t, state = model.step(ids[:, t], state, **kw)
        rows.append(logits_t[:, None])
    return np.concatenate(rows, axis=1), state


# --------------------------------------------------------------------------- logits
@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", DECODERS)
def test_decoder_prefill_and_steps_equal_the_causal_forward(name, masked, positions):
    """Over max_len tokens (the configuration decoding uses) and a random prompt length, key masks
    included: float64, 1e-10."""
    for seed in range(2):
        rng = np.random.default_rng(40 + seed)
        lm = decoder(name, rng, positions=positions)
        ids = rng.integers(0, 7, (2, MAX))
        km = padding(rng, 2, MAX) if masked else None
        want = lm.forward(ids, km)
        got, state = by_steps(lm, ids, int(rng.integers(1, MAX)), km)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10, err_msg=f"{name} seed {seed}")
        assert state.t == MAX


@pytest.mark.parametrize("name", DECODERS)
def test_encoder_decoder_prefill_and_steps_equal_the_forward(name):
    rng = np.random.default_rng(41)
    m = seq2seq(name, rng)
    src, tgt = rng.integers(0, 7, (2, 9)), rng.integers(0, 6, (2, MAX))
    src_mask, tgt_mask = padding(rng, 2, 9), padding(rng, 2, MAX)
    want = m.forward(src, tgt, src_mask, tgt_mask)
    state = m.init_state(src, src_mask=src_mask)
    logits, state = m.prefill(tgt[:, :4], state, tgt_mask=tgt_mask[:, :4])
    rows = [logits]
    for t in range(4, MAX):
        logits_t, state = m.step(tgt[:, t], state, tgt_mask_t=tgt_mask[:, t])
        rows.append(logits_t[:, None])
    np.testing.assert_allclose(np.concatenate(rows, 1), want, rtol=0, atol=1e-10)


def test_float32_decodes_close_to_its_forward():
    rng = np.random.default_rng(42)
    lm = decoder("full", rng, dtype="float32")
    ids = rng.integers(0, 7, (2, MAX))
    got, _ = by_steps(lm, ids, 3)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, lm.forward(ids), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", DECODERS)
def test_decoder_generation_by_steps_equals_recomputation(name):
    """Token for token, greedy and sampled with the same generator; 3 + 14 tokens run past
    max_len = 12, where both paths recompute on the sliding window."""
    rng = np.random.default_rng(43)
    lm = pinned_model(decoder, name, rng)
    assert lm.stack.why_no_step() is None
    prompt = rng.integers(0, 7, (3, 3))
    for steps in (1, 6, 14):
        fast = lm.generate(prompt, steps)
        assert fast.shape == (3, 3 + steps) and np.array_equal(fast[:, :3], prompt)
        np.testing.assert_array_equal(fast, lm.generate(prompt, steps, by_steps=False), err_msg=f"{name} greedy")
        a = lm.generate(prompt, steps, temperature=1.5, rng=np.random.default_rng(steps))
        b = lm.generate(prompt, steps, temperature=1.5, rng=np.random.default_rng(steps), by_steps=False)
        np.testing.assert_array_equal(a, b, err_msg=f"{name} sampled")
    long = rng.integers(0, 7, (2, MAX + 2))                    # a prompt beyond max_len: recomputed only
    np.testing.assert_array_equal(lm.generate(long, 3), lm.generate(long, 3, by_steps=False))


@pytest.mark.parametrize("name", DECODERS)
def test_steps_decode_with_the_configuration_of_max_len(name):
    """With the kernel's default (length-dependent) configuration, each token generated by steps
    is the argmax of the forward over max_len tokens."""
    rng = np.random.default_rng(44)
    lm = decoder(name, rng)
    prompt = rng.integers(0, 7, (2, 4))
    out = lm.generate(prompt, MAX - 4 + 1, by_steps=True)       # the last token from a context of MAX
    want = lm.forward(out[:, :MAX]).argmax(-1)[:, 3:]
    np.testing.assert_array_equal(out[:, 4:], want)


@pytest.mark.parametrize("name", DECODERS)
def test_encoder_decoder_generation_by_steps_equals_recomputation(name):
    rng = np.random.default_rng(45)
    m = pinned_model(seq2seq, name, rng)
    src = rng.integers(0, 7, (3, 7))
    src_mask = padding(rng, 3, 7)
    for steps in (1, MAX):
        fast = m.generate(src, 1, steps, src_mask=src_mask)
        assert fast.shape == (3, steps)
        np.testing.assert_array_equal(fast, m.generate(src, 1, steps, src_mask=src_mask, by_steps=False))
        kw = dict(src_mask=src_mask, temperature=0.8)
        np.testing.assert_array_equal(m.generate(src, 1, steps, rng=np.random.default_rng(7), **kw),
                                      m.generate(src, 1, steps, rng=np.random.default_rng(7), by_steps=False, **kw))


def test_generation_with_zero_steps():
    rng = np.random.default_rng(46)
    lm = decoder("full", rng)
    prompt = rng.integers(0, 7, (2, 3))
    assert np.array_equal(lm.generate(prompt, 0), prompt)
    assert seq2seq("full", rng).generate(prompt, 1, 0).shape == (2, 0)


# --------------------------------------------------------------------------- fallback
@pytest.fixture
def stepless(monkeypatch):
    """A causal kernel without decoding roles ("toy_nostep": full's forward and backward)."""
    registry._discover()
    full = effattn.get("full")
    monkeypatch.setitem(registry._REGISTRY, "toy_nostep", registry.Mechanism(
        name="toy_nostep", title="t", citation="t", url="u", classes=("TR",), complexity="O(N^2)", causal=True,
        exact=False, kind="kernel", notebook="00_background", forward=full.forward, backward=full.backward,
        setup=full.setup))
    return "toy_nostep"


def test_a_kernel_without_step_falls_back_to_recomputation(stepless):
    rng = np.random.default_rng(47)
    lm = decoder(stepless, rng)
    why = lm.stack.why_no_step()
    assert "toy_nostep" in why and "no decoding step" in why
    prompt = rng.integers(0, 7, (2, 3))
    out = lm.generate(prompt, 5)
    np.testing.assert_array_equal(out, lm.generate(prompt, 5, by_steps=False))
    for t in range(3, 8):
        assert np.array_equal(out[:, t], lm.forward(out[:, :t])[:, -1].argmax(-1))
    with pytest.raises(ValueError, match="by_steps=True.*toy_nostep.*no decoding step"):
        lm.generate(prompt, 5, by_steps=True)
    with pytest.raises(ValueError, match="cannot decode step by step.*toy_nostep"):
        lm.init_state(2)


def test_a_stepless_kernel_says_why_from_its_module():
    """The reason a registered causal kernel without step gives is its module's WHY_NO_STEP."""
    import importlib
    rng = np.random.default_rng(48)
    for name in effattn.names("kernel"):
        spec = effattn.get(name)
        if spec.causal and spec.step is None:
            why = getattr(importlib.import_module(f"effattn.attention.{name}"), "WHY_NO_STEP", None)
            mha = MultiHeadAttention(8, 2, rng, attention=name, causal=True, max_len=16)
            got = mha.why_no_step()
            assert name in got and (why is None or why in got)


def test_cross_attention_other_than_full_falls_back(stepless):
    """A cross-attention kernel other than full is recomputed (the stepless toy runs full's forward)."""
    rng = np.random.default_rng(49)
    m = seq2seq("full", rng, cross_attention=stepless)
    assert "cross-attention 'toy_nostep' is not 'full'" in m.decoder.why_no_step()
    src = rng.integers(0, 7, (2, 6))
    np.testing.assert_array_equal(m.generate(src, 1, 5), m.generate(src, 1, 5, by_steps=False))
    with pytest.raises(ValueError, match="by_steps=True.*not 'full'"):
        m.generate(src, 1, 5, by_steps=True)


# --------------------------------------------------------------------------- state size
@pytest.mark.parametrize("name", DECODERS)
def test_the_state_holds_what_the_kernel_holds(name):
    """The model's state is its kernels' states plus, per token, nothing: full grows by
    layers * B * H * (2 d + 1) numbers a token, a bounded kernel does not grow."""
    rng = np.random.default_rng(50)
    lm = decoder(name, rng, max_len=64)
    ids = rng.integers(0, 7, (2, 64))
    state = lm.init_state(2)
    _, state = lm.prefill(ids[:, :3], state)
    sizes = [state_size(state)]
    for t in range(3, 64):
        _, state = lm.step(ids[:, t], state)
        sizes.append(state_size(state))
    if effattn.get(name).bounded_state:
        assert max(sizes[len(sizes) // 2:]) <= max(sizes[len(sizes) // 4:len(sizes) // 2]), sizes
    if name == "full":
        assert np.all(np.diff(sizes) == 2 * 2 * H * (2 * (D // H) + 1))


def test_cross_attention_projects_the_memory_once():
    rng = np.random.default_rng(51)
    m = seq2seq("full", rng)
    src = rng.integers(0, 7, (2, 5))
    state = m.init_state(src)
    cross = state.blocks[0].xattn
    assert cross.k.shape == (2, H, 5, D // H) and cross.key_mask is None
    _, state2 = m.prefill(np.ones((2, 2), int), state)
    _, state2 = m.step(np.ones(2, int), state2)
    assert state2.blocks[0].xattn is cross                    # the memory is not recomputed


# --------------------------------------------------------------------------- bad input
def test_bad_decoding_input():
    rng = np.random.default_rng(52)
    lm = decoder("full", rng)
    ids = rng.integers(0, 7, (2, MAX))
    state = lm.init_state(2)
    with pytest.raises(ValueError, match="batch"):
        lm.init_state(0)
    with pytest.raises(ValueError, match="ids must have shape"):
        lm.prefill(ids[0], state)
    with pytest.raises(ValueError, match="ids must have shape"):
        lm.prefill(ids[:1], state)                            # B differs from the state's
    with pytest.raises(ValueError, match="ids must have shape"):
        lm.prefill(ids[:, :0], state)
    with pytest.raises(ValueError, match="exceeds max_len"):
        lm.prefill(np.zeros((2, MAX + 1), int), state)
    with pytest.raises(ValueError, match="key_mask must be a boolean"):
        lm.prefill(ids[:, :3], state, key_mask=np.ones((2, 3)))
    with pytest.raises(ValueError, match="key_mask must have shape"):
        lm.prefill(ids[:, :3], state, key_mask=np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="ids must lie"):
        lm.prefill(ids[:, :3] + 7, state)
    with pytest.raises(TypeError, match="state must come from init_state"):
        lm.prefill(ids[:, :3], None)
    _, state = lm.prefill(ids[:, :3], state)
    with pytest.raises(ValueError, match="fresh state"):
        lm.prefill(ids[:, :3], state)
    with pytest.raises(ValueError, match="ids_t must have shape"):
        lm.step(ids[:, 3:4], state)
    with pytest.raises(ValueError, match="key_mask_t must have shape"):
        lm.step(ids[:, 3], state, key_mask_t=np.ones((2, 1), bool))
    _, state = by_steps(lm, ids, MAX)
    with pytest.raises(ValueError, match="position 12 is past the max_len=12"):
        lm.step(ids[:, 0], state)
    with pytest.raises(ValueError, match="state has 2 layers, this stack 1"):
        decoder("full", rng, layers=1).prefill(ids[:, :3], lm.init_state(2))
    with pytest.raises(ValueError, match="not causal"):
        Encoder(7, 3, rng, d_model=D, heads=H, layers=1, max_len=MAX).stack.init_state(2)
    with pytest.raises(ValueError, match="cannot decode with options"):
        decoder("full", rng, config={"mask": np.ones((MAX, MAX), bool)}).init_state(1)


def test_bad_attention_decoding_input():
    rng = np.random.default_rng(53)
    mha = MultiHeadAttention(D, H, rng, causal=True, max_len=MAX)
    state = mha.init_state(2)
    x = rng.standard_normal((2, 3, D))
    with pytest.raises(ValueError, match="x must have shape"):
        mha.prefill(x[:, :, :4], state)
    with pytest.raises(ValueError, match="x must be a float32 or float64"):
        mha.prefill(x.astype(int), state)
    _, state = mha.prefill(x, state)
    with pytest.raises(ValueError, match="x_t must have rank 2"):
        mha.step(x, state)
    with pytest.raises(ValueError, match=r"x_t must have shape \(2, 8\)"):
        mha.step(x[:1, 0], state)
    with pytest.raises(ValueError, match="memory_mask is given without memory"):
        mha.init_state(2, memory_mask=np.ones((2, 3), bool))
    cross = MultiHeadAttention(D, H, rng, causal=False, max_len=MAX)
    with pytest.raises(ValueError, match="memory must have shape"):
        cross.init_state(3, memory=x)
    with pytest.raises(ValueError, match="memory_mask must have shape"):
        cross.init_state(2, memory=x, memory_mask=np.ones((2, 4), bool))
    mem = cross.init_state(2, memory=x, memory_mask=np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="key_mask_t: a cross-attention"):
        cross.step(x[:, 0], mem, key_mask_t=np.ones(2, bool))
    y, _ = cross.prefill(x[:, :2], mem)
    np.testing.assert_allclose(y, cross.forward(x[:, :2], kv=x), rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="state must come from MultiHeadAttention.init_state"):
        mha.step(x[:, 0], ("not", "a", "state"))


def test_bad_generation_input():
    rng = np.random.default_rng(54)
    lm = decoder("full", rng)
    prompt = rng.integers(0, 7, (2, 3))
    with pytest.raises(ValueError, match="by_steps"):
        lm.generate(prompt, 2, by_steps="yes")
    with pytest.raises(ValueError, match="temperature"):
        lm.generate(prompt, 2, temperature=-1.0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="rng"):
        lm.generate(prompt, 2, temperature=0.5)
    with pytest.raises(ValueError, match="steps"):
        lm.generate(prompt, -1)
    with pytest.raises(ValueError, match="prompt must have shape"):
        lm.generate(prompt[:, :0], 2)
    with pytest.raises(ValueError, match="steps=13 needs 13 decoder positions.*max_len=12"):
        seq2seq("full", rng).generate(prompt, 1, MAX + 1)
