# %% [markdown]
# ## 1 · Random features for the softmax kernel: positive vs trigonometric
#
# For $w \sim \mathcal N(0, I_d)$ both of these are unbiased, $\mathbb E[\phi(x)\cdot\phi(y)] = \exp(x\cdot y)$:
#
# $$\phi_{\text{trig}}(x) = \tfrac{e^{\|x\|^2/2}}{\sqrt m}\big[\sin(w_l^\top x), \cos(w_l^\top x)\big]_{l \le m},\qquad
#   \phi_{+}(x) = \tfrac{e^{-\|x\|^2/2}}{\sqrt m}\big[\exp(w_l^\top x)\big]_{l \le m}$$
#
# (Performer Lemma 1; queries and keys are scaled by $d^{-1/4}$ first so that $x\cdot y = q\cdot k/\sqrt d$.) Their
# variances differ where it matters: attention matrices are mostly *small* weights. The trigonometric estimator's
# variance stays large when $\exp(x\cdot y) \to 0$, so small weights come out with large relative errors — and even
# negative, which can make the normaliser $\sum_j$ vanish or flip sign. The positive estimator's variance goes to 0
# with the kernel value (paper Lemma 2), and it never produces a negative weight.
#
# **The code** (`random_features` in `effattn/attention/performer.py`, the unstabilised map used for estimator studies
# like this one): `features` holds the rows $w_l$, `u` $= w_l^\top x$ for every $l$, `sq` $= \|x\|^2/2$; the positive
# branch is $\phi_+$, the last line $\phi_{\text{trig}}$ (and `hyperbolic`, $e^{-\|x\|^2/2}[e^{u}, e^{-u}]/\sqrt{2m}$,
# is the positive map of $W$ and $-W$):

# %%
show_source(performer_mod.random_features, "m = features.shape", "return xp.exp(sq)")

# %%
rng = np.random.default_rng(0)
d, m, draws = 16, 64, 200
x = rng.standard_normal(d); x *= 1.2 / np.linalg.norm(x)
ortho = rng.standard_normal(d); ortho -= (ortho @ x) / (x @ x) * x; ortho /= np.linalg.norm(ortho)
angles = np.linspace(0, np.pi, 25)
ys = np.stack([1.2 * (np.cos(a) * x / 1.2 + np.sin(a) * ortho) for a in angles])      # |y| = |x|, x.y from 1.44 to -1.44
true = np.exp(ys @ x)
rel = {"positive": [], "trig": []}
W = [performer_mod.draw_features(rng, m, d, orthogonal=False) for _ in range(draws)]
for kernel in rel:
    est = np.stack([(performer_mod.random_features(ys, w, kernel) @ performer_mod.random_features(x[None], w, kernel).T)[:, 0] for w in W])
    rel[kernel] = np.sqrt(((est - true) ** 2).mean(0)) / true                           # relative RMSE per pair
plt.figure(figsize=(5.5, 3.6))
for kernel, r in rel.items():
    plt.semilogy(true, r, "o-", ms=3, label=f"{kernel} features")
plt.xscale("log"); plt.xlabel("true kernel value exp(x.y)"); plt.ylabel("relative RMSE (m=64)")
plt.legend(); plt.grid(alpha=0.3, which="both"); plt.show()
i = len(angles) * 3 // 4
print(f"kernel value {true[i]:.3f}: relative error positive {rel['positive'][i]:.2f}, trig {rel['trig'][i]:.2f}")
print(f"kernel value {true[-1]:.3f} (y = -x): positive {rel['positive'][-1]:.2f} (exact: w.(x + y) = 0), trig {rel['trig'][-1]:.2f}")
assert rel["positive"][-1] < rel["trig"][-1]
