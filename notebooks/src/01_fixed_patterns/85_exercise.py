# %% [markdown]
# ## Your turn: block-diagonal attention without the N × N matrix
#
# Write `local` attention with `look_back = 0` yourself — each query attends only inside its own block of $b$
# positions — *without* building an $N \times N$ array: reshape the sequence into $(N/b,\ b,\ d)$ blocks and let one
# batched product do every block, as `blockwise_forward` (printed in the first section) does. Then write the backward.
# `check_kernel` runs the project's checks on your pair: the dense check (equal to `full` attention masked by the
# block-diagonal pattern), the causality probe for `causal=True`, and the gradient check. Assume $b$ divides $N$.
#
# *Hints.* (1) `x.reshape(*x.shape[:-2], n // b, b, x.shape[-1])` makes the blocks; the leading batch and head axes
# ride along. (2) Inside a block the equations are those of notebook 00: scores `(..., G, b, b)`, a row softmax, a
# product with the block's values. (3) The backward is notebook 00's backward per block, reshaped back to
# `(..., N, d)`. (4) `causal=True` is a lower-triangular `(b, b)` mask inside every block — why is that the same as
# $j \le i$ over the whole sequence?

# %%
def my_block_attention(q, k, v, *, block, causal=False):
    """q, k, v (..., N, d) with N a multiple of block -> (out (..., N, d), cache); never builds N x N."""
    return None          # replace with your code


def my_block_attention_backward(dout, cache):
    """dout (..., N, d) -> {"q": dq, "k": dk, "v": dv}."""
    return None          # replace with your code


block_diagonal = lambda b: (lambda n, m: (np.arange(n)[:, None] // b) == (np.arange(m)[None, :] // b))
check_kernel(my_block_attention, my_block_attention_backward, mask=block_diagonal(4), config={"block": 4}, n=12);

# %% [markdown]
# <details><summary>Answer (try first!)</summary>
#
# ```python
# def my_block_attention(q, k, v, *, block, causal=False):
#     *lead, n, d = q.shape
#     g = n // block
#     qb, kb, vb = (x.reshape(*lead, g, block, x.shape[-1]) for x in (q, k, v))   # (..., G, b, d)
#     s = qb @ kb.swapaxes(-1, -2) * d ** -0.5                                    # (..., G, b, b): no N x N
#     if causal:
#         s = np.where(np.tril(np.ones((block, block), bool)), s, -np.inf)
#     p = np.exp(s - s.max(axis=-1, keepdims=True))
#     p /= p.sum(axis=-1, keepdims=True)
#     out = (p @ vb).reshape(*lead, n, v.shape[-1])
#     return out, (qb, kb, vb, p, d ** -0.5)
#
#
# def my_block_attention_backward(dout, cache):
#     qb, kb, vb, p, scale = cache
#     *lead, g, b, _ = qb.shape
#     dob = dout.reshape(*lead, g, b, dout.shape[-1])
#     dvb = p.swapaxes(-1, -2) @ dob
#     dp = dob @ vb.swapaxes(-1, -2)
#     ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
#     flat = lambda x: x.reshape(*lead, g * b, x.shape[-1])
#     return {"q": flat(ds @ kb * scale), "k": flat(ds.swapaxes(-1, -2) @ qb * scale), "v": flat(dvb)}
# ```
#
# Inside block $g$ the query $i = gb + r$ and the key $j = gb + c$ satisfy $j \le i \iff c \le r$: the causal mask is
# the same small triangle in every block. `effattn`'s `local` adds look-back windows and padding for any $N$.
# </details>

# %%
answer = load_answer("01_fixed_patterns/85_exercise.py", "my_block_attention", "my_block_attention_backward")
assert check_kernel(*answer, mask=block_diagonal(4), config={"block": 4}, n=12)
assert check_kernel(*answer, mask=block_diagonal(3), config={"block": 3, "causal": True}, n=12)
