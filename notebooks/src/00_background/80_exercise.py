# %% [markdown]
# ## 5 · Your turn: write masked attention and its backward
#
# In the spirit of CS231n's assignments: write the forward and the backward pass of masked softmax attention in plain
# NumPy, from the equations of sections 1 and 3, and let the project's own checks judge them.
# `effattn.tools.teach.check_kernel` draws random float64 inputs and runs
#
# * the **dense check**: your output equals effattn's `full` attention masked by the same pattern;
# * the **gradient check**: your `backward` against central finite differences (`effattn.gradcheck`), for q, k and v.
#
# Replace the two `return None` lines below with your code (about eight lines each), then run the check cell.
#
# *Hints.* (1) Scores: `s = q @ k.swapaxes(-1, -2) * scale`; put `-np.inf` where the mask is False *before* taking the
# row maximum. (2) Keep in the cache what the backward needs: q, k, v, P and the scale. (3) In the backward,
# $dV = P^\top dO$, $dP = dO\,V^\top$, $dS = P \circ (dP - \mathrm{rowsum}(P \circ dP))$, $dQ = \text{scale}\; dS\,K$,
# $dK = \text{scale}\; dS^\top Q$. (4) `swapaxes(-1, -2)` transposes the last two axes whatever the leading batch and
# head axes are.

# %%
def my_attention_forward(q, k, v, *, mask=None):
    """q (..., N, d), k (..., M, d), v (..., M, dv), mask (N, M) bool or None -> (out (..., N, dv), cache)."""
    return None          # replace with your code


def my_attention_backward(dout, cache):
    """dout (..., N, dv), the forward's cache -> {"q": dq, "k": dk, "v": dv}."""
    return None          # replace with your code


band = lambda n, m: np.abs(np.arange(n)[:, None] - np.arange(m)[None, :]) <= 2     # a banded pattern, (n, m)
check_kernel(my_attention_forward, my_attention_backward, mask=band, config={"mask": band(7, 7)});

# %% [markdown]
# <details><summary>Answer (try first!)</summary>
#
# ```python
# def my_attention_forward(q, k, v, *, mask=None):
#     scale = q.shape[-1] ** -0.5
#     s = q @ k.swapaxes(-1, -2) * scale                  # (..., N, M)
#     if mask is not None:
#         s = np.where(mask, s, -np.inf)                  # masked: exactly zero weight
#     s = s - s.max(axis=-1, keepdims=True)               # stable softmax
#     p = np.exp(s)
#     p /= p.sum(axis=-1, keepdims=True)
#     return p @ v, (q, k, v, p, scale)
#
#
# def my_attention_backward(dout, cache):
#     q, k, v, p, scale = cache
#     dv = p.swapaxes(-1, -2) @ dout                      # dV = P^T dO
#     dp = dout @ v.swapaxes(-1, -2)                      # dP = dO V^T
#     ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
#     return {"q": ds @ k * scale, "k": ds.swapaxes(-1, -2) @ q * scale, "v": dv}
# ```
#
# A row whose mask is all False would give `0/0` here; `effattn.nn.sparse.attend_forward` returns zeros for such a row
# instead (exercise 2 below).
# </details>
#
# The worked answer above, run through the same checks (this is what the notebook asserts):

# %%
answer = load_answer("00_background/80_exercise.py", "my_attention_forward", "my_attention_backward")
assert check_kernel(*answer, mask=band, config={"mask": band(7, 7)})
assert check_kernel(*answer, mask=np.tril(np.ones((7, 7), bool)), config={"mask": np.tril(np.ones((7, 7), bool))})
