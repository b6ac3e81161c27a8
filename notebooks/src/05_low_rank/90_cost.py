# %% [markdown]
# ## 4 · Cost, measured
#
# Forward + backward of one head, float32, d = 64, with the defaults of `setup` (Linformer k = 128, Nyströmformer
# m = 64 landmarks, 6 iterations, a 3-tap convolution), measured by `effattn.tools.bench.cost_table`, the one
# measuring helper of every notebook: the process's CPU time on one BLAS thread (the median of three runs), so that
# other users of a shared machine barely move it, and the peak memory that `tracemalloc` sees NumPy allocate. The
# survey lists both as O(N); the fitted exponents should be close to 1 (at small N fixed overheads flatten the time
# curve), and each has an asserted sanity range. `python -m effattn bench --clock cpu --threads 1` runs the full
# comparison.

# %%
from effattn.tools.bench import cost_table

ns = {"full": [512, 1024, 2048], "*": [512, 1024, 2048, 4096]}
rows, exps = cost_table(["full", "linformer", "nystromformer"], ns,
                        expect={"full": (1.4, 2.6), "linformer": (0.5, 1.3), "nystromformer": (0.4, 1.3)},
                        expect_memory={"full": (1.6, 2.2), "linformer": (0.7, 1.2), "nystromformer": (0.7, 1.2)})
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for name, rs in rows.items():
    ns_ = [r["n"] for r in rs]
    axes[0].loglog(ns_, [r["time_s"] for r in rs], "o-", label=f"{name} ~N^{exps[name]['time']:.2f}")
    axes[1].loglog(ns_, [r["peak_bytes"] / 2**20 for r in rs], "o-", label=f"{name} ~N^{exps[name]['memory']:.2f}")
axes[0].set_title("forward + backward CPU time (s)"); axes[1].set_title("peak memory (MiB)")
for ax in axes:
    ax.set_xlabel("N"); ax.legend(fontsize=8); ax.grid(alpha=0.3, which="both")
plt.tight_layout(); plt.show()

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
# The package's lines that compute both are printed beside their equations (Linformer's projections and implied matrix;
# Nyströmformer's segment means, three kernels and the pseudo-inverse iteration). In *Your turn* you wrote Linformer's
# projected attention and its backward for given E, F: the dense check against `effattn.get("linformer")` with the same
# E, F and the gradient check of q, k, v, E and F judged it (a hidden worked answer passes both).
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
