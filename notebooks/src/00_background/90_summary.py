# %% [markdown]
# ## 6 · Summary
#
# * Attention is three matrix products and a row softmax; masks give some keys exactly zero weight.
# * The backward pass needs $P$ (kept from the forward) and one dot product per row; everything is checked against finite
#   differences.
# * Time and memory grow as $N^2$ (measured above: both exponents near 2): the score matrix is the bottleneck that the
#   rest of the survey removes — with fixed patterns (notebook 01), combinations of patterns with global tokens (02),
#   learnable patterns (03), neural memory (04), low rank (05) and kernels (06),
#   or by processing a long sequence in segments connected by a memory (recurrence, 07),
#   by attending over a shorter, downsampled sequence (downsampling, 08),
#   and by letting each token use only a few of many parameters (sparse models, 09); `10_techniques` covers the
#   efficiency techniques that change how a model runs rather than what it computes.
#
# ### Exercises
# 1. Pass `scale=1.0` instead of $1/\sqrt d$ and look at how peaked the rows of $P$ become for $d = 64$. Why did
#    Vaswani et al. scale?
#    <details><summary>Hint</summary>For random q, k with unit-variance entries, q·k has variance d: the logits spread
#    as √d, and the softmax of logits that far apart is nearly one-hot (its gradient nearly zero).</details>
# 2. Mask every key of one row. What do `out` and the gradients of that row look like, and why is that the right answer?
#    <details><summary>Hint</summary>`attend_forward` (printed in section 1) sets `rz = 0` when a row sum is 0: the row's
#    output is 0 and no gradient flows through it — a query with nothing to look at contributes nothing.</details>
# 3. Use `effattn.tools.bench.measure` at N = 4096. How many N×N float32 matrices does the peak hold? Find them in
#    `effattn/nn/sparse.py` (`attend_forward` and `attend_backward` above).
#    <details><summary>Hint</summary>Count the score-sized arrays alive at once: the scores overwritten by E in the
#    forward, and dP overwritten by dS in the backward.</details>
# 4. With $D = 512$, at which $N$ does attention cost as much as the rest of the layer?
#    <details><summary>Answer</summary>$4ND = 24D^2 \Rightarrow N = 6D = 3072$.</details>
