# %% [markdown]
# ## 3 · Nyströmformer: landmarks and a pseudo-inverse
#
# The Nyström method rebuilds a matrix from a few of its columns and rows. Take m landmarks $\tilde Q, \tilde K$
# (means of m segments of Q and K; masked positions are left out of the means) and three small softmax kernels:
#
# $$F = \mathrm{softmax}\Big(\frac{Q\tilde K^\top}{\sqrt d}\Big)\ (N\times m),\quad
#   A = \mathrm{softmax}\Big(\frac{\tilde Q\tilde K^\top}{\sqrt d}\Big)\ (m\times m),\quad
#   B = \mathrm{softmax}\Big(\frac{\tilde Q K^\top}{\sqrt d}\Big)\ (m\times N)$$
#
# $$\mathrm{softmax}\Big(\frac{QK^\top}{\sqrt d}\Big) V \approx F\, A^{+}\, (B V)$$
#
# $A^+$ comes from the iteration $Z_{j+1} = \tfrac14 Z_j(13I - AZ_j(15I - AZ_j(7I - AZ_j)))$ started at
# $Z_0 = A^\top/(\|A\|_1\|A\|_\infty)$ — only matrix products, so it runs well on accelerators and its backward is
# written by hand in `effattn/attention/nystromformer.py`. An optional depthwise convolution of V (`conv_w`) is added
# as a skip connection; it is linear in V, so `weights()` returns $W = F Z B + C$ with C the banded filter matrix.
#
# **The code** (`effattn/attention/nystromformer.py`). `segment_averages` is the $(m \times N)$ matrix whose row $j$
# averages segment $j$, so `qt` $= \tilde Q$ and `kt` $= \tilde K$; `a` is $A$, `z` $= Z \approx A^+$ from `pinv_forward`;
# `bv` $= BV$ is one softmax attention of the landmark queries over all keys, and the last line is $F\,(Z\,BV)$: an
# attention of all queries over the $m$ landmark keys, whose "values" are `zbv`. In `pinv_forward`, `c` and `r` are
# $\|A\|_1$ and $\|A\|_\infty$ and the loop is the iteration for $Z_{j+1}$ (`t` $= AZ_j$):

# %%
from effattn.attention import nystromformer as nystromformer_mod

show_source(nystromformer_mod.segment_averages)
show_source(nystromformer_mod.forward, "avg_q = segment_averages", "out, _, f_cache = attend_forward")
show_source(nystromformer_mod.pinv_forward, "colsum = a.sum", "return z, (zs")

# %%
from effattn.attention.nystromformer import pinv_forward

case = nystromformer.example(np.random.default_rng(5), batch=2, heads=2, n=30, d=8)
print({name: tuple(a.shape) for name, a in case.inputs.items()}, case.config)
out, cache = nystromformer.forward(**case.inputs, **case.config)
assert np.allclose(to_numpy(nystromformer.weights(cache)) @ to_numpy(case.inputs["v"]), to_numpy(out))
small = nystromformer.example(np.random.default_rng(6), batch=1, heads=2, n=9, d=3)
errors = check_gradients(nystromformer.forward, nystromformer.backward, small.inputs, small.config)
print("gradient relative errors:", {k_: f"{e:.1e}" for k_, e in errors.items()})
assert max(errors.values()) < 1e-6

# the pseudo-inverse iteration: slow while A's small singular values are still being inverted, then quadratic
a = to_numpy(cache.a)[0, 0]
print(f"A is {a.shape}, condition number {np.linalg.cond(a):.1e}")
for it in (1, 3, 6, 10, 20):
    z, _ = pinv_forward(a, it)
    print(f"{it:2d} iterations: |Z - pinv(A)| = {np.abs(z - np.linalg.pinv(a)).max():.2e}")

# %% [markdown]
# **Error against m**, and the implied matrices next to softmax. With m = N landmarks (one token per segment) and
# enough iterations the approximation becomes exact: $F = A = B = P$ and $P P^{+} P = P$.
#
# But for m < N, *more* iterations can be *worse*: A is nearly singular (landmarks of a smooth sequence are nearly
# collinear), its exact pseudo-inverse has huge entries, and $F A^+ B$ amplifies the mismatch between F, B and A. Six
# iterations from $Z_0 = A^\top / (\|A\|_1 \|A\|_\infty)$ have only inverted A's large singular values: the truncated
# iteration acts as a regularised pseudo-inverse — one reason the paper's 6 iterations work well in practice.

# %%
n, d = 64, 16
q, k = smooth_qk(np.random.default_rng(7), n, d)
v = np.random.default_rng(8).standard_normal((1, 1, n, d))
ref, fc = full.forward(q, k, v)
ms = [2, 4, 8, 16, 32, 64]
errs = {6: [], 30: []}   # pseudo-inverse iterations
for it in errs:
    for m in ms:
        o, _ = nystromformer.forward(q, k, v, landmarks=m, iterations=it)
        errs[it].append(float(np.abs(o - ref).mean()))
plt.figure(figsize=(5, 3.4))
for it, e in errs.items():
    plt.semilogy(ms, e, "o-", label=f"{it} pinv iterations")
plt.xlabel("landmarks m"); plt.ylabel("mean |out - softmax out|"); plt.legend(); plt.grid(alpha=0.3); plt.show()

from effattn.figures.style import plot_shared

p_soft = to_numpy(fc.attend.p)[0, 0]
top, bottom = [(p_soft, "softmax P")], [None]
for m, it in ((4, 6), (16, 6), (64, 30)):
    _, c = nystromformer.forward(q, k, v, landmarks=m, iterations=it)
    w_ = to_numpy(nystromformer.weights(c))[0, 0]
    top.append((w_, f"Nyströmformer m={m}, {it} it."))
    bottom.append((np.abs(w_ - p_soft), f"|W - P|, m={m}: row L1 {np.abs(w_ - p_soft).sum(-1).mean():.2f}"))
plot_shared([top, bottom], labels=["weight (square-root scale)", "|error|"], cmaps=["viridis", "magma"],
            gammas=[0.5, None], suptitle="implied matrices on one scale (top), their errors on another (bottom)")
plt.show()
