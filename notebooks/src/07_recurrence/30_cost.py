# %% [markdown]
# ## 4 · Cost
#
# ### Per segment, against the memory length
#
# One causal segment of N = 128 tokens (one head of size 64, float32, forward + backward, CPU time on one thread,
# peak memory by tracemalloc) with a memory of L = 0 (the baseline), 128, ..., 1024 states
# (`recurrence.time_segment`). A segment costs O(N (L + N) D) = a + b L: a fixed part (the segment's own N² scores,
# its projections) plus a part linear in L. The plain exponent in L is therefore below 1 at these sizes; against the
# number of keys M = L + N it is closer to 1 (the fixed per-call work keeps it below), and the memory the keys *add*
# to the baseline grows with exponent 1. Asserted in wide ranges: the time exponent in M (a busy machine only adds
# time, so an exponent out of range is measured once more, each point keeping its smaller time) and both memory
# exponents (memory is deterministic). The added *time* is a difference of two noisy times: printed, not asserted.

# %%
rows, ex = recurrence.time_segment(128, (128, 256, 512, 1024), repeats=5,
                                   expect={"time_vs_m": (0.5, 1.4), "added_memory": (0.7, 1.2),
                                           "memory_vs_m": (0.6, 1.2)})
print(recurrence.format_segment_table(rows, ex, 128))

# %% [markdown]
# ### Segment by segment against everything at once
#
# T = 8 segments × N = 128 = 1024 tokens, memory L = 128 (`recurrence.segments_vs_full`): the segments one after
# another (forward + backward each, the memory handed on with `next_memory`), against the registered kernel `full`
# over the T tokens, causal (attention alone: no projections, and its causal path skips the tiles above the
# diagonal), and against the same layer with no memory over the T tokens at once, causal (projections, relative
# positions and LayerNorm included: like for like, with the whole past visible).

# %%
r = recurrence.segments_vs_full(128, 8, 128, repeats=3)
print(recurrence.format_full_table(r))
assert r["full_over_xl_memory"] > 2 and r["at_once_over_xl_memory"] > 4

# %% [markdown]
# Memory is where the segments win at once: one segment's N × (L + N) scores are alive at a time, against T × T
# (and, for the layer at once, its (T, 2T − 1) positional product). Time needs longer sequences: the segments score
# T (L + N) pairs against about T² / 2 for causal `full`, so their advantage grows as T / (2 (L + N)), and each pair
# costs the layer more than the bare kernel (the positional product is about as big again as the scores, and the
# projections and LayerNorm come on top). At N = 512, 16 segments, L = 512 (T = 8192;
# `python -m effattn.tools.recurrence`), two runs on a shared two-core machine gave: the segments 0.61–0.66 s and
# 12 MiB; `full` 1.5–1.6 s and 162 MiB (2.3–2.6× the time, 13× the memory); the layer at once 9.1–9.4 s and 1.3 GiB
# (14–15× the time, 107× the memory). Against the bare causal kernel the segments are 8× cheaper in memory but not
# yet in time at this T (exercise 3). Per segment at N = 512, L = 512 ... 4096, the memory the keys add grew with
# exponent 0.99 in L, the time they add with 0.7–1.0 (the spread of a shared machine).
#
# The Compressive Transformer's segment is Transformer-XL's over M = L_c + L + N keys — the same cost with L_c more
# keys, each standing for c states — plus the state update: the convolution of the k rows that fall out (k / c
# products of a (c D)-vector with a (c D, D) matrix, O(k D²)) and, in training, the reconstruction loss (two more
# attentions of the N queries, over the k old rows and over their k / c compressed rows, O(N k D)). For a reach of
# L + c L_c states it scores N (L_c + L + N) pairs, where Transformer-XL with that reach would score
# N (c L_c + L + N).
