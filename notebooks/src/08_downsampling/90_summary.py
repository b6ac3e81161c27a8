# %% [markdown]
# ## Summary
#
# | layer | output | cost | decodable | what shrinks |
# |---|---|---|---|---|
# | Funnel (pooled-query attention) | N' = 1 + ⌈(N − 1)/s⌉ rows | O(N' N) here, O(N'^2) in the stage after | no (a pooled row holds later tokens) | the sequence, stage by stage |
# | Perceiver | m latents | O(m N) once, O(m^2) per layer | — | the sequence, to m learned summaries |
# | Perceiver AR | the last m positions | the same | yes: latent r reads j ≤ N − m + r | the query rows |
# | Nyströmformer (05), ISAB (04) | N rows | O(N m) | no | the keys, to m landmarks / inducing points |
#
# * The Funnel's pooling layer is itself quadratic; its saving is that every later layer runs at N/s, N/s², ...
#   (section 3: a 3-stage encoder against a plain one of the same depth).
# * The Perceiver's only contact with the input is one cross-attention: time and memory linear in N.
# * Positions: this Funnel uses absolute positions at the input instead of the paper's relative attention (a
#   documented simplification; `effattn/layers/funnel.py`).
#
# **Exercises.**
# 1. Section 1: train `--arch funnel --funnel-pool max` and compare with mean pooling (the paper's Table 8).
# 2. Section 2: how do the cross-attention maps change with 4 latents instead of 16? With `--latent-layers 0`?
# 3. Section 3: at which N does the 3-stage Funnel reach 1.7x the plain encoder's speed at d_model 64?
#    *Hint: `downsampling.time_funnel(n, d_model=64)`.*
# 4. Perceiver AR as a language model: the latents are the last m positions, so a forward predicts m tokens. Write a
#    decoder that slides it over a sequence and compare its loss with a causal `full` decoder.

# %%
print(f"notebook ran in {time.time() - T0:.0f} s")
