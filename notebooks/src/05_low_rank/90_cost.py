# %% [markdown]
# ## 4 · Cost, measured
#
# Forward + backward of one head, float32, d = 64, with the defaults of `setup` (Linformer k = 128, Nyströmformer
# m = 64 landmarks, 6 iterations, a 3-tap convolution). Peak memory is what `tracemalloc` sees NumPy allocate. The
# survey lists both as O(N); the fitted exponents should be close to 1 (at small N fixed overheads flatten the time curve). `python -m effattn bench` runs the full comparison.

# %%
from effattn.backend import set_blas_threads
from effattn.tools.bench import fit_exponent, measure

set_blas_threads(1)  # one BLAS thread: CPU time then counts the work done, whatever else runs on the machine


def cpu_measure(spec, n, causal=False):
    """Forward + backward at B = H = 1, d = 64, float32 (effattn.tools.bench.measure): (CPU seconds, peak traced bytes)."""
    r = measure(spec, n, d=64, causal=causal, repeats=3, clock="cpu")
    return r["time_s"], r["peak_bytes"]


ns = [512, 1024, 2048, 4096]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
exps = {}
for name in ("full", "linformer", "nystromformer"):
    ns_ = ns[:3] if name == "full" else ns
    rs = [cpu_measure(effattn.get(name), n_) for n_ in ns_]
    t_exp = fit_exponent(ns_, [r[0] for r in rs])
    m_exp = exps[name] = fit_exponent(ns_, [r[1] for r in rs])
    axes[0].loglog(ns_, [r[0] for r in rs], "o-", label=f"{name} ~N^{t_exp:.2f}")
    axes[1].loglog(ns_, [r[1] / 2**20 for r in rs], "o-", label=f"{name} ~N^{m_exp:.2f}")
    print(f"{name:14s} time exponent {t_exp:.2f}  memory exponent {m_exp:.2f}  at N={ns_[-1]}: "
          f"{rs[-1][0] * 1e3:.0f} ms CPU, peak {rs[-1][1] / 2**20:.1f} MiB")
axes[0].set_title("forward + backward CPU time (s)"); axes[1].set_title("peak memory (MiB)")
for ax in axes:
    ax.set_xlabel("N"); ax.legend(fontsize=8); ax.grid(alpha=0.3, which="both")
plt.tight_layout(); plt.show()
assert exps["linformer"] < 1.2 and exps["nystromformer"] < 1.2

# %% [markdown]
# ## Summary
#
# | | Linformer | Nyströmformer |
# |---|---|---|
# | approximation | $\mathrm{softmax}(Q(EK)^\top/\sqrt d)\,FV$, learned $E, F$ | $F\,A^{+}\,BV$ from m segment-mean landmarks |
# | parameters | E, F $(k, N_{max})$ (shared or per head) | none (optional conv skip `conv_w`) |
# | implied matrix | $\bar P F$, rank $\le k$ | $F Z B$ (+ banded C) |
# | cost | $O(Nk)$ | $O(Nm + m^3)$ |
# | causal | no (E mixes all positions) | no (landmarks average future positions) |
# | fixed length | yes: $N \le N_{max}$ | no |
#
# Both rely on attention being approximately low rank (section 1). Linformer's approximation is learned for a fixed
# maximum length; Nyströmformer's is computed afresh for every input and becomes exact with m = N landmarks.
#
# ## Exercises
#
# 1. Section 1: make the content attention sharper (scale q by 3). How many singular values now hold 90 % of the
#    energy? What does that predict for Linformer's k?
# 2. Fit Linformer's E and F (section 2) with `sharing="key_value"`: how much worse is the fitted output error?
# 3. Nyströmformer with a key_mask that hides a whole segment: what happens to that landmark, and to the output?
#    (Read `segment_averages` in `effattn/attention/nystromformer.py`.)
# 4. Replace the iterative pseudo-inverse by `np.linalg.pinv` in a copy of the forward pass: for which m does the
#    output change noticeably after 6 iterations?
# 5. Why can neither mechanism decode causally? Sketch how you would restrict Linformer's E to make it causal, and
#    what it would cost.
