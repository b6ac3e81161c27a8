# %% [markdown]
# ## Summary
#
# | | Transformer-XL (`transformer_xl`) |
# |---|---|
# | a segment of N attends over | [memory of L states; segment], causal or not |
# | score | (q_i + u) · k_j + (q_i + v) · r_{L+i−j}: content, position, two global biases |
# | positions | relative, sinusoid R_t of the distance (no absolute position collides across segments) |
# | positional term | one (N, M + N − 1) product and the relative shift (a view): O(N M d), no (N, M, d) tensor |
# | cost per segment | O(N (L + N) D) time, O(h N (L + N)) memory: linear in L (section 3) |
# | gradient | none into the memory (SG); W_k, W_v learn from the memory's rows |
# | context | grows with depth: about l L tokens through l layers (L a multiple of N) |
# | checked against | `loop` (every pair written out), `one_pass` (the whole sequence with the segments' pattern), the official `RelPartialLearnableMultiHeadAttn` (tests/parity) |
#
# * Recurrence does not make attention within a segment cheaper — it is full attention over L + N keys. It bounds
#   what one step holds: the cost of a segment does not depend on how long the text before it was.
# * The memory is a constant: training backpropagates through one segment, yet through the stack of layers a token
#   reads much further back than its memory.
# * Relative positions are what make this possible: the same distance means the same thing in every segment.
#
# **Also here:** the Compressive Transformer (`compressive`, section 2), which compresses the states leaving the
# memory into a second, coarser memory instead of dropping them (conv, max, mean; the paper's most-used and
# deconvolution compressions are not here). **Not here:** Transformer-XL's adaptive softmax and embeddings.
#
# **Exercises.**
# 1. Section 1: with `mem_len` = 2N, how many rows does the memory hold after the first segment, and after the
#    second? Why does `one_pass` still agree?
#    <details><summary>Hint</summary>`next_memory` keeps the last `mem_len` rows of [memory; segment]: N after the
#    first segment (there are no more), 2N from the second on; `segment_pattern` starts at s N − mem_len, clipped at
#    0.</details>
# 2. Section 2: set u = v = 0. Which of the four terms vanish, and what do the weights of one query then depend on?
#    <details><summary>Hint</summary>(c) and (d): only (a) content and (b) this query's own view of distance
#    remain; with W_R = 0 too, the layer is content-only attention, and the segments would have no notion of
#    order.</details>
# 3. Section 3: how many segments s of N = 512 (L = 512) must a sequence have before running them one after another
#    is 8× faster than causal `full` over all s · 512 tokens at once? *Hint: the segments' time grows as s, full's as
#    s²; time `recurrence.segments_vs_full(512, s, 512)` for two small values of s and extrapolate (16 segments gave
#    about 2.4×).*

# %%
print(f"notebook ran in {time.time() - T0:.0f} s")
