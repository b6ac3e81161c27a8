# %% [markdown]
# ## Sparse Sinkhorn attention: learning to sort blocks
#
# Tay, Bahri, Yang, Metzler, Juan, 2020, *Sparse Sinkhorn Attention*
# ([arXiv 2002.11296](https://arxiv.org/abs/2002.11296)). Code: `effattn/attention/sinkhorn.py`, registered as
# `sinkhorn`; the Sinkhorn balancing itself is in `effattn/nn/sinkhorn.py`.
#
# **Intuition.** Block-local attention is cheap but every block is blind to the rest of the sequence. Sinkhorn
# attention keeps the local blocks and gives each query block *one more block to look at*, chosen by a small learned
# network that looks at all blocks and decides where each block should be "moved to". Choosing is a permutation —
# discrete, not differentiable — so it is relaxed into a *doubly stochastic* matrix by Sinkhorn normalisation: each
# query block then sees a soft mixture of blocks, which sharpens into a real permutation as the temperature drops.
#
# Split the sequence of length $\ell = N$ into $N_B$ blocks of $b$ tokens (the last one padded and masked).
#
# $$\psi_P(X)_i = \sum_{t \in \text{block } i} X_t \qquad\text{(block summaries: sum pooling, as in the paper; here } X = K)$$
# $$R = W_2^\top\,\mathrm{ReLU}(W_1^\top \psi_P(X) + b_1) + b_2 \in \mathbb{R}^{N_B \times N_B} \qquad\text{(SortNet)}$$
# $$S^0 = (R + \epsilon)/\tau,\quad \epsilon \sim \mathrm{Gumbel}, \qquad S^k = \mathcal F_c(\mathcal F_r(S^{k-1})),\quad
#   \mathcal F_r(X) = X - \log\textstyle\sum_j e^{X_{\cdot j}},\ \ \mathcal F_c(X) = X - \log\sum_i e^{X_{i\cdot}}$$
# $$P = \exp(S^{n_{\text{iters}}}), \qquad K_s = P\,K_{\text{blocks}},\quad V_s = P\,V_{\text{blocks}}$$
# $$O_i = \mathrm{softmax}\!\Big(\frac{Q_i\,[K_{s,i};\,K_i]^\top}{\sqrt d}\Big)\,[V_{s,i};\,V_i] \qquad\text{(one softmax over the } 2b \text{ keys)}$$
#
# The parameters $W_1\,(d, d_h)$, $b_1\,(d_h)$, $W_2\,(d_h, N_B)$, $b_2\,(N_B)$ are shared by every head; the Gumbel
# noise $\epsilon$ is an explicit argument (`draw_gumbel(rng, shape)`; `gumbel=None` at evaluation).
#
# **Causal** (the paper's *causal Sinkhorn balancing*): block $i$ may only draw from blocks $j < i$; row $i$ of $R$ is
# computed from the summary of block $i-1$ (block $i$'s own summary would contain keys after the early queries of
# block $i$); and the column step normalises entry $(i, j)$ over rows $i' \le i$ only. The local block is causally
# masked inside. **SortCut** (`sortcut=n_k`, encoder only): keep only the first $n_k$ sorted blocks, and let every
# query attend to those $n_k b$ keys. **Hard** permutations (`perm=` block indices, or `hard=True` = argmax of $P$):
# the result is then exactly `full` attention masked by the induced pattern.

# %%
import matplotlib.pyplot as plt
import numpy as np

import effattn
from effattn.attention import sinkhorn as sk
from effattn.nn import sinkhorn as balancing
from effattn.gradcheck import check_gradients, rel_error
from effattn.tools.teach import load_answer
from effattn.figures.style import plot_pattern, plot_patterns

sinkhorn = effattn.get("sinkhorn")
full = effattn.get("full")
print(sinkhorn.title, "|", sinkhorn.citation, "|", sinkhorn.complexity, "| classes", sinkhorn.classes)

# %% [markdown]
# The code beside the equations: the forward of `sinkhorn` from the blocks to the attention, SortNet $R$, and the
# Sinkhorn iterations $\mathcal F_c(\mathcal F_r(\cdot))$ of `effattn/nn/sinkhorn.py`:

# %%
from effattn.tools.teach import show_source
show_source(sk.forward, "pos, qb, kb, vb, real = _blocks", "out, acache = _attend_sortcut")
show_source(sk._sortnet)
show_source(balancing.sinkhorn_forward, docstring=False)

# %% [markdown]
# ### Shapes
#
# The registered example picks $b = \mathrm{round}(\sqrt{N/2})$ for length $N$ (see *Cost* below for why).

# %%
rng = np.random.default_rng(0)
case = sinkhorn.example(rng, batch=2, heads=4, n=50, d=16)
print({name: tuple(a.shape) for name, a in case.inputs.items()})
print({name: (tuple(a.shape) if hasattr(a, "shape") else a) for name, a in case.config.items()})
out, cache = sinkhorn.forward(**case.inputs, **case.config)
W = sinkhorn.weights(cache)
print("out", out.shape, " P (blocks)", cache.p.shape, " W", W.shape)
assert out.shape == (2, 4, 50, 16) and cache.p.shape == (2, 4, cache.nb, cache.nb)
assert np.allclose(out, W @ case.inputs["v"], atol=1e-12)

# %% [markdown]
# ### Sinkhorn balancing, in log space
#
# Alternately subtracting the row and the column log-sum-exp is Sinkhorn–Knopp scaling of $e^{S}$. After enough
# iterations the rows and the columns of $P$ all sum to one; a low temperature pushes $P$ towards a permutation.

# %%
logits = np.random.default_rng(1).standard_normal((8, 8)) * 2
for it in (1, 2, 5, 20, 60):
    p_ = np.exp(balancing.sinkhorn_forward(logits, it)[0])
    print(f"{it:3d} iterations: max |row sum - 1| = {np.abs(p_.sum(1) - 1).max():.1e}, "
          f"max |col sum - 1| = {np.abs(p_.sum(0) - 1).max():.1e}, largest entry per row ≥ {p_.max(1).min():.2f}")

mats, titles = [], []
for tau in (2.0, 0.75, 0.25):
    for it in (1, 3, 20):
        mats.append(np.exp(balancing.sinkhorn_forward(logits / tau, it)[0]))
        titles.append(f"tau={tau}, {it} iteration{'s' if it > 1 else ''}")
from effattn.figures.style import plot_shared

plot_shared([list(zip(mats[r:r + 3], titles[r:r + 3])) for r in (0, 3, 6)], vranges=[(0.0, 1.0)] * 3,
            labels=["P_ij"] * 3, xlabel="source block j", ylabel="target block i",
            suptitle="P = exp(log P) across iterations (columns) and temperatures (rows), one scale from 0 to 1")
plt.show()

# %% [markdown]
# **The backward of the balancing, by hand.** Each half-step is $Y = X - \mathrm{lse}(X)$ along one axis, whose
# backward is $dX = dY - \mathrm{softmax}(X)\,\mathrm{sum}(dY)$ with $\mathrm{softmax}(X) = e^{Y}$; the causal column
# step $Y_{ij} = X_{ij} - \log\sum_{i' \le i} e^{X_{i'j}}$ gives $dX_{i'j} = dY_{i'j} - \sum_{i \ge i'} dY_{ij}\,
# e^{X_{i'j} - C_{ij}}$. `sinkhorn_backward` runs these through every iteration in reverse; check it against finite
# differences:

# %%
nb_ = 5
tri = np.arange(nb_)[None, :] < np.arange(nb_)[:, None]
for causal in (False, True):
    la = np.random.default_rng(2).standard_normal((nb_, nb_))
    if causal:
        la = np.where(tri, la, -np.inf)
    g = np.random.default_rng(3).standard_normal(la.shape)
    logp, sc = balancing.sinkhorn_forward(la, 4, causal=causal)
    fin = np.isfinite(logp)
    analytic = balancing.sinkhorn_backward(np.where(fin, g, 0.0), sc)
    numeric = np.zeros_like(la)
    for idx in zip(*np.nonzero(np.isfinite(la))):
        for sign in (1, -1):
            la2 = la.copy()
            la2[idx] += sign * 1e-6
            numeric[idx] += sign * (np.where(fin, balancing.sinkhorn_forward(la2, 4, causal=causal)[0], 0) * g).sum() / 2e-6
    print(f"causal={causal}: sinkhorn_backward vs finite differences, relative error {rel_error(analytic, numeric):.1e}")
    assert rel_error(analytic, numeric) < 1e-7

# %% [markdown]
# ### Gradient check of the whole layer
#
# Through the block attention (`attend_backward`), the mixing ($dP = dK_s K^\top + dV_s V^\top$,
# $dK_{\text{blocks}} \mathrel{+}= P^\top dK_s$), $dS = P \circ dP$, the balancing, $dR = dS/\tau$, the MLP and the sum
# pooling back into the keys — for every input including the SortNet parameters.

# %%
for cfg in ({}, {"causal": True}, {"sortcut": 2, "key_mask": np.array([[[True] * 9 + [False] * 2]])}):
    small = sinkhorn.example(np.random.default_rng(4), batch=1, heads=2, n=11, d=3, causal=cfg.get("causal", False))
    errors = check_gradients(sinkhorn.forward, sinkhorn.backward, small.inputs, {**small.config, **cfg})
    print({k_: f"{e:.0e}" for k_, e in errors.items()}, {k_: v_ for k_, v_ in cfg.items() if k_ != "key_mask"})
    assert max(errors.values()) < 1e-6

# %% [markdown]
# ### Hard permutations: exactly sparse attention
#
# With a hard choice of block (here a random permutation of the blocks; `perm=`), each query block sees its own block
# and exactly one other: the output equals dense attention masked by that pattern.

# %%
n, d = 40, 8
q, k, v = (np.random.default_rng(s).standard_normal((1, 1, n, d)) for s in (5, 6, 7))
params, config = sinkhorn.setup(np.random.default_rng(8), n=n, d=d, heads=1)
nb = -(-n // config["block"])
perm = np.random.default_rng(9).permutation(nb)
out_h, cache_h = sinkhorn.forward(q, k, v, **params, **config, perm=perm)
pattern = sk.induced_pattern(cache_h)
ref, _ = full.forward(q, k, v, mask=pattern)
print("block choice:", perm, " max |sinkhorn(hard) - full[pattern]| =", f"{np.abs(out_h - ref).max():.1e}")
assert np.abs(out_h - ref).max() < 1e-12

_, cache_s = sinkhorn.forward(q, k, v, **params, **config)
_, cache_c = sinkhorn.forward(q, k, v, **params, **config, causal=True)
_, cache_cut = sinkhorn.forward(q, k, v, **params, **config, sortcut=2)
b = config["block"]
plot_patterns([cache_s.p[0, 0], sinkhorn.weights(cache_s)[0, 0], pattern[0, 0], sinkhorn.weights(cache_c)[0, 0],
               sinkhorn.weights(cache_cut)[0, 0]],
              ["soft P (block i draws j)", "W, soft P", "pattern of a hard permutation", "W, causal", "W, SortCut n_k=2"],
              suptitle=f"Sinkhorn attention, N={n}, b={b}, N_B={nb}", ncols=5, grid=None)
plt.show()

# %% [markdown]
# Read the second panel block row by block row: the diagonal block is the local attention, the off-diagonal mass is
# the sorted block — a mixture of source blocks with the weights of that row of $P$ (first panel). In the causal
# panel nothing lies above the diagonal: row $i$ of $P$ only mixes blocks $j < i$. SortCut gives every query the same
# $n_k b$ sorted keys, so its W has identical column support in every row.

# %% [markdown]
# **The sorted blocks themselves.** Give every key the value "its position / N" in every feature: the original key
# sequence is a ramp; `sorted_keys(cache)` $= P K_{\text{blocks}}$ shows which blocks each query block receives — whole
# blocks moved for a hard permutation, blends of blocks for the soft one.

# %%
ramp = np.broadcast_to((np.arange(n) / n)[:, None], (n, d))[None, None].copy()
_, c_soft = sinkhorn.forward(q, ramp, v, **params, **config)
_, c_hard = sinkhorn.forward(q, ramp, v, **params, **config, perm=perm)
ks_hard = sk.sorted_keys(c_hard)[0, 0, :, 0]
ks_soft = sk.sorted_keys(c_soft)[0, 0, :, 0]
plt.figure(figsize=(8, 2.6))
plt.plot(ramp[0, 0, :, 0], "k.-", label="original keys (position / N)")
plt.plot(ks_hard, "o-", ms=3, label=f"hard-sorted, perm = {perm.tolist()}")
plt.plot(ks_soft, "s-", ms=3, label="soft-sorted (P K)")
for t in range(b, nb * b, b):
    plt.axvline(t - 0.5, color="#bbb", lw=0.5)
plt.xlabel("slot (block i, offset s)"); plt.legend(fontsize=7); plt.title("block reordering")
plt.show()
blk = np.arange(nb * b) // b
expected = np.where(perm[blk] == blk, 0.0, (perm[blk] * b + np.arange(nb * b) % b) / n)   # own block -> no sorted part
expected[(perm[blk] * b + np.arange(nb * b) % b) >= n] = 0.0                              # padding slots are zero
assert np.allclose(ks_hard, expected)

# %% [markdown]
# ### Cost
#
# Forward + backward is six matmuls of the block attention ($N \times 2b \times d$) and six of the mixing
# ($N_B \times N_B \times bd = N \times N_B \times d$): about $6 N d\,(2b + N/b)$ flops. With $b$ fixed the mixing is
# $O(N^2 d / b)$ — quadratic; the optimum is $b = \sqrt{N/2}$, where the whole layer is $O(N^{1.5} d)$ (the survey
# quotes the memory per block, $O(b^2)$). That is the default block size.

# %%
Ns = np.array([1024, 4096, 16384])
bs = np.arange(4, 512)
plt.figure(figsize=(5.5, 3.4))
for N_ in Ns:
    plt.loglog(bs, 6 * N_ * 64 * (2 * bs + N_ / bs), label=f"N={N_}")
    plt.plot(sk.default_block(int(N_)), 6 * N_ * 64 * (2 * sk.default_block(int(N_)) + N_ / sk.default_block(int(N_))), "ko", ms=4)
plt.xlabel("block size b"); plt.ylabel("flops (model)"); plt.legend(); plt.title("local + mixing cost; dot = default b")
plt.show()

# %% [markdown]
# The measured time and memory against N, next to `full`, are in the cost section at the end of this notebook
# (`python -m effattn bench` runs N = 1K … 16K). Single-threaded CPU time of forward + backward from N = 1024 to 16384
# (d = 64, float32) fitted an exponent of about 1.25 for `sinkhorn`: the per-call overheads at small N pull the fit
# below the asymptotic 1.5 of the flop model.
#
# ### Sinkhorn in summary
#
# * **What it adds to local attention:** each query block also attends to one *sorted* block, $P K_{\text{blocks}}$,
#   $P V_{\text{blocks}}$ — one softmax over the $2b$ keys of its own block and the sorted one.
# * **How the sorting is learned:** SortNet (an MLP on the block sums) gives logits $R$; Gumbel noise, a temperature
#   $\tau$ and $n$ Sinkhorn iterations in log space turn them into a doubly stochastic $P$ — a relaxed permutation that
#   gradients flow through (`sinkhorn_backward`, checked above).
# * **Exactness:** with a hard permutation (`perm=`, `hard=True`) it is full attention masked by the induced block
#   pattern, to rounding; with the soft $P$ it is a different attention (each query sees blends of blocks), hence
#   `exact=False`.
# * **Cost:** $6Nd(2b + N/b)$ flops; the default $b = \sqrt{N/2}$ makes it $O(N^{1.5} d)$. Causal balancing and
#   SortCut are the paper's variants for decoding and for a fixed budget of $n_k b$ keys.
#
# ### Exercises (Sinkhorn)
#
# 1. Set `tau` to 5, 0.75 and 0.1 in the balancing cell: when does the soft mixture become a permutation, and how many
#    iterations does it need then? *Hint:* watch the smallest row maximum of $P$ and the row-sum error together.
# 2. Why would the causal variant leak the future if row $i$ of $R$ came from block $i$'s own summary?
#    *Hint:* which keys does $\psi_P(K)_i$ sum, and which queries of block $i$ come before them?
# 3. Train the SortNet parameters (Adam on `backward`'s `W1, b1, W2, b2`) so that block $i$ attends to block
#    $N_B - 1 - i$: does $P$ become the anti-diagonal? *Hint:* make the target the output of a hard `perm=` call.
#
# <details><summary>Answers (try first!)</summary>
#
# 1. The function below measures it. At $\tau = 5$ the balanced $P$ is nearly uniform (no row has more than about
#    0.15); as $\tau$ falls the rows sharpen towards the permutation that maximises $\sum_i R_{i\pi(i)}$ (the assignment
#    problem; at $\tau = 0.1$ every row's maximum is at least 0.7, and it tends to 1 as $\tau \to 0$), but Sinkhorn's
#    iterations converge more slowly: at $\tau = 0.1$ twenty iterations leave row sums off by up to 0.07, and even 300
#    leave a few thousandths. A low temperature buys a sharper choice with many more iterations — one reason the
#    paper keeps $\tau$ moderate (0.75 here).
#
# ```python
# def sharpness(tau, n_iters):
#     """(smallest row maximum of P, largest |row sum - 1|) after n_iters balancing steps at temperature tau."""
#     logits = np.random.default_rng(1).standard_normal((8, 8)) * 2
#     p = np.exp(balancing.sinkhorn_forward(logits / tau, n_iters)[0])
#     return float(p.max(axis=1).min()), float(np.abs(p.sum(axis=1) - 1).max())
# ```
#
# 2. $\psi_P(K)_i$ sums the keys $ib, \dots, ib + b - 1$. Query $ib$ (the first of block $i$) may see only keys
#    $\le ib$, but row $i$ of $R$ — and so which blocks query block $i$ draws, and with what weight — would then depend
#    on keys $ib + 1, \dots, ib + b - 1$, after it. Changing one of them moves the output at $ib$: the contract's
#    causality probe (outputs before $t$ unchanged when inputs from $t$ on change) fails. Block $i - 1$'s summary
#    holds only keys before $ib$.
# 3. Yes, for a fixed input: the loss falls and $P$'s mass moves to the anti-diagonal; the Gumbel noise (pass fresh
#    draws each step) keeps it from over-fitting one layout. The gradient reaches $W_2, b_2$ through $dR = dS/\tau$.
# </details>

# %%
sharpness = load_answer("03_learned_patterns/30_sinkhorn.py", "sharpness", namespace=globals())
for tau in (5.0, 0.75, 0.1):
    print(f"tau={tau:4}: " + "   ".join(f"{it:3d} iterations: min row max {a:.2f}, row-sum error {e:.0e}"
                                        for it, (a, e) in ((it, sharpness(tau, it)) for it in (20, 300))))
assert sharpness(5.0, 20)[0] < 0.2 and sharpness(0.1, 300)[0] > sharpness(5.0, 300)[0]
assert sharpness(0.1, 20)[1] > 1e-2 > sharpness(0.1, 300)[1]
