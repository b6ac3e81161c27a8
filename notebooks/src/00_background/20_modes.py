# %% [markdown]
# ## 2 · Three modes, three masks
#
# The survey (Section 2, *Background on Transformers*, its subsection *Transformer Mode*) distinguishes **encoder-only** models (BERT: every token sees every token), **decoder-only**
# models (GPT: token $i$ sees only $j \le i$, so the model can generate left to right) and **encoder-decoder** models (T5:
# the decoder additionally *cross-attends* from its $N$ positions to the encoder's $M$ outputs). Whether an efficient
# mechanism can be causal decides whether it can be used in a decoder — several cannot (the registry's `causal` column).

# %%
n, m = 12, 16
ones = np.ones((n, n), bool)
km = np.ones(n, bool); km[-3:] = False  # the last three tokens are padding
fig = plot_patterns([ones, np.tril(ones), np.ones((n, m), bool), ones & km[None, :]],
                    ["encoder: bidirectional", "decoder: causal", f"cross: N={n}, M={m}", "key_mask: padding"],
                    suptitle="Who may attend to whom (blue = allowed)")
plt.show()

# %%
q1 = rng.standard_normal((1, 1, n, d)); k1 = rng.standard_normal((1, 1, n, d)); v1 = rng.standard_normal((1, 1, n, d))
_, c_causal = full.forward(q1, k1, v1, causal=True, key_mask=km)
W = full.weights(c_causal)[0, 0]
assert np.all(W[np.triu_indices(n, 1)] == 0) and np.all(W[:, ~km] == 0)
plot_pattern(W, title="causal + key_mask: the weights P")
plt.show()
