"""effattn.nn.lsh (Reformer's hash and sorted chunk layout): the angular hash against the paper's
formula, the two layouts against plain Python sorting, and the window copy against its backward."""
import numpy as np
import pytest

from effattn.nn import lsh


def test_hash_is_invariant_to_positive_scale_and_antipodal():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 40, 6))
    rot = lsh.draw_rotations(rng, 6, 8, 3)
    h = lsh.hash_buckets(x, rot)
    assert h.shape == (3, 3, 40) and h.min() >= 0 and h.max() < 8
    np.testing.assert_array_equal(h, lsh.hash_buckets(2.0 * x, rot))
    np.testing.assert_array_equal(h, lsh.hash_buckets(0.01 * x, rot))
    np.testing.assert_array_equal((h + 4) % 8, lsh.hash_buckets(-x, rot))       # h(-x) = h(x) + b/2
    # the paper's formula, written out for one vector
    xr = x[1, 7] @ rot[2]
    assert h[1, 2, 7] == int(np.argmax(np.concatenate([xr, -xr])))
    # blocked computation = one shot
    np.testing.assert_array_equal(h, lsh.hash_buckets(x, rot, block=7))


@pytest.mark.parametrize("chunking", ["sorted", "bucket"])
def test_layout_sorts_by_bucket_then_position(chunking):
    """Against Python's sorted(): the tokens in slot order are sorted by (bucket, position);
    token_slot inverts slot_token; "bucket" starts every bucket on a chunk boundary."""
    rng = np.random.default_rng(0)
    n, nb, c = 23, 5, 4
    buckets = rng.integers(0, nb + 1, (2, 3, n))                    # nb = the padding bucket
    slot_token, token_slot = lsh.lsh_layout(buckets, nb, c, chunking)
    p = slot_token.shape[-1]
    assert p % c == 0
    for idx in np.ndindex(*buckets.shape[:-1]):
        st, ts, b = slot_token[idx], token_slot[idx], buckets[idx]
        toks = st[st < n]
        assert toks.tolist() == sorted(range(n), key=lambda t: (b[t], t))
        np.testing.assert_array_equal(st[ts], np.arange(n))         # the slot of token t holds t
        if chunking == "sorted":
            assert p == -(-n // c) * c and np.all(st[:n] < n)       # empty slots only at the end
        else:
            for bucket in set(b.tolist()):
                first = ts[b == bucket].min()
                assert first % c == 0                                # a bucket starts a chunk
                chunks = set((ts[b == bucket] // c).tolist())
                assert not any(b[t] != bucket for t in st[st < n] if ts[t] // c in chunks)   # and owns them


def test_slots_and_rows_round_trip():
    rng = np.random.default_rng(1)
    n, c = 10, 4
    buckets = rng.integers(0, 4, (2, 3, n))
    slot_token, token_slot = lsh.lsh_layout(buckets, 4, c, "bucket")
    p = slot_token.shape[-1]
    vals = rng.standard_normal((2, 3, n))
    slots = lsh.put_slots(vals, token_slot, p, fill=-7.0)
    np.testing.assert_array_equal(np.take_along_axis(slots, token_slot, -1), vals)
    assert np.all(slots[slot_token == n] == -7.0)                   # empty slots keep the fill
    x = rng.standard_normal((2, n, 5))                              # one row per token, the same in every round
    rows = lsh.take_slot_rows(x, slot_token)                        # (2, R, P, 5), zeros at empty slots
    assert np.all(rows[slot_token == n] == 0)
    per_round = np.broadcast_to(x[:, None], (2, 3, n, 5))
    np.testing.assert_array_equal(lsh.put_slot_rows(per_round, token_slot, p), rows)


@pytest.mark.parametrize("before, after", [(1, 0), (2, 1), (0, 2), (5, 0)])
def test_chunk_windows_backward_is_the_adjoint(before, after):
    """<windows(x), y> = <x, windows_backward(y)>: every window gradient lands on its source chunk."""
    rng = np.random.default_rng(before * 3 + after)
    x = rng.standard_normal((2, 4, 3, 2))                           # (..., G=4, c=3, d=2)
    win = lsh.chunk_windows(x, before, after)
    assert win.shape == (2, 4, 3 * (before + after + 1), 2)
    y = rng.standard_normal(win.shape)
    np.testing.assert_allclose((win * y).sum(), (x * lsh.chunk_windows_backward(y, before, after)).sum(),
                               rtol=1e-12)
    ids = np.arange(12).reshape(4, 3)
    wid = lsh.chunk_windows(ids, before, after, fill=-1)
    for g in range(4):                                              # chunk g sees chunks g - before .. g + after
        want = [ids[g + o, t] if 0 <= g + o < 4 else -1 for o in range(-before, after + 1) for t in range(3)]
        assert wid[g].tolist() == want


def test_bad_rotations():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="n_buckets"):
        lsh.draw_rotations(rng, 4, 5)
    assert lsh.draw_rotations(rng, 4, 6, 2, heads=3).shape == (3, 2, 4, 3)


def test_bucket_ranks_count_the_earlier_tokens_of_each_bucket():
    """rank[t] = how many tokens before t share its bucket; count = tokens per bucket (plain Python)."""
    rng = np.random.default_rng(5)
    n, nb = 31, 4
    buckets = rng.integers(0, nb + 1, (2, 3, n))
    rank, count = lsh.bucket_ranks(buckets, nb)
    assert rank.shape == buckets.shape and count.shape == (2, 3, nb + 1)
    for idx in np.ndindex(*buckets.shape[:-1]):
        b = buckets[idx].tolist()
        assert rank[idx].tolist() == [b[:t].count(b[t]) for t in range(n)]
        assert count[idx].tolist() == [b.count(h) for h in range(nb + 1)]
