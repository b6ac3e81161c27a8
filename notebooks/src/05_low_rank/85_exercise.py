# %% [markdown]
# ## Your turn: Linformer's projected attention, forward and backward
#
# Write Linformer's head yourself for given projections $E, F \in \mathbb{R}^{k \times N}$ (one pair shared by every
# batch element and head, the registry's default `sharing="headwise"`):
#
# $$\overline{\text{head}} = \mathrm{softmax}\!\Big(\frac{Q (E K)^\top}{\sqrt d}\Big)\,(F V),$$
#
# and its backward, including the gradients of $E$ and $F$ — the parameters that training learns. `check_kernel` runs
# the project's checks on your pair:
#
# * the **dense check**: your output equals `effattn.get("linformer").forward(q, k, v, E=E, F=F)` with the same $E, F$;
# * the **gradient check**: your `backward` against central finite differences, for q, k, v, E and F.
#
# *Hints.* (1) `E @ k` works for any leading batch and head axes: $(k, N) @ (\ldots, N, d) \to (\ldots, k, d)$.
# (2) After the projection this is plain softmax attention of $N$ queries over $k$ keys — its backward is notebook 00's:
# $dV_p = \bar P^\top dO$, $dP = dO\,V_p^\top$, $dS = \bar P \circ (dP - \mathrm{rowsum}(\bar P \circ dP))$,
# $dQ = \text{scale}\; dS\,K_p$, $dK_p = \text{scale}\; dS^\top Q$. (3) Then through the projections: $K_p = EK$ gives
# $dK = E^\top dK_p$ and $dE = dK_p K^\top$, **summed over the batch and head axes** (E is shared); likewise $F$.

# %%
def my_linformer(q, k, v, *, E, F):
    """q, k (..., N, d), v (..., N, dv), E, F (k, N) -> (out (..., N, dv), cache)."""
    return None          # replace with your code


def my_linformer_backward(dout, cache):
    """dout (..., N, dv) -> {"q": dq, "k": dk, "v": dv, "E": dE, "F": dF}."""
    return None          # replace with your code


def linformer_reference(q, k, v, *, E, F):
    """The oracle: the package's Linformer with the same E and F."""
    return linformer.forward(q, k, v, E=E, F=F)[0]


ex_rng = np.random.default_rng(9)
ex_E, ex_F = ex_rng.standard_normal((3, 9)) / 3, ex_rng.standard_normal((3, 9)) / 3     # k = 3 slots, N = 9
check_kernel(my_linformer, my_linformer_backward, reference=linformer_reference, params={"E": ex_E, "F": ex_F}, n=9);

# %% [markdown]
# <details><summary>Answer (try first!)</summary>
#
# ```python
# def my_linformer(q, k, v, *, E, F):
#     kp, vp = E @ k, F @ v                                  # (..., k, d), (..., k, dv): the projected keys, values
#     scale = q.shape[-1] ** -0.5
#     s = q @ kp.swapaxes(-1, -2) * scale                    # (..., N, k): never N x N
#     p = np.exp(s - s.max(axis=-1, keepdims=True))
#     p /= p.sum(axis=-1, keepdims=True)                     # P_bar
#     return p @ vp, (q, k, v, kp, vp, p, E, F, scale)
#
#
# def my_linformer_backward(dout, cache):
#     q, k, v, kp, vp, p, E, F, scale = cache
#     dvp = p.swapaxes(-1, -2) @ dout                        # (..., k, dv)
#     dp = dout @ vp.swapaxes(-1, -2)                        # (..., N, k)
#     ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
#     dq = ds @ kp * scale
#     dkp = ds.swapaxes(-1, -2) @ q * scale                  # (..., k, d)
#     shared = lambda g: g.reshape((-1,) + E.shape).sum(axis=0)   # E, F serve every batch element and head
#     return {"q": dq, "k": E.T @ dkp, "v": F.T @ dvp,
#             "E": shared(dkp @ k.swapaxes(-1, -2)), "F": shared(dvp @ v.swapaxes(-1, -2))}
# ```
#
# `effattn`'s `linformer` adds the other sharing modes (per-head E, F; E = F), inputs shorter than $N_{max}$ (the first
# N columns of E), a key mask that zeroes masked keys and values before the projection, and a gradient of E that never
# forms the `(B, H, k, N)` intermediate `dkp @ k^T` (the batch and head axes folded into one product).
# </details>
#
# The worked answer, through the same checks, then with a shorter key length ($M = 6$ keys for 9 queries: E and F are
# then $(k, M)$):

# %%
ans_lin = load_answer("05_low_rank/85_exercise.py", "my_linformer", "my_linformer_backward")
assert check_kernel(*ans_lin, reference=linformer_reference, params={"E": ex_E, "F": ex_F}, n=9)
assert check_kernel(*ans_lin, reference=linformer_reference, params={"E": ex_E[:, :6], "F": ex_F[:, :6]}, n=9, m=6,
                    dv=5, seed=3, verbose=False)
