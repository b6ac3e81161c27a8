# %% [markdown]
# ## Your turn: causal linear attention by prefix sums
#
# Write the Linear Transformer's causal attention yourself, as the RNN of section 3 unrolled into prefix sums, with
# $\phi(x) = \mathrm{elu}(x) + 1$:
#
# $$S_i = \sum_{j \le i} \phi(k_j)\, v_j^\top, \qquad z_i = \sum_{j \le i} \phi(k_j), \qquad
#   \mathrm{out}_i = \frac{\phi(q_i)^\top S_i}{\phi(q_i)^\top z_i + \epsilon},\quad \epsilon = 10^{-6}.$$
#
# No $N \times N$ matrix: the prefix sums carry everything a query needs from the past. `check_kernel` runs the
# project's checks on your function:
#
# * the **dense check**: your output equals the quadratic masked form
#   $\mathrm{out} = \big(A \circ \mathrm{tril}\big)\,V \,/\, \big((A \circ \mathrm{tril})\,\mathbf 1 + \epsilon\big)$ with
#   $A = \phi(Q)\phi(K)^\top$ — `linear.reference(q, k, v, causal=True)`, the package's explicit $O(N^2)$ oracle;
# * the **causality probe**: changing the inputs from position $t$ on must leave the outputs before $t$ *bit for bit*
#   unchanged.
#
# *Hints.* (1) $\mathrm{elu}(x) + 1$ is $x + 1$ for $x > 0$ and $e^x$ otherwise; `np.exp(np.minimum(x, 0))` avoids
# overflow warnings in the branch that `np.where` throws away. (2) The outer products $\phi(k_j) v_j^\top$ for every $j$
# are `fk[..., :, :, None] * v[..., :, None, :]`, shape `(..., N, d, dv)`; `np.cumsum(..., axis=-3)` turns them into
# all the $S_i$ at once (and `np.cumsum(fk, axis=-2)` into the $z_i$). (3) $\phi(q_i)^\top S_i$ for every $i$ is a sum
# over the $d$ axis. (4) A Python loop over $i$ with a running $(S, z)$ is the same computation — the RNN — and passes
# the same checks. (5) Why is a cumulative sum causal bit for bit, while "total sum minus the suffix" is not?
#
# (The `causal` keyword is there because `check_kernel` passes `causal=True` to turn on the probe; it is always True
# here.)

# %%
def my_causal_linear_attention(q, k, v, *, causal=True, eps=1e-6):
    """q, k (..., N, d), v (..., N, dv) -> out (..., N, dv): causal linear attention, phi = elu + 1."""
    return None          # replace with your code


check_kernel(my_causal_linear_attention, reference=linear.reference, config={"causal": True}, n=10);

# %% [markdown]
# <details><summary>Answer (try first!)</summary>
#
# ```python
# def my_causal_linear_attention(q, k, v, *, causal=True, eps=1e-6):
#     phi = lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))    # elu(x) + 1
#     fq, fk = phi(q), phi(k)                                                  # (..., N, d)
#     S = np.cumsum(fk[..., :, :, None] * v[..., :, None, :], axis=-3)         # (..., N, d, dv): S_i
#     z = np.cumsum(fk, axis=-2)                                               # (..., N, d): z_i
#     num = (fq[..., :, :, None] * S).sum(axis=-2)                             # (..., N, dv): phi(q_i)^T S_i
#     den = (fq * z).sum(axis=-1, keepdims=True)                               # (..., N, 1): phi(q_i)^T z_i
#     return num / (den + eps)
# ```
#
# A cumulative sum adds the terms from the left, so $S_i$ is computed from $j \le i$ only, with the same roundings
# whatever comes later; "total minus suffix" would subtract later terms and let them leak in through rounding. This
# answer keeps all $N$ states, $O(N d\, d_v)$ memory; the package's chunked form (section 3) keeps one state per chunk
# of $C$ positions and does the inside of a chunk as a $C \times C$ triangle: $O(N C + (N/C)\, d\, d_v)$.
# </details>
#
# The worked answer, through the same checks, then against the package's chunked kernel itself (`linear.forward` with
# chunks of 3 and of 16 positions) and its RNN (`step`, one token at a time):

# %%
ans_lin = load_answer("06_kernels/85_exercise.py", "my_causal_linear_attention")
assert check_kernel(ans_lin, reference=linear.reference, config={"causal": True}, n=10)
ex_q, ex_k, ex_v = (np.random.default_rng(12).standard_normal((2, 3, 17, 4)) for _ in range(3))
ex_out = ans_lin(ex_q, ex_k, ex_v)
for ch in (3, 16):
    err = np.abs(ex_out - linear.forward(ex_q, ex_k, ex_v, causal=True, chunk=ch)[0]).max()
    print(f"max |answer - linear.forward(chunk={ch})| = {err:.1e}")
    assert err < 1e-12
ex_state = linear_mod.init_state(lead=(2, 3), d=4, dv=4)
ex_steps = []
for t in range(17):
    o, ex_state = linear_mod.step(ex_q[..., t, :], ex_k[..., t, :], ex_v[..., t, :], ex_state)
    ex_steps.append(o)
print(f"max |answer - step by step| = {np.abs(ex_out - np.stack(ex_steps, axis=-2)).max():.1e}")
assert np.allclose(ex_out, np.stack(ex_steps, axis=-2), rtol=0, atol=1e-12)
