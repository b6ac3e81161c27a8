# %% [markdown]
# ## Your turn: a Switch layer with capacity
#
# Write the forward of a top-1 Switch layer: router probabilities, each token's best expert, its gate, the
# capacity $C = \lceil \text{cf} \cdot T / E \rceil$ with the tokens kept **in token order** (an expert takes the first
# C tokens that choose it), and $y_t = g_t\, h_{e_t}(x_t)$ for kept tokens, 0 for dropped ones. x is (T, D) here.
# `check` compares with the registered `switch` (k = 1, no auxiliary losses).
#
# *Hints.* (1) `np.argmax(p, axis=-1)` gives $e_t$. (2) The place of token t in its expert's queue is the number of
# earlier tokens with the same expert: a cumulative sum over a one-hot (T, E) matrix. (3) Loop over the E experts and
# apply each one's FFN to its kept rows at once.

# %%
def my_switch(x, Wr, W1, b1, W2, b2, *, capacity_factor):
    """x (T, D) -> y (T, D): top-1 routing with capacity, relu experts, no residual."""
    return None          # replace with your code


ex_rng = np.random.default_rng(5)
ex_inputs = {"x": ex_rng.standard_normal((24, 8)), **switch.init_params(ex_rng, 8, 12, 4)}
ref = lambda **kw: spec.forward(kw.pop("x")[None], k=1, aux_weight=0.0, z_weight=0.0, **kw)[0][0]
check(my_switch, None, ex_inputs, config={"capacity_factor": 1.0}, reference=ref, tol=1e-12);

# %% [markdown]
# <details><summary>Answer (try first!)</summary>
#
# ```python
# def my_switch(x, Wr, W1, b1, W2, b2, *, capacity_factor):
#     T, E = x.shape[0], Wr.shape[1]
#     logits = x @ Wr
#     p = np.exp(logits - logits.max(axis=-1, keepdims=True))
#     p /= p.sum(axis=-1, keepdims=True)
#     e = np.argmax(p, axis=-1)                                   # each token's expert
#     gate = p[np.arange(T), e]
#     C = int(np.ceil(capacity_factor * T / E))
#     onehot = e[:, None] == np.arange(E)
#     place = (np.cumsum(onehot, axis=0) - 1)[np.arange(T), e]    # earlier tokens with the same expert
#     keep = place < C
#     y = np.zeros_like(x)
#     for i in range(E):
#         rows = np.flatnonzero((e == i) & keep)
#         h = np.maximum(x[rows] @ W1[i] + b1[i], 0) @ W2[i] + b2[i]
#         y[rows] = gate[rows, None] * h
#     return y
# ```
#
# The dropped tokens get 0 here and pass through the residual in a block. `effattn/layers/switch.py` does the same
# with one stable sort instead of the loop's masks, adds top-2 (second choices queue after all first choices),
# padding, the auxiliary losses and the backward.
# </details>

# %%
answer = load_answer("09_sparse_models/80_exercise.py", "my_switch")
assert check(answer, None, ex_inputs, config={"capacity_factor": 1.0}, reference=ref, tol=1e-12)
