# %% [markdown]
# ## Summary
#
# * `effattn.models.attention.MultiHeadAttention` wraps any kernel: its learnable parameters come from the kernel's own
#   `setup` (created once for `max_len`), its configuration is re-made for each length with the same random draws.
# * `effattn.models` stacks pre-LN blocks into an encoder, a decoder and an encoder-decoder; the backward is the
#   modules' backwards chained in reverse, checked against finite differences for every parameter.
# * `python -m effattn train` trains any of them with Adam, warmup and decay, gradient clipping; same seed, same
#   numbers; a checkpoint resumes bit for bit.
# * Every causal kernel decodes token by token with a state that holds only what its pattern can still reach;
#   `generate` uses it, and `python -m effattn bench --decode` measures it.
#
# **Exercises.**
# 1. Train `listops` with `full`, `linformer` and `performer` (`python -m effattn train --task listops --attention ...`):
#    which gets closest to full attention at equal steps?
# 2. Replace the decoder's `local` attention by `sparse_strided` and compare the learned maps.
# 3. Give the copy task a sequence longer than the positions the model has (`--seq-len 40 --max-len 20`): what error do
#    you get, and why must it come before any work?
# 4. Why can the `reverse` task not be learned with cross-attention removed?

# %%
print(f"notebook ran in {time.time() - T0:.0f} s")
