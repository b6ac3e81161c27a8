# %% [markdown]
# ## 2 · Linformer: learned projections along the sequence
#
# Project the length axis of the keys and values with $E, F \in \mathbb{R}^{k \times N}$ (paper eq. 7):
#
# $$\overline{\text{head}} = \underbrace{\mathrm{softmax}\!\Big(\frac{Q (E K)^\top}{\sqrt d}\Big)}_{\bar P\ (N \times k)}\ \underbrace{F V}_{k \times d_v}$$
#
# Cost $O(N k d)$. The implied $N \times N$ matrix is $W = \bar P F$ (rank $\le k$), and `weights(cache)` returns it.
# Sharing modes (paper §4): `"none"` (E, F per head, $(H, k, N_{max})$), `"headwise"` (one E and F for all heads, the
# default), `"key_value"` (E = F) and `"layerwise"` (one E for every layer — at kernel level the same as key_value).
# Inputs shorter than $N_{max}$ use the first N columns of E. `key_mask` zeroes masked rows of K and V *before* the
# projection, so a masked token contributes a zero vector to every projected slot (it does not remove the slot).
#
# **The code** (`forward` and `weights` in `effattn/attention/linformer.py`): `e` and `f` are $E$ and $F$ cut to the
# first $N$ columns, `kp` $= EK$ and `vp` $= FV$ are the $k$ projected keys and values, `attend_forward` is
# $\bar P\,(FV)$ with $\bar P = \mathrm{softmax}(Q(EK)^\top/\sqrt d)$ (`scale` $= 1/\sqrt d$), and the implied matrix
# `w` is $W = \bar P F$ (`cache.attend.p` is $\bar P$):

# %%
from effattn.attention import linformer as linformer_mod

show_source(linformer_mod.forward, "km = key_mask", "out, _, ac = attend_forward")
show_source(linformer_mod.weights)

# %%
rng = np.random.default_rng(1)
case = linformer.example(rng, batch=2, heads=2, n=40, d=8)
print({name: tuple(a.shape) for name, a in case.inputs.items()}, case.config)
out, cache = linformer.forward(**case.inputs, **case.config)
W = to_numpy(linformer.weights(cache))
print("out", out.shape, "implied W", W.shape, "rank of W:", np.linalg.matrix_rank(W[0, 0]), "(k =", case.inputs["E"].shape[0], ")")
assert np.allclose(W @ to_numpy(case.inputs["v"]), to_numpy(out))

small = linformer.example(np.random.default_rng(2), batch=1, heads=2, n=7, d=3)
errors = check_gradients(linformer.forward, linformer.backward, small.inputs, small.config)
print("gradient relative errors:", {k_: f"{e:.1e}" for k_, e in errors.items()})
assert max(errors.values()) < 1e-6

# %% [markdown]
# **E and F are learned.** A random Gaussian E (the Johnson–Lindenstrauss argument of the paper's Theorem 1) only
# preserves $P V$ approximately and needs a large k; training adapts E and F to the data. Here we fit E and F by
# gradient descent (`effattn.nn.optim.Adam`, with the hand-written backward) so that Linformer's output matches softmax attention on one
# fixed input — a toy version of what training does — and compare the implied matrices.

# %%
n, d, kk = 64, 16, 8
q, k = smooth_qk(np.random.default_rng(3), n, d)
v = np.random.default_rng(4).standard_normal((1, 1, n, d))
target, fcache = full.forward(q, k, v)
from effattn.attention.linformer import init_projection
from effattn.nn.optim import Adam

params = {"E": init_projection(rng, kk, n), "F": init_projection(rng, kk, n)}     # N(0, 1/N) entries
w_random = to_numpy(linformer.weights(linformer.forward(q, k, v, **params)[1]))[0, 0]
opt = Adam(params, lr=0.03)                             # updates the arrays of params in place
losses = []
for step in range(300):
    out, c = linformer.forward(q, k, v, **params)
    diff = out - target
    losses.append(float((diff ** 2).mean()))
    opt.step(linformer.backward(2 * diff / diff.size, c))
w_fit = to_numpy(linformer.weights(linformer.forward(q, k, v, **params)[1]))[0, 0]
print(f"output MSE: random E,F {losses[0]:.4f} -> fitted {losses[-1]:.4f}")
fig = plot_patterns([to_numpy(fcache.attend.p)[0, 0], w_random, w_fit],
                    ["softmax", f"Linformer k={kk}, random E, F", f"Linformer k={kk}, fitted E, F"], weights=True)
plt.show()

# %% [markdown]
# The fitted matrices reproduce the *output* $PV$, not necessarily $P$ itself: Linformer only needs $\bar P F V \approx PV$
# for the values it sees, and its implied W may even have negative entries (F is unconstrained). That is the price of
# learned projections: the approximation is good for the data it was trained on and its length $N_{max}$.
#
# **Error against k** for random Gaussian projections (no training; entries $N(0, 1/k)$, the Johnson–Lindenstrauss
# scaling of the paper's Theorem 1), averaged over draws, next to the best rank-k approximation of $P$ (SVD) — the
# floor no rank-k method can beat:

# %%
p = to_numpy(fcache.attend.p)[0, 0]
u, s, vt = np.linalg.svd(p)
pv = p @ v[0, 0]
ks = [4, 8, 16, 32, 64]
err_rand, err_svd = [], []
for kk in ks:
    e = []
    for seed in range(5):
        E = np.random.default_rng(seed).standard_normal((kk, n)) / math.sqrt(kk)
        o, _ = linformer.forward(q, k, v, E=E, sharing="key_value")
        e.append(np.abs(o[0, 0] - pv).mean())
    err_rand.append(np.mean(e))
    err_svd.append(np.abs(((u[:, :kk] * s[:kk]) @ vt[:kk]) @ v[0, 0] - pv).mean())
plt.figure(figsize=(5, 3.4))
plt.semilogy(ks, err_rand, "o-", label="Linformer, random E = F")
plt.semilogy(ks, err_svd, "s-", label="best rank-k (SVD of P)")
plt.xlabel("k"); plt.ylabel("mean |out - softmax out|"); plt.legend(); plt.grid(alpha=0.3); plt.show()
