# %% [markdown]
# ## 1 · The layer on a small case
#
# The forward, as it is in the package: the memory is concatenated in front of the segment, then the layer's
# body (`effattn/nn/relative.py`, shared with the other recurrent layers) projects the keys and values from both and
# the queries from the segment only; `distances` lists the M + N − 1 distances M − 1, ..., −(N − 1) and `sinusoid`
# their R_t:

# %%
show_source(xl.forward)
show_source(relative.xl_layer_forward)

# %% [markdown]
# A shape check, the reference (`loop`: every pair's distance written out, no shift) and the hand-written backward
# against central differences, with a memory of L = 3 states, two heads, causal and not. The memory is passed as
# configuration: it is a constant of the step, so the gradient check does not differentiate it (more below).

# %%
rng = np.random.default_rng(0)
D, heads, N, L = 8, 2, 5, 3
params = xl.init_params(rng, D, heads)
x = rng.standard_normal((2, N, D))
memory = rng.standard_normal((2, L, D))
for causal in (False, True):
    assert check(xl.forward, xl.backward, {"x": x, **params},
                 config={"memory": memory, "heads": heads, "causal": causal}, reference=xl.loop,
                 expected_shape=(2, N, D), tol=1e-12)

# %% [markdown]
# ### Segment by segment equals one pass
#
# A sequence of 4 segments of N = 5, run one after another: each segment gets the memory that `next_memory` returned
# for the one before (the last `mem_len` rows of [memory; segment]). `one_pass` computes the whole sequence at
# once with the pattern the segments produce (query p in segment s sees the keys from s N − mem_len on) and the
# distance p − j: the same numbers.

# %%
X = rng.standard_normal((2, 4 * N, D))
for causal in (True, False):
    for mem_len in (N, 2 * N, 2):
        outs, mem, mask = [], None, None
        for s in range(4):
            y, cache = xl.forward(X[:, s * N:(s + 1) * N], memory=mem, memory_mask=mask, causal=causal, heads=heads,
                                  mem_len=mem_len, **params)
            outs.append(y)
            mem, mask = xl.next_memory(cache)
        diff = np.abs(np.concatenate(outs, axis=1) - xl.one_pass(X, segment=N, causal=causal, heads=heads,
                                                                  mem_len=mem_len, **params)).max()
        print(f"causal={causal!s:5s} mem_len={mem_len:2d}: memory {mem.shape[-2]} rows, "
              f"segments vs one_pass max difference {diff:.1e}")
        assert diff < 1e-12


# %% [markdown]
# ### Which keys each query sees, segment by segment
#
# Left: a causal layer over 4 segments of N = 8 with a memory of L = 8, drawn over the whole sequence (this is
# `segment_pattern`): each query sees its own segment up to itself and the L positions before the segment.
# Middle: a stack of 3 such layers. Output p of layer l reads layer l − 1's states at the keys it sees, and those read
# layer l − 2's, so what reaches p through l layers is the pattern composed l times (a boolean matrix power,
# `figs.receptive_field`); the colour is the least depth at which input j reaches output p. Right: how far back the
# first query of a segment sees, against the depth.

# %%
show(figs.transformer_xl_segments("/tmp/effattn_xl/transformer_xl_segments.png"), size=(15, 5))
for mem_len in (4, 8, 16):
    _, reach = figs.receptive_field(20, 8, mem_len, 5)
    print(f"N = 8, L = {mem_len:2d}: the first query of a segment sees back {reach.tolist()} tokens through 1..5 layers")
_, reach = figs.receptive_field(20, 8, 8, 5)
assert reach.tolist() == [8, 16, 24, 32, 40]            # l * L with L = N: the paper's O(N_layers * L)

# %% [markdown]
# With L = N (the paper's training setting) the context grows by exactly L per layer, as the paper's "O(N × L)"
# (layers × segment length) says; with L = 2N by 2N per layer. With L < N the first layer reaches L back, and every
# later layer a whole segment N more: the key at the edge of the memory sits at the end of the previous segment,
# whose own view starts at *its* segment's start minus L. The memory is short, the reach is long: 5 layers of memory 8
# see 40 tokens back while each segment scores only N × (L + N) = 128 pairs.

# %% [markdown]
# ### The memory gets no gradient
#
# The output does depend on the memory (perturb it and the output moves: its true derivative is not zero), but the
# backward returns no gradient for it: SG, by design. What the backward does return are the gradients of W_k and
# W_v *including* the memory's rows (dW_k = h̃^T dk): the memory's keys and values are recomputed from the states
# with the current weights, so the weights learn from them; only the states themselves, which belong to the last
# step, are held fixed. A training step thus backpropagates through one segment, whatever its history.

# %%
y, cache = xl.forward(x, memory=memory, causal=True, heads=heads, **params)
dout = np.random.default_rng(3).standard_normal(y.shape)
grads = xl.backward(dout, cache)
true_dmem = numerical_gradient(lambda: xl.forward(x, memory=memory, causal=True, heads=heads, **params)[0],
                               memory, dout)
print("backward returns gradients for", sorted(grads), "- none for the memory")
print(f"the true derivative w.r.t. the memory is not zero: |d out / d memory| = {np.abs(true_dmem).max():.2f}")
assert "memory" not in grads and np.abs(true_dmem).max() > 1e-3

# %% [markdown]
# ## 2 · Relative positions
#
# ### The four terms of the score
#
# One head (d = D = 8), N = 6 queries over L + N = 4 + 6 keys, computed from the layer's own parameters (`figs.score_terms`;
# u and v at unit scale instead of `init_params`' 0.1 so that (c) and (d) show). Term (c) = u · k_j does not depend on
# the query: every row is the same. Term (d) = v · r_{L+i−j} depends on i − j only: constant along each diagonal, a
# Toeplitz matrix. Their sum, scaled and softmaxed, is the layer's own attention (checked inside `score_terms`).

# %%
terms = figs.score_terms(np.random.default_rng(0))
c_, d_, dist = terms["c"], terms["d"], terms["dist"]
print("(c): largest difference between rows:", np.abs(c_ - c_[:1]).max())
spread = max(np.ptp(d_[dist == t]) for t in np.unique(dist))
print("(d): largest spread among entries of one distance:", spread)
assert np.abs(c_ - c_[:1]).max() == 0 and spread < 1e-12
show(figs.transformer_xl_terms("/tmp/effattn_xl/transformer_xl_terms.png", np.random.default_rng(0)), size=(15, 7))

# %% [markdown]
# ### The relative shift, step by step
#
# The positional term BD_ij = (q_i + v) · r_{L+i−j} takes only W = M + N − 1 distinct vectors r_t. One product
# P = (q + v) r^T over the distances in *decreasing* order (column c is distance M − 1 − c) holds every number BD
# needs: BD[i, j] = P[i, N − 1 − i + j], row i read from column N − 1 − i on. Flattened row-major, that element is
# at i W + N − 1 − i + j = (N − 1) + i (W − 1) + j: so the flat array read from N − 1 in rows of W − 1 *is* BD (its
# first M columns) — a view, no gather. The package's lines:

# %%
show_source(relative.rel_shift)

# %% [markdown]
# With symbols instead of numbers — N = 3 queries, L = 2, M = 5, W = 7; entry `i:t` is q_i · r_t — the
# same reshapes put the right distance t = L + i − j in every place:

# %%
n_, mem_ = 3, 2
m_ = mem_ + n_
labels = np.array([[f"{i}:{int(t)}" for t in relative.distances(n_, m_, np)] for i in range(n_)], dtype=object)
print("P, distances", relative.distances(n_, m_, np).astype(int).tolist(), "\n", labels)
flat = labels.reshape(-1)
print("flattened:", " ".join(flat), f"\nread from {n_ - 1} for {n_} x {labels.shape[1] - 1}:",
      " ".join(flat[n_ - 1:n_ - 1 + n_ * (labels.shape[1] - 1)]))
shifted = relative.rel_shift(labels, m_)
print("BD = rel_shift(P, M):\n", shifted)
want = np.array([[f"{i}:{mem_ + i - j}" for j in range(m_)] for i in range(n_)], dtype=object)
assert (shifted == want).all()

# %% [markdown]
# And with numbers (one head, d = 4, the layer's parameters; `figs.shift_steps` checks BD against the per-pair form):

# %%
steps = figs.shift_steps(np.random.default_rng(1))
np.set_printoptions(precision=2, suppress=True, linewidth=120)
print("P (N x W):\n", steps["P"])
print("flattened, the slice read:\n", steps["flat"][steps["start"]:steps["stop"]])
print("read as N rows of W - 1:\n", steps["skew"])
print("BD (first M columns):\n", steps["BD"])
print("per pair (q_i + v) . r_(L+i-j):\n", steps["pair"])
print("max difference:", np.abs(steps["BD"] - steps["pair"]).max())
show(figs.transformer_xl_shift("/tmp/effattn_xl/transformer_xl_shift.png", np.random.default_rng(1)), size=(15, 9))

# %% [markdown]
# The paper (Appendix B) pads one zero column instead, because its P covers the distances ≥ 0 only; the entries it
# gets above the causal band are other rows' numbers, masked afterwards. The wider P here (N − 1 more columns, the
# negative distances) makes every entry right, so the non-causal layer works too. The backward writes dBD through
# the same view into a zero dP (`rel_unshift`).
