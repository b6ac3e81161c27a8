# %% [markdown]
# ## Summary
#
# * `effattn.models.attention.MultiHeadAttention` wraps any kernel: its learnable parameters come from the kernel's own
#   `setup` (created once for `max_len`), its configuration is re-made for each length with the same random draws.
# * `effattn.models` stacks pre-LN blocks into an encoder, a decoder and an encoder-decoder; the backward is the
#   modules' backwards chained in reverse, checked against finite differences for every parameter.
# * The mechanism decides what a model *can* learn: recalling a token 19 positions back is easy for full attention
#   and impossible for a local window that reaches 7 positions back, at any number of steps.
# * Not only the attention is swappable: `switch`, the Switch / GShard mixture-of-experts feed-forward
#   (`effattn/layers/switch.py`, a registry layer with its auxiliary losses), passes the same contract; the
#   notebook of sparse models (09) that trains it inside a block is still to come.
# * `python -m effattn train` trains any of them with Adam, warmup and decay, gradient clipping; same seed, same
#   numbers; a checkpoint resumes bit for bit.
# * Every causal kernel decodes token by token with a state that holds only what its pattern can still reach;
#   `generate` uses it, and `python -m effattn bench --decode` measures it.
#
# **Exercises.**
# 1. Recall task: train `local` with `block=10, look_back=1` (19 positions back in one layer) or with three layers of
#    `block=4`. Predict the outcome from the receptive field before you run it.
#    <details><summary>Hint</summary>One layer with b = 10 sees up to 2b - 1 = 19 positions back — just enough for
#    most queries, but not for the first query of a block… count which queries reach t - 19.</details>
# 2. Train `listops` with `full`, `linformer` and `performer` (`python -m effattn train --task listops --attention ...`):
#    which gets closest to full attention at equal steps?
# 3. Replace the recall decoder's `local` attention by `sparse_strided` with `stride=5`: can it reach 19 positions back
#    in two layers? Check with `receptive_field` first.
#    <details><summary>Hint</summary>A(1) covers 5 back, A(2) every 5th position back; two layers compose them.</details>
# 4. Give the copy task a sequence longer than the positions the model has (`--seq-len 40 --max-len 20`): what error do
#    you get, and why must it come before any work?
# 5. Why can the `reverse` task not be learned with cross-attention removed?
#    <details><summary>Answer</summary>The decoder's input is the target shifted right, which says nothing about the
#    source; only cross-attention carries the source into the decoder.</details>

# %%
print(f"notebook ran in {time.time() - T0:.0f} s")
