# %% [markdown]
# ## 5 · Summary
#
# * Attention is three matrix products and a row softmax; masks give some keys exactly zero weight.
# * The backward pass needs $P$ (kept from the forward) and one dot product per row; everything is checked against finite
#   differences.
# * Time and memory grow as $N^2$: the score matrix is the bottleneck that the rest of the survey removes with fixed or
#   learned sparsity (notebooks 01–03), memory tokens (04), low rank (05), kernels (06), recurrence (07) and
#   downsampling (08).
#
# ### Exercises
# 1. Pass `scale=1.0` instead of $1/\sqrt d$ and look at how peaked the rows of $P$ become for $d = 64$. Why did
#    Vaswani et al. scale?
# 2. Mask every key of one row. What do `out` and the gradients of that row look like, and why is that the right answer?
# 3. Use `effattn.tools.bench.measure` at N = 4096. How many N×N float32 matrices does the peak hold? Find them in
#    `effattn/nn/sparse.py`.
# 4. With $D = 512$, at which $N$ does attention cost as much as the rest of the layer?
