# %% [markdown]
# ## Synthesizer: attention without token–token interaction
#
# Tay, Bahri, Metzler, Juan, Zhao, Zheng, 2020, *Synthesizer: Rethinking Self-Attention in Transformer Models*
# ([arXiv 2005.00743](https://arxiv.org/abs/2005.00743)). Code: `effattn/attention/synthesizer_dense.py` and
# `effattn/attention/synthesizer_random.py`, registered as `synthesizer_dense` and `synthesizer_random`; the softmax core they
# share is `effattn/nn/synthetic.py`.
#
# **Intuition.** Is the dot product $q_i \cdot k_j$ essential? The Synthesizer *synthesizes* the attention logits
# without comparing tokens: the **Dense** Synthesizer predicts the whole row of logits of token $i$ from token $i$ alone;
# the **Random** Synthesizer learns one fixed table of logits, the same for every input. The values are still mixed by
# a softmax over positions. The survey files it under learnable patterns (LP) and, for the factorized forms, low rank
# (LR). It is *not* cheaper than attention: the logits are an $N \times N$ table, $O(N^2)$.
#
# $$\textbf{Dense:}\quad B_i = W_2^\top\,\mathrm{ReLU}(W_1^\top X_i + b_1) + b_2 \in \mathbb{R}^{\ell}, \qquad
#   Y = \mathrm{softmax}(B)\,G(X)$$
# $$\textbf{Random:}\quad Y = \mathrm{softmax}(R)\,G(X), \qquad R \in \mathbb{R}^{\ell \times \ell}\ \text{(per head)}$$
# $$\textbf{Factorized dense:}\quad B_i[j] = F_A(X_i)[\lfloor j/c \rfloor]\cdot F_B(X_i)[j \bmod c]\ \ (a\,c \ge \ell),
#   \qquad \textbf{factorized random:}\quad R = R_1 R_2^\top,\ R_1, R_2 \in \mathbb{R}^{\ell \times k}$$
#
# In the kernel contract there is no $X$: **the dense synthesizer computes its logits from the query-side input; q
# plays the role of X**, and $G(X)$ is the kernel's `v`. $\ell = N_{max}$: an input with $N < N_{max}$ uses the first
# $N$ columns of $W_2$ (or of $R$). The logits are not scaled by $1/\sqrt d$ (they are not dot products). Causal:
# mask $j > i$; `key_mask` masks columns.

# %%
import matplotlib.pyplot as plt
import numpy as np

import effattn
from effattn.attention import synthesizer_dense as SD
from effattn.attention import synthesizer_random as SR
from effattn.gradcheck import check_gradients
from effattn.tools.teach import load_answer
from effattn.nn.functional import sinusoidal_positions
from effattn.nn.optim import Adam
from effattn.figures.style import plot_patterns

dense = effattn.get("synthesizer_dense")
random_ = effattn.get("synthesizer_random")
full = effattn.get("full")
for spec in (dense, random_):
    print(spec.name, "|", spec.title, "|", spec.complexity, "| classes", spec.classes, "| exact:", spec.exact)

# %% [markdown]
# The code beside the equations: the dense logits $B$ (the MLP, or the factorized $F_A \cdot F_B$) and the softmax core
# $Y = \mathrm{softmax}(B)\,G(X)$ that both synthesizers share, with its backward:

# %%
from effattn.tools.teach import show_source
from effattn.nn import synthetic
show_source(SD._logits)
show_source(SR._table)
show_source(synthetic.attend_logits, docstring=False)
show_source(synthetic.attend_logits_backward, "dv = p.swapaxes", "db = softmax_backward")

# %% [markdown]
# ### Shapes, and what each variant reads

# %%
rng = np.random.default_rng(0)
B, H, N, d = 2, 4, 24, 16
q, k, v = (rng.standard_normal((B, H, N, d)) for _ in range(3))
pd = SD.init_params(rng, n_max=32, d=d)                 # N_max = 32 > N = 24: the first 24 columns are used
pr = SR.init_params(rng, n_max=32, heads=H)
print("dense params:", {n_: a.shape for n_, a in pd.items()}, " random params:", {n_: a.shape for n_, a in pr.items()})
out_d, cache_d = dense.forward(q, k, v, **pd)
out_r, cache_r = random_.forward(q, k, v, **pr)
print("out", out_d.shape, out_r.shape, " W", dense.weights(cache_d).shape)
assert np.allclose(out_d, dense.weights(cache_d) @ v) and np.allclose(out_r, random_.weights(cache_r) @ v)

noise = lambda a: a + rng.standard_normal(a.shape) * 10
assert np.array_equal(dense.forward(q, noise(k), v, **pd)[0], out_d)              # dense: k is never read
assert np.array_equal(random_.forward(noise(q), noise(k), v, **pr)[0], out_r)     # random: neither q nor k
print("dense ignores k; random ignores q and k")

# %% [markdown]
# ### Gradient check
#
# $dV = P^\top dY$, $dB = P \circ (dP - \mathrm{rowsum}(dY \circ Y))$ with $dP = dY\,V^\top$; then dense:
# $dW_2 = H^\top dB$, $dZ = (dB\,W_2^\top) \circ [Z > 0]$, $dW_1 = X^\top dZ$, $dX = dZ\,W_1^\top$; random:
# $dR = \sum_{\text{batch}} dB$; factorized random: $dR_1 = dR\,R_2$, $dR_2 = dR^\top R_1$.

# %%
g_rng = np.random.default_rng(1)
qs, ks, vs = (g_rng.standard_normal((1, 2, 7, 3)) for _ in range(3))
km = np.array([[[True, True, False, True, True, True, False]]])
variants = [(dense, SD.init_params(g_rng, n_max=9, d=3), None),
            (dense, SD.init_params(g_rng, n_max=9, d=3, factorized=3), 3),
            (random_, SR.init_params(g_rng, n_max=8, heads=2), None),
            (random_, SR.init_params(g_rng, n_max=8, heads=2, factorized=2), 2)]
for spec, params, f in variants:
    for causal in (False, True):
        errors = check_gradients(spec.forward, spec.backward, {"q": qs, "k": ks, "v": vs, **params},
                                 {"causal": causal, "key_mask": km, "factorized": f})
        assert max(errors.values()) < 1e-6, errors
    print(f"{spec.name:18s} factorized={f}: max relative error {max(errors.values()):.0e} over {sorted(errors)}")

# %% [markdown]
# ### Factorized = low rank
#
# The factorized random table $R_1 R_2^\top$ has rank $k$; each row of factorized dense logits, folded into an
# $a \times c$ grid, is an outer product (rank 1). The singular values show it:

# %%
pf = SR.init_params(g_rng, n_max=N, heads=1, factorized=3)
_, cf = random_.forward(q[:, :1], k[:, :1], v[:, :1], **pf, factorized=3)
logw = np.log(cf.p[0, 0])
logw = logw - logw[:, :1]                                 # remove each row's log-sum-exp: R - R[:, :1]
print("singular values of the factorized random logits (k=3):", np.round(np.linalg.svd(logw, compute_uv=False)[:6], 6))
assert np.linalg.matrix_rank(logw, tol=1e-8) <= 4

# %% [markdown]
# ### Learned vs random attention maps
#
# Top row: both synthesizers at their random initialisation, next to vanilla attention of random $q, k$. Bottom row:
# the same synthesizers **after 150 Adam steps on a toy task** — output $i$ must copy value $i-1$ (a shift) — with
# positional encodings as $X$ (= q) and fresh random values each step. Both learn the shift pattern: the random
# synthesizer by writing it into $R$ directly, the dense one by reading the position from $X_i$.

# %%
n_, d_ = 16, 16
x = sinusoidal_positions(n_, d_, np)[None, None]                 # (1, 1, N, d): positions play X
p_dense = SD.init_params(np.random.default_rng(2), n_max=n_, d=d_)
p_rand = SR.init_params(np.random.default_rng(3), n_max=n_, heads=1)
models = {"dense": (SD, p_dense), "random": (SR, p_rand)}


def maps():                                                       # both maps, with q = k = v = X
    return [mod.weights(mod.forward(x, x, x, **params)[1]) for mod, params in models.values()]


maps_init = maps()
losses = {}
for kind, (mod, params) in models.items():
    opt = Adam(params, lr=0.1)                                    # updates the arrays of `params` in place
    data = np.random.default_rng(4)
    losses[kind] = []
    for _ in range(150):
        vals = data.standard_normal((1, 1, n_, d_))
        target = np.concatenate([np.zeros_like(vals[..., :1, :]), vals[..., :-1, :]], axis=-2)
        out, c_ = mod.forward(x, x, vals, **params)
        losses[kind].append(float(((out - target) ** 2).mean()))
        opt.step(mod.backward(2 * (out - target) / out.size, c_))
    print(f"{kind:6s} synthesizer: shift-task MSE {losses[kind][0]:.3f} -> {losses[kind][-1]:.3f}")
maps_learned = maps()
qv, kv = (np.random.default_rng(s).standard_normal((1, 1, n_, d_)) for s in (5, 6))
vanilla = full.forward(qv, kv, qv)[1].attend.p
plot_patterns(maps_init + [vanilla] + maps_learned,
              ["dense, random init", "random, random init", "vanilla softmax(QK^T/sqrt d)",
               "dense, after 150 steps", "random, after 150 steps"],
              suptitle="Synthesizer attention maps", ncols=3, weights=True)
plt.show()
assert losses["random"][-1] < 0.5 * losses["random"][0] and losses["dense"][-1] < 0.5 * losses["dense"][0]

# %% [markdown]
# The random synthesizer's map is the same for every input — a learned, global, fixed pattern (like a learned
# relative-position prior). The dense synthesizer's map depends on each token, but never on *pairs* of tokens. The
# paper finds both competitive on some tasks (e.g. machine translation) and weaker where retrieval by content matters
# — and best when mixed with dot-product attention.
#
# **Cost.** $O(N^2)$ time and memory, like full attention (registered `subquadratic=False`); the factorized forms cut
# the *parameters* ($N_{max}^2 \to 2 N_{max} k$), not the $N \times N$ softmax.
#
# ### Synthesizer in summary
#
# * **Dense:** each token predicts its own row of logits from itself alone, $B_i = F(X_i)$ (an MLP to $N_{max}$
#   outputs); **random:** one learned table $R$, the same for every input. Neither compares tokens: there is no
#   $q_i \cdot k_j$.
# * **Factorized** forms are low rank ($R_1R_2^\top$; an outer product per dense row): fewer parameters, the same
#   $N \times N$ softmax — hence the survey's LR + LP.
# * **Not efficient:** $O(N^2)$ time and memory (measured at the end of this notebook), tied to a maximum length
#   $N_{max}$; the interest is what it shows — a learned, input-independent pattern already does well on some tasks.
#
# ### Exercises (Synthesizer)
#
# 1. Train the factorized random synthesizer with $k = 1, 2, 4$ on the shift task: which $k$ suffices? *Hint:* the
#    shift matrix has full rank, but the softmax of a low-rank table can still be nearly a shift: what is the rank of
#    $R_{ij} = -\alpha\,(j - i + 1)^2$?
# 2. Make the dense synthesizer's $X$ random per step (no positions): can it still learn the shift? *Hint:* what does
#    $B_i = F(X_i)$ know about $i$?
#
# <details><summary>Answers (try first!)</summary>
#
# 1. The function below trains one model and returns its final loss (printed after this cell): $k = 1$ fails,
#    $k = 2$ is much better, and $k = 4$ matches the full table. The logits $-\alpha (j - i + 1)^2$ peak at $j = i - 1$;
#    dropping the term $-\alpha (i - 1)^2$, which is constant along a row and so leaves the softmax unchanged, leaves
#    $-\alpha j^2 + 2\alpha (i - 1) j$, a sum of **two** outer products. A rank-2 table can therefore approach the shift
#    as $\alpha$ grows; in 150 steps the optimiser gets there more easily with some spare rank.
#
# ```python
# def shift_mse(rank, steps=150):
#     """Final shift-task MSE of the random synthesizer with a factorized table of rank `rank` (None: full)."""
#     params = SR.init_params(np.random.default_rng(3), n_max=n_, heads=1, factorized=rank)
#     opt, data = Adam(params, lr=0.1), np.random.default_rng(4)
#     for _ in range(steps):
#         vals = data.standard_normal((1, 1, n_, d_))
#         target = np.concatenate([np.zeros_like(vals[..., :1, :]), vals[..., :-1, :]], axis=-2)
#         out, c_ = SR.forward(x, x, vals, **params, factorized=rank)
#         opt.step(SR.backward(2 * (out - target) / out.size, c_))
#     return float(((out - target) ** 2).mean())
# ```
#
# 2. No. $B_i$ is a function of $X_i$ alone; a random $X_i$ carries no information about the position $i$, so every
#    row of the map has the same distribution and none can point at its own $i - 1$. The positions in $X$ are what
#    let the dense synthesizer learn a positional pattern — in a model, from the position embeddings added to the
#    token embeddings.
# </details>

# %%
shift_mse = load_answer("03_learned_patterns/40_synthesizer.py", "shift_mse", namespace=globals())
mse = {rank: shift_mse(rank) for rank in (None, 1, 2, 4)}
print({("full" if r is None else f"k={r}"): round(m, 4) for r, m in mse.items()})
assert mse[1] > 10 * mse[4] and mse[4] < 2 * mse[None] + 0.01
