"""BigBird: per-query loop oracle from the paper's block rule, the random draw's guarantees,
duplicates counted once, HuggingFace's rand_attn mapping, and the refusal to decode."""
import numpy as np
import pytest

import effattn
from effattn.attention import bigbird as bb
from effattn.gradcheck import check_gradients

SPEC = effattn.get("bigbird")


def loop_oracle(q, k, v, b, rand, gbl, key_mask):
    """Token by token: the key set is the union of the rule's blocks; softmax over it."""
    bsz, heads, n, d = q.shape
    nb = -(-n // b)
    out = np.zeros(v.shape)
    km = np.ones((bsz, 1, n), bool) if key_mask is None else np.broadcast_to(key_mask, (bsz, 1, n))
    for bi in range(bsz):
        for h in range(heads):
            layout = rand[h] if rand.ndim == 3 else rand
            for i in range(n):
                c = i // b
                if c in gbl:
                    blocks = set(range(nb))                          # a global block reads everything
                else:
                    blocks = {c - 1, c, c + 1} | set(gbl) | {int(x) for x in layout[c] if x >= 0}
                keys = [j for j in range(n) if j // b in blocks and km[bi, 0, j]]
                if not keys:
                    continue
                s = np.array([q[bi, h, i] @ k[bi, h, j] for j in keys]) / np.sqrt(d)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, h, i] = sum(pj * v[bi, h, j] for pj, j in zip(p, keys))
    return out


@pytest.mark.parametrize("n,b,g,r,per_head", [(23, 3, 1, 2, True), (40, 4, 2, 1, False), (17, 5, 0, 1, True),
                                              (31, 2, (0, 15), 3, True)])
def test_forward_matches_loop_oracle(n, b, g, r, per_head):
    rng = np.random.default_rng(n + b)
    q, k, v = (rng.standard_normal((2, 2, n, 4)) for _ in range(3))
    nb = -(-n // b)
    rand = bb.draw_random_blocks(rng, nb, r, g, heads=2 if per_head else None)
    gbl = tuple(range(g)) if isinstance(g, int) else g
    key_mask = rng.random((2, 1, n)) > 0.25
    key_mask[:, :, 0] = True
    out, cache = bb.forward(q, k, v, block=b, random_blocks=rand, global_blocks=g, key_mask=key_mask)
    np.testing.assert_allclose(out, loop_oracle(q, k, v, b, rand, gbl, key_mask), rtol=0, atol=1e-10)
    np.testing.assert_allclose(bb.weights(cache) @ v, out, rtol=0, atol=1e-10)


def test_duplicate_blocks_count_once():
    """A user layout whose random blocks repeat the window, a global block or each other
    equals dense attention over the union (no key weighted twice)."""
    rng = np.random.default_rng(1)
    n, b = 24, 3
    q, k, v = (rng.standard_normal((1, 1, n, 4)) for _ in range(3))
    rand = np.array([[c, max(c - 1, 0), 0, (c + 4) % 8, (c + 4) % 8] for c in range(8)])   # (n_b, 5)
    out, cache = bb.forward(q, k, v, block=b, random_blocks=rand, global_blocks=1)
    np.testing.assert_allclose(out, loop_oracle(q, k, v, b, rand, (0,), None), rtol=0, atol=1e-10)
    np.testing.assert_allclose(bb.weights(cache).sum(-1), 1.0, atol=1e-12)


@pytest.mark.parametrize("g", [1, 2, (0, 9)])
def test_random_draw_never_overlaps_window_or_globals(g):
    rng = np.random.default_rng(2)
    nb, r, heads = 10, 3, 4
    rand = bb.draw_random_blocks(rng, nb, r, g, heads=heads)
    gbl = set(range(g)) if isinstance(g, int) else set(g)
    assert rand.shape == (heads, nb, r)
    for h in range(heads):
        for c in range(nb):
            row = [int(x) for x in rand[h, c] if x >= 0]
            if c in gbl:
                assert not row
                continue
            cand = [j for j in range(nb) if abs(j - c) > 1 and j not in gbl]
            assert len(row) == min(r, len(cand))
            assert len(set(row)) == len(row)
            assert all(abs(j - c) > 1 and j not in gbl for j in row)
    assert any((rand[0] != rand[h]).any() for h in range(1, heads))   # a new layout per head
    again = bb.draw_random_blocks(np.random.default_rng(2), nb, r, g, heads=heads)
    np.testing.assert_array_equal(rand, again)


def test_huggingface_rand_attn_mapping():
    """HF: first and last blocks global, rand_attn (H, n_b - 2, r) with row i - 1 = query block i."""
    nb, b, n = 8, 2, 16
    rand_attn = np.array([[[3, 5], [4, 6], [5, 1], [1, 2], [2, 3], [3, 4]]])          # (1, 6, 2), HF rows
    random_blocks, global_blocks = bb.from_huggingface(rand_attn, nb)
    assert global_blocks == (0, nb - 1)
    np.testing.assert_array_equal(random_blocks[0, 1:-1], rand_attn[0])
    assert (random_blocks[:, [0, -1]] == -1).all()
    pat = bb.build_pattern(n, block=b, random_blocks=random_blocks, global_blocks=global_blocks)[0]
    blk = pat[::b, ::b]                                             # block-level pattern
    assert blk[0].all() and blk[-1].all() and blk[:, 0].all() and blk[:, -1].all()
    for i in range(1, nb - 1):
        expect = {0, nb - 1, i - 1, i, i + 1} | set(rand_attn[0, i - 1].tolist())
        assert set(np.flatnonzero(blk[i])) == expect
    with pytest.raises(ValueError, match="rand_attn"):
        bb.from_huggingface(rand_attn, nb + 1)


def test_gradients_per_head_layout_and_padding():
    rng = np.random.default_rng(3)
    n, b = 14, 3                                                     # 14 = 4 blocks + 2: padding
    q, k, v = (rng.standard_normal((1, 2, n, 3)) for _ in range(3))
    rand = bb.draw_random_blocks(rng, 5, 2, 1, heads=2)
    km = rng.random((1, 1, n)) > 0.3
    km[..., 0] = True
    for extra in ({}, {"key_mask": km}):
        errors = check_gradients(bb.forward, bb.backward, {"q": q, "k": k, "v": v},
                                 {"block": b, "random_blocks": rand, "global_blocks": 1, **extra}, rng=rng)
        assert max(errors.values()) < 1e-6, errors


def test_causal_raises_with_the_reason():
    case = SPEC.example(np.random.default_rng(0), batch=1, heads=2, n=12, d=4)
    with pytest.raises(ValueError, match="encoder"):
        SPEC.forward(**case.inputs, **{**case.config, "causal": True})


def test_build_pattern_refuses_causal():
    with pytest.raises(ValueError, match="encoder"):
        bb.build_pattern(12, block=3, random_blocks=np.full((4, 1), -1), causal=True)


def test_bad_layout_raises():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 2, 10, 4)) for _ in range(3))
    with pytest.raises(ValueError, match="random_blocks"):
        bb.forward(q, k, v, block=3, random_blocks=np.zeros((3, 1), int))         # n_b = 4
    with pytest.raises(ValueError, match="random_blocks"):
        bb.forward(q, k, v, block=3, random_blocks=np.full((4, 1), 4))
    with pytest.raises(ValueError, match="random_blocks"):
        bb.forward(q, k, v, block=3, random_blocks=np.zeros((3, 4, 1), int))      # 3 heads != 2
    with pytest.raises(ValueError, match="global_blocks"):
        bb.forward(q, k, v, block=3, random_blocks=np.zeros((4, 1), int), global_blocks=(5,))


def test_registry_entry():
    assert SPEC.classes == ("FP", "M") and not SPEC.causal and SPEC.exact and SPEC.complexity == "O(N)"
