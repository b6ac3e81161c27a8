# %% [markdown]
# ## Sparse Transformer: strided and fixed factorized attention
#
# *Generating Long Sequences with Sparse Transformers* — Child, Gray, Radford, Sutskever, 2019
# ([arXiv 1904.10509](https://arxiv.org/abs/1904.10509)). Code: `effattn/attention/sparse_strided.py` and
# `effattn/attention/sparse_fixed.py` (registered as `sparse_strided` and `sparse_fixed`); what the two patterns share
# (the three ways to combine them, the receptive field) is in `effattn/nn/factorized.py`.
#
# **Intuition.** Instead of letting every position look at every earlier one, split the job between two cheap patterns
# $A^{(1)}$ and $A^{(2)}$ such that *any* position reaches *any* earlier one in two hops. With a stride $l \approx \sqrt N$
# each query looks at $O(\sqrt N)$ keys per pattern, so a layer costs $O(N\sqrt N)$ instead of $O(N^2)$.
#
# **Strided** (for data with a period — images row by row, audio), query $i$, key $j$:
#
# $$A^{(1)}_i = \{j : i - l < j \le i\} \qquad\text{(the previous } l \text{ positions)}$$
# $$A^{(2)}_i = \{j : (i - j) \bmod l = 0,\ j \le i\} \qquad\text{(every } l\text{-th position back)}$$
#
# **Fixed** (for text, which has no period):
#
# $$A^{(1)}_i = \{j : \lfloor j/l \rfloor = \lfloor i/l \rfloor\} \qquad\text{(own block)}$$
# $$A^{(2)}_i = \{j : j \bmod l \in \{l-c, \dots, l-1\}\} \qquad\text{(the last } c \text{ "summary" cells of every block)}$$
#
# both intersected with $j \le i$ when causal. Non-causal (bidirectional): strided uses $|i-j| < l$ and
# $(i-j) \bmod l = 0$ in both directions; fixed uses the sets as written (whole own block, summary cells of every block).
#
# **Conventions.** The paper writes $A^{(1)}_i = \{t, \dots, i\}$ with $t = \max(0, i-l)$, i.e. $l+1$ cells; we use $l$
# cells like OpenAI's `get_attn_mask(..., "local")`. The extra cell $j = i - l$ is in $A^{(2)}$, so the merged pattern is
# the same either way. DeepSpeed's `FixedSparsityConfig` counts $l$ and $c$ in blocks: `num_local_blocks` $= l/b$,
# `num_global_blocks` $= c/b$.
#
# **Three ways to use two patterns** (config `combine`): `"merged"` — one softmax over $A^{(1)} \cup A^{(2)}$ (default);
# `"heads"` — even heads attend to $A^{(1)}$, odd heads to $A^{(2)}$; `"layers"` — each layer uses one pattern
# (`part=1` or `part=2`), alternating through the stack.
#
# **How it runs, without an N×N matrix.** Pad to $N_p = G\,l$ and view the sequence as a $G \times l$ grid
# ($i = g\,l + r$). $A^{(1)}$ of query row $g$ needs only rows $g-1, g$: a batch of $(l \times 2l)$ attentions.
# $A^{(2)}$ keys of a query are exactly its **column** of the grid: a batch of $(G \times G)$ attentions over the
# columns. The merged pattern joins both parts under one softmax through their log-sum-exps
# (`effattn/nn/union.py`): $L = \log(e^{\mathrm{lse}_1} + e^{\mathrm{lse}_2})$,
# $\mathrm{out} = e^{\mathrm{lse}_1 - L} o_1 + e^{\mathrm{lse}_2 - L} o_2$, with the query itself removed from the second
# part so nothing counts twice.

# %%
import matplotlib.pyplot as plt
import numpy as np

import effattn
from effattn.attention import sparse_fixed as sf_mod
from effattn.attention import sparse_strided as ss_mod
from effattn.figures.fixed_patterns import plot_sparse_heads
from effattn.figures.style import plot_pattern, plot_patterns
from effattn.gradcheck import check_gradients
from effattn.tools.teach import show_source

full = effattn.get("full")
strided, fixed = effattn.get("sparse_strided"), effattn.get("sparse_fixed")
rng = np.random.default_rng(0)
for spec in (strided, fixed):
    print(f"{spec.name:15s} {spec.title} | {spec.citation} | {spec.complexity}")

# %%
show_source(ss_mod._part)    # the strided rule, as index arithmetic on an (N/l, l) grid of positions
show_source(sf_mod._part)    # the fixed rule

# %% [markdown]
# ### Shape check and the contract: exactly full attention masked by the pattern
#
# `pattern(cache)` builds the mask from the paper's rule (not from the fast path). N = 100 is not a multiple of
# $l = 8$: the last block is padding, masked inside.

# %%
B, H, N, d = 2, 4, 100, 16
q, k, v = (rng.standard_normal((B, H, N, d)) for _ in range(3))
for spec, cfg in ((strided, {"stride": 8}), (fixed, {"block": 8, "summary": 2})):
    for combine in ("merged", "heads", "layers"):
        out, cache = spec.forward(q, k, v, causal=True, combine=combine, **cfg)
        mask = spec.pattern(cache)
        ref, _ = full.forward(q, k, v, causal=True, mask=mask)
        err = np.abs(out - ref).max()
        print(f"{spec.name:15s} combine={combine:7s} out {out.shape}  pattern {mask.shape}  max|out - full[mask]| = {err:.1e}")
        assert out.shape == (B, H, N, d) and err < 1e-12

# %% [markdown]
# ### Gradient check (central finite differences, float64)
#
# The backward is the flash-attention backward per part, $dS = P \circ (dP - \mathrm{rowsum}(dO \circ O))$, plus the
# log-sum-exp terms of the merge: $d\,o_k = a_k\, dO$ and $d\,\mathrm{lse}_k = a_k(\mathrm{rowsum}(dO\circ o_k) -
# \mathrm{rowsum}(dO \circ \mathrm{out}))$ with $a_k = e^{\mathrm{lse}_k - L}$.

# %%
qs, ks, vs = (rng.standard_normal((1, 2, 10, 3)) for _ in range(3))
km = np.ones((1, 1, 10), bool); km[..., 5] = False
for spec, cfg in ((strided, {"stride": 3}), (fixed, {"block": 4, "summary": 2})):
    for combine in ("merged", "heads"):
        errors = check_gradients(spec.forward, spec.backward, {"q": qs, "k": ks, "v": vs},
                                 {"causal": True, "key_mask": km, "combine": combine, **cfg})
        print(spec.name, combine, {n_: f"{e:.1e}" for n_, e in errors.items()})
        assert max(errors.values()) < 1e-7

# %% [markdown]
# ### The masks, per head
#
# With `combine="heads"`, head 0 (and every even head) gets $A^{(1)}$, head 1 (every odd head) $A^{(2)}$; their union is
# the merged pattern. Grid lines every $l$ positions.

# %%
plot_sparse_heads("strided", n=64, l=8)
plt.show()
plot_sparse_heads("fixed", n=64, l=8, c=2)
plt.show()

# %%
_, cache_h = strided.forward(q[:, :, :40], k[:, :, :40], v[:, :, :40], causal=True, stride=6, combine="heads")
per_head = strided.pattern(cache_h)                       # (H, N, N): one mask per head
_, cache_m = strided.forward(q[:, :, :40], k[:, :, :40], v[:, :, :40], causal=True, stride=6)
assert np.array_equal(per_head[0] | per_head[1], strided.pattern(cache_m))
W = strided.weights(cache_h)[0]                           # (H, N, N) attention weights of batch 0
plot_patterns([W[h] for h in range(4)], [f"head {h}: weights" for h in range(4)],
              suptitle="strided, combine='heads', N=40, l=6: the weights P of four heads", weights=True)
plt.show()

# %% [markdown]
# Bidirectional versions (an encoder): strided keeps $|i-j| < l$ and every $l$-th position in both directions; fixed
# keeps the whole own block and the summary columns of every block, earlier and later.

# %%
plot_sparse_heads("strided", n=48, l=6, causal=False)
plt.show()
plot_sparse_heads("fixed", n=48, l=8, c=2, causal=False)
plt.show()

# %% [markdown]
# ### Cost
#
# `setup` picks $l$ = the power of two nearest $\sqrt N$ and a constant $c$ (at most 4), so both patterns touch
# $O(N\sqrt N)$ score entries: strided $N(2l + N/l)$ causal, fixed $N(l + cN/l)$. The count below is exact (the sizes of
# the per-group score matrices the fast path allocates); measured time and memory are in the cost section at the end.

# %%
_entries = {}


def score_entries(spec, n):
    """Entries of all per-group score matrices of one causal call with the default configuration."""
    if (spec.name, n) not in _entries:
        x = np.zeros((1, 1, n, 1))
        _, cache = spec.forward(x, x, x, causal=True, **spec.setup(rng, n=n, d=1, heads=1)[1])
        _entries[spec.name, n] = sum(a.p.size for _, c in cache.slices for a in c.attends)
    return _entries[spec.name, n]


print(f"{'N':>6} {'N^2':>11} {'strided entries':>16} {'fixed entries':>14}")
for n in (256, 1024, 4096, 16384):
    print(f"{n:6d} {n * n:11d} {score_entries(strided, n):16d} {score_entries(fixed, n):14d}")
for spec in (strided, fixed):
    e = np.log(score_entries(spec, 16384) / score_entries(spec, 1024)) / np.log(16)
    print(f"{spec.name}: score entries grow as N^{e:.2f} from N=1024 to 16384 (survey: {spec.complexity})")
    assert e < 1.6
