# %% [markdown]
# ## Summary
#
# | | Transformer-XL (`transformer_xl`) | Compressive Transformer (`compressive`) |
# |---|---|---|
# | a segment of N attends over | [memory of L states; segment], causal or not | [compressed memory of L_c rows; memory of L states; segment] |
# | state after a segment | the last n_m rows of [memory; segment] | the same memory; the rows that fall out compressed c : 1 and appended, the last n_cm rows kept |
# | reach of one layer | L states | L + c L_c states, the older ones c to a row |
# | score | (q_i + u) · k_j + (q_i + v) · r_{L+i−j}: content, position, two global biases | the same over L_c + L + N keys (a compressed row counts as one position) |
# | positions | relative, sinusoid R_t of the distance (no absolute position collides across segments) | the same |
# | positional term | one (N, M + N − 1) product and the relative shift (a view): O(N M d), no (N, M, d) tensor | the same, M = L_c + L + N |
# | cost per segment | O(N (L + N) D) time, O(h N (L + N)) memory: linear in L (section 4) | O(N (L_c + L + N) D) + the compression O(k D²) + the reconstruction loss O(N k D) |
# | gradient | none into the memory (SG); W_k, W_v learn from the memory's rows | none into either memory; the task's loss never reaches f_c; the reconstruction loss trains only W_c, b_c |
# | compression f_c | — | learned convolution (kernel = stride = c), max or mean pooling; masks follow the rows |
# | context | grows with depth: about l L tokens through l layers (L a multiple of N) | the same, from L + c L_c per layer |
# | checked against | `loop` (every pair written out), `one_pass` (the whole sequence with the segments' pattern), the official `RelPartialLearnableMultiHeadAttn` (tests/parity) | `loop`, `one_pass`, c = 1 with mean = Transformer-XL with memory n_m + n_cm, lucidrains' `compressive-transformer-pytorch` (tests/parity) |
#
# * Recurrence does not make attention within a segment cheaper — it is full attention over the memory and the
#   segment. It bounds what one step holds: the cost of a segment does not depend on how long the text before it was.
# * The memory is a constant: training backpropagates through one segment, yet through the stack of layers a token
#   reads much further back than its memory.
# * Relative positions are what make this possible: the same distance means the same thing in every segment.
# * The compressed memory buys reach with detail: in section 5 it lifts one layer from 0.28 to 0.55 where the answers
#   lie two segments back, but a memory as long as the distance gets 1.0. Its compression is trained by the
#   attention-reconstruction loss alone, and learns what the attention needs — the mean on structureless states,
#   the salient member of a pair when there is one (section 3).
# * A longer memory at evaluation only helps a model whose rule does not depend on where its training memory ended
#   (section 5: "15 back" transfers, "the farthest key" does not).
#
# **What is not here.** Of the Compressive Transformer paper: its other compression functions — the most-used
# (keeping the memories that received the most attention) and the dilated convolution — and its auto-encoding loss
# (a deconvolution that reconstructs the old memories themselves from their compressed form), which the paper
# compares with the attention-reconstruction loss used here. Here a compressed row counts as one position in the
# relative distances, not as the c positions it stands for. Relative positions beyond Transformer-XL's sinusoid
# scheme (learned relative biases, rotary embeddings); Transformer-XL's adaptive softmax and embeddings; and
# recurrence across batches at evaluation (each held-out sequence here starts from an empty memory).
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
# 3. Section 4: how many segments s of N = 512 (L = 512) must a sequence have before running them one after another
#    is 8× faster than causal `full` over all s · 512 tokens at once? *Hint: the segments' time grows as s, full's as
#    s²; time `recurrence.segments_vs_full(512, s, 512)` for two small values of s and extrapolate (16 segments gave
#    about 2.4×).*
# 4. Section 3: with mean compression and c = 2, what is the reconstruction loss when every group of old states
#    holds two copies of one state? And with c = 1, whatever the states?
#    <details><summary>Hint</summary>Zero both times. The mean of two equal rows is that row, and a softmax over a key
#    written twice gives each copy half the weight one copy would get alone, with the same value: the same output.
#    With c = 1 the mean is the identity.</details>
# 5. Section 5: train the compressive model of the recall task with `compress_rate=4` and `cmem_len=4` (the same
#    reach of 16 states in half the rows). Where should its accuracy land, and why?
#    <details><summary>Hint</summary>Four symbols share one row now: above the memory-8 model's 0.28 if the model
#    reads something out of the groups, below the 0.55 of c = 2 since less of each group survives. One run, 300 steps,
#    gave 0.43: `train_model("recall", arch="xl", seq_len=32, segment=8, mem_len=8, cmem_len=4,
#    compress_rate=4)`.</details>

# %%
print(f"notebook ran in {time.time() - T0:.0f} s")
