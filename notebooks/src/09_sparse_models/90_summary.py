# %% [markdown]
# ## Summary
#
# | layer | parameters | work per token | exact? | decodable |
# |---|---|---|---|---|
# | dense FFN | 2 D F | 2 D F | — | yes |
# | Switch (k = 1) / GShard (k = 2) | E × 2 D F + D E | D E + k · 2 D F | a different model; tokens over capacity dropped | only without dropping (`causal=True`) |
# | PKM | K D + query net + 2 H √K dq/2 | D H dq + H (√K dq + k² + k D) | the product search finds the exact top-k of the K keys | yes (per token) |
#
# * Conditional computation buys parameters, not speed: a Switch layer costs about one FFN per token (measured
#   above), PKM reads k rows of a huge table.
# * The router needs its auxiliary loss: without it the load drifts away from uniform (section 2), and capacity
#   turns imbalance into dropped tokens (section 3).
# * Capacity is a batch-level constraint: it couples the tokens of a call, which leaks the future in a decoder
#   (section 4).
#
# **Exercises.**
# 1. Section 3: with the trained routers of section 2 (`train_model(...)["model"]`), measure the dropped share at
#    capacity 1.0 with and without the balancing loss. *Hint: `model.aux()` after a forward.*
# 2. Section 4 with k = 2 and a single sequence: find a later token whose first choice drops an earlier token's
#    second choice. *Hint: capacity 0.5 makes room scarce.*
# 3. Section 5: count how often the top-k of the product keys is *not* within the k × k candidates when each half
#    keeps only k/2 sub-keys. *Hint: compare with `pkm.loop`.*
# 4. Train `python -m effattn train --task lm --ffn pkm --pkm-keys 4096 --steps 300` and compare the loss and
#    `memory_usage` with `--ffn dense` and `--ffn switch`.

# %%
print(f"notebook ran in {time.time() - T0:.0f} s")
