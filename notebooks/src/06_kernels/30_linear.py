# %% [markdown]
# ## 3 · The Linear Transformer: $\phi(x) = \mathrm{elu}(x) + 1$, and attention as an RNN
#
# A positive, deterministic feature map with m = d: $W_{ij} = \phi(q_i)\cdot\phi(k_j) / \sum_l \phi(q_i)\cdot\phi(k_l)$.
# It is its own attention (not an estimate of softmax), so it is tested against this explicit formula. The
# denominator gets `eps = 1e-6`, as in fast-transformers. In causal mode:
#
# $$S_i = S_{i-1} + \phi(k_i) v_i^\top,\quad z_i = z_{i-1} + \phi(k_i),\quad \mathrm{out}_i = \frac{\phi(q_i)^\top S_i}{\phi(q_i)^\top z_i + \epsilon}$$
#
# The parallel form computes the prefix sums in chunks of C positions (inside a chunk the C x C lower-triangular block,
# across chunks the carried state); `step` of `effattn/attention/linear.py`, from the empty state `init_state`, is the
# RNN a decoder calls one token at a time (the shared core: `kernel_attention_step` in `effattn/nn/kernel_attention.py`).
#
# **The code.** `linear.forward` is the feature map and a call: `feature_map` is $\phi(x) = \mathrm{elu}(x) + 1$ and
# `kernel_attention_forward` does the rest. Its causal branch is the chunked prefix sum: the sequence in `nc` chunks of
# `c` $= C$ positions (`pq`, `pk`, `pv`: $\phi(Q_b), \phi(K_b), V_b$), `kv` the chunk's $\sum \phi(k_j) v_j^\top$, `s`
# and `z` the *exclusive* cumulative sums over earlier chunks ($S$ and $z$ at the chunk's start), `a` the lower-triangular
# $C \times C$ block $\mathrm{tril}(\phi(Q_b)\phi(K_b)^\top)$ for the positions inside the chunk; then
# $\mathrm{out}_i = (\phi(q_i)^\top S_i)/(\phi(q_i)^\top z_i + \epsilon)$ is `num * inv`.

# %%
show_source(linear_mod.feature_map)
show_source(linear_mod.forward, "phi_q, elu_q = feature_map", "out, kcache = kernel_attention_forward")
show_source(kernel_attention.kernel_attention_forward, "c = min(chunk, n)", "out = num * inv")

# %%
rng = np.random.default_rng(4)
n, d = 12, 4
q, k, v = (rng.standard_normal((1, 1, n, d)) for _ in range(3))
out, cache = linear.forward(q, k, v, causal=True, chunk=4)
errors = check_gradients(linear.forward, linear.backward, {"q": q, "k": k, "v": v}, {"causal": True, "chunk": 4})
print("gradient relative errors:", {k_: f"{e:.1e}" for k_, e in errors.items()})
assert max(errors.values()) < 1e-6

state = linear_mod.init_state(lead=(1, 1), d=d, dv=d)
states, steps = [], []
for t in range(n):
    o, state = linear_mod.step(q[..., t, :], k[..., t, :], v[..., t, :], state)
    steps.append(o); states.append(state[0][0, 0].copy())
assert np.allclose(np.stack(steps, axis=-2), out)        # the RNN equals the parallel form
print("recurrent decoding == parallel causal form:", np.abs(np.stack(steps, axis=-2) - out).max())

W = to_numpy(linear.weights(cache))[0, 0]
fig, axes = plt.subplots(1, 5, figsize=(15, 3))
for ax, t in zip(axes[:4], (0, 1, 4, 11)):
    ax.imshow(states[t], cmap="viridis"); ax.set_title(f"state S_{t} (d x dv)"); ax.set_xticks([]); ax.set_yticks([])
axes[4].imshow(W, cmap="viridis"); axes[4].set_title("implied causal W (chunks of 4)")
for b in (4, 8):
    axes[4].axhline(b - 0.5, color="w", lw=0.6); axes[4].axvline(b - 0.5, color="w", lw=0.6)
plt.tight_layout(); plt.show()

# %% [markdown]
# Row i of W only uses keys $j \le i$; within a chunk the triangle is computed explicitly, and everything left of the
# chunk comes from the carried state $S$. Compared with softmax, elu + 1 weights are much flatter (the kernel grows only
# linearly in $q\cdot k$):

# %%
_, fc = full.forward(q, k, v, causal=True)
_, lc = linear.forward(q, k, v, causal=True)
_, pc = performer.forward(q, k, v, causal=True, features=performer_mod.draw_features(rng, 256, d))
plot_patterns([to_numpy(fc.attend.p)[0, 0], to_numpy(performer.weights(pc))[0, 0], to_numpy(linear.weights(lc))[0, 0]],
              ["softmax (causal)", "Performer m=256", "Linear (elu+1)"], weights=True); plt.show()
