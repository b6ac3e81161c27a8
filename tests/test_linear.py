"""Linear Transformer: the efficient forms against the paper's explicit O(N^2) formula,
the chunked causal form against the per-step RNN, and the decoder (prefill + step)."""
import numpy as np
import pytest

from effattn.attention import linear
from effattn.gradcheck import check_gradients
from effattn.nn.decode import state_size


def elu1(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0)))


def explicit(q, k, v, causal=False, key_mask=None, eps=linear.EPS):
    """W_ij = phi(q_i).phi(k_j) / (sum_l phi(q_i).phi(k_l) + eps), written with loops."""
    *lead, n, _ = q.shape
    m = k.shape[-2]
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    for idx in np.ndindex(*lead):
        for i in range(n):
            w = np.array([elu1(q[idx][i]) @ elu1(k[idx][j]) for j in range(m)])
            if causal:
                w[i + 1:] = 0
            if key_mask is not None:
                w = w * np.broadcast_to(key_mask, tuple(lead) + (m,))[idx]
            with np.errstate(invalid="ignore"):
                out[idx][i] = (w @ v[idx]) / (w.sum() + eps)
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_explicit_formula(causal, masked):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 2, 11, 4)) for _ in range(3))
    km = rng.random((2, 1, 11)) > 0.3 if masked else None
    for chunk in (1, 3, 4, 11, 64):
        out, cache = linear.forward(q, k, v, causal=causal, key_mask=km, chunk=chunk)
        np.testing.assert_allclose(out, explicit(q, k, v, causal, km), atol=1e-12)
        np.testing.assert_allclose(linear.weights(cache) @ v, out, atol=1e-12)
    np.testing.assert_allclose(linear.reference(q, k, v, causal=causal, key_mask=km), out, atol=1e-12)


def test_cross_attention_lengths():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((1, 2, 5, 3)), rng.standard_normal((1, 2, 9, 3)), rng.standard_normal((1, 2, 9, 2))
    out, _ = linear.forward(q, k, v)
    np.testing.assert_allclose(out, explicit(q, k, v), atol=1e-12)


def test_causal_chunked_equals_step_loop_and_recurrent_api():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 3, 17, 4)) for _ in range(3))
    out, _ = linear.forward(q, k, v, causal=True, chunk=5)
    np.testing.assert_allclose(linear.loop(q, k, v, causal=True), out, atol=1e-12)
    state = linear.init_state(lead=(2, 3), d=4, dv=4)
    for t in range(17):
        o, state = linear.step(q[..., t, :], k[..., t, :], v[..., t, :], state)
        np.testing.assert_allclose(o, out[..., t, :], atol=1e-12)
    assert state.s.shape == (2, 3, 4, 4) and state.z.shape == (2, 3, 4) and state.t == 17


@pytest.mark.parametrize("prompt", [1, 4, 5, 6, 16])
def test_prefill_at_and_between_chunk_boundaries(prompt):
    """The prefill's state is phi(K)^T V over the prompt whatever the chunk padding: prompts
    shorter than, equal to and past a chunk (5), then steps, equal the causal forward; the state
    holds d dv + d numbers per head after every token."""
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((2, 3, 17, 4)), rng.standard_normal((2, 3, 17, 4)), rng.standard_normal((2, 3, 17, 2))
    km = rng.random((2, 1, 17)) > 0.3
    km[:, :, 0] = True
    want, _ = linear.forward(q, k, v, causal=True, key_mask=km, chunk=5)
    state = linear.init_state(lead=(2, 3), d=4, dv=2, chunk=5)
    kmb = np.broadcast_to(km, (2, 3, 17))
    got, state = linear.prefill(q[..., :prompt, :], k[..., :prompt, :], v[..., :prompt, :], state,
                                key_mask=kmb[..., :prompt])
    rows = [got]
    for t in range(prompt, 17):
        assert state_size(state) == 2 * 3 * (4 * 2 + 4)
        o, state = linear.step(q[..., t, :], k[..., t, :], v[..., t, :], state, key_mask_t=kmb[..., t])
        rows.append(o[..., None, :])
    np.testing.assert_allclose(np.concatenate(rows, axis=-2), want, rtol=0, atol=1e-12)


def test_decoding_refuses_bad_states_and_inputs():
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, 2, 5, 3)) for _ in range(3))
    state = linear.init_state(lead=(1, 2), d=3, dv=3)
    _, used = linear.prefill(q, k, v, state)
    with pytest.raises(ValueError, match="fresh state"):
        linear.prefill(q, k, v, used)
    with pytest.raises(ValueError, match="^q must have shape"):
        linear.prefill(q[..., :2], k[..., :2], v, linear.init_state(lead=(1, 2), d=3, dv=3))
    with pytest.raises(ValueError, match="^q_t must have shape"):
        linear.step(q[0, :, 0, :], k[..., 0, :], v[..., 0, :], used)
    with pytest.raises(ValueError, match="^key_mask_t"):
        linear.step(q[..., 0, :], k[..., 0, :], v[..., 0, :], used, key_mask_t=np.ones((1, 2)))
    with pytest.raises(TypeError, match="^state"):
        linear.step(q[..., 0, :], k[..., 0, :], v[..., 0, :], (used.s, used.z))
    with pytest.raises(ValueError, match="^eps"):
        linear.init_state(lead=(1, 2), d=3, dv=3, eps=-1.0)


def test_eps_and_fully_masked_rows():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 1, 6, 3)) for _ in range(3))
    km = np.ones((2, 1, 6), bool)
    km[1] = False
    for causal in (False, True):
        out, _ = linear.forward(q, k, v, causal=causal, key_mask=km, eps=0.0)
        assert np.all(out[1] == 0) and np.isfinite(out).all()
        np.testing.assert_allclose(out[0], explicit(q, k, v, causal, km, eps=0.0)[0], atol=1e-12)
    with pytest.raises(ValueError, match="eps"):
        linear.forward(q, k, v, eps=-1.0)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_with_mask_and_ragged_chunks(causal):
    rng = np.random.default_rng(4)
    inputs = {x: rng.standard_normal((2, 1, 10, 3)) for x in "qkv"}
    km = rng.random((2, 1, 10)) > 0.3
    km[:, :, 0] = True
    errors = check_gradients(linear.forward, linear.backward, inputs,
                             {"causal": causal, "key_mask": km, "chunk": 4}, rng=rng)
    assert max(errors.values()) < 1e-7, errors
