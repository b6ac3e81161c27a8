# %% [markdown]
# ## 1 · The equations
#
# For queries $Q \in \mathbb{R}^{N\times d}$, keys $K \in \mathbb{R}^{M\times d}$ and values $V\in\mathbb{R}^{M\times d_v}$
# (per batch element and head):
#
# $$S = \frac{QK^\top}{\sqrt d},\qquad P = \operatorname{softmax}_{\text{row}}(S + \log \text{mask}),\qquad O = PV.$$
#
# A mask entry that is False adds $-\infty$ to the score, so that key gets **exactly** zero weight. Three masks cover
# everything the survey's models need: `causal` (query $i$ sees keys $j\le i$), `key_mask` (padding in variable-length
# batches) and a general boolean `mask`. In code, `effattn.attention.full.forward` combines the masks into one boolean
# `allowed` array and hands it to the shared softmax core `effattn.nn.sparse.attend_forward`, which every sparse
# mechanism also runs on its blocks:

# %%
from effattn.attention import full as full_mod

show_source(full_mod.forward)
show_source(sparse.attend_forward)

# %% [markdown]
# Line by line: `s` is $S$ (in base 2: $e^x = 2^{x\log_2 e}$, which NumPy computes faster); `copyto(..., where=~allowed)`
# is the $+\log\text{mask}$ term; subtracting the row maximum `m` changes nothing in $P$ but keeps `exp2` from
# overflowing; one product `e @ [V, 1]` gives both $EV$ and the row sums of $E$, so $O = PV = EV / \mathrm{rowsum}(E)$
# never forms $P$ separately; the log-sum-exp `lse` is kept for mechanisms that combine several softmaxes.

# %%
rng = np.random.default_rng(0)
B, H, N, M, d, dv = 2, 4, 6, 9, 8, 5
q = rng.standard_normal((B, H, N, d))
k = rng.standard_normal((B, H, M, d))
v = rng.standard_normal((B, H, M, dv))
out, cache = full.forward(q, k, v)
P = full.weights(cache)
print("out", out.shape, "  P", P.shape)
assert out.shape == (B, H, N, dv) and P.shape == (B, H, N, M)
# the equations, written out with plain NumPy, give the same numbers
S = q @ k.swapaxes(-1, -2) / np.sqrt(d)
P_ref = np.exp(S - S.max(-1, keepdims=True))
P_ref /= P_ref.sum(-1, keepdims=True)
assert np.allclose(P, P_ref) and np.allclose(out, P_ref @ v) and np.allclose(P.sum(-1), 1)
print("rows of P sum to 1; out == P @ v")
