# %% [markdown]
# # 04 · Neural memory: global tokens, inducing points and pooling seeds
#
# *Efficient Transformers: A Survey* — Tay, Dehghani, Bahri, Metzler ([arXiv 2009.06732](https://arxiv.org/abs/2009.06732)),
# the class **"Neural memory" (M)** of its taxonomy, and its model of that class:
# *Set Transformer* — Lee, Lee, Kim, Kosiorek, Choi, Teh, 2019 ([arXiv 1810.00825](https://arxiv.org/abs/1810.00825)).
#
# **Intuition.** Instead of letting every token look at every other token (N² pairs), add a few extra slots — a *memory* —
# that **read the whole sequence** and that **every token reads back**. Any token then reaches any other token in two
# hops (token → memory → token), at the cost of N·m pairs per hop for m memory slots. The survey calls these slots
# *global tokens* or a *global neural memory*: "the global tokens act as a form of model memory that learns to gather
# from the input sequence tokens". They appear in three guises:
#
# | model | the memory | where in effattn |
# |---|---|---|
# | Set Transformer (ISAB) | m **learned inducing points**, not part of the input | `isab` (this notebook) |
# | Set Transformer (PMA) | k **learned seeds** that pool a set into k vectors | `pma` (this notebook) |
# | Longformer / ETC / BigBird | a few **input tokens marked global** (e.g. `[CLS]`), next to a local pattern | `longformer`, `etc`, `bigbird` (notebook 02) |
#
# This notebook: (1) global memory as a mask over full attention; (2) the Set Transformer's blocks, their equations, the
# code and its checks; (3) a set task trained with hand-written backprop; (4) an exercise: pooling by attention with
# learned seeds, written and checked by you; (5) measured cost against the O(N²) SAB. Beside each equation a cell prints
# the package's own lines that compute it (`effattn.tools.teach.show_source`: the source itself, never a copy).

# %%
import os

# These machines run several notebooks at once on two cores: a multi-threaded BLAS then spends its time waiting on
# its own threads for the small matrices of this notebook (10x slower here). One thread per process is faster.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import time
import tracemalloc

import matplotlib.pyplot as plt
import numpy as np

import effattn
from effattn.gradcheck import check_gradients, rel_error
from effattn.layers import isab, pma
from effattn.nn import mab
from effattn.figures.style import plot_pattern, plot_patterns
from effattn.tools.teach import check, load_answer, show_source

full = effattn.get("full")
for name in ("isab", "pma"):
    spec = effattn.get(name)
    print(f"{name}: {spec.title} | {spec.citation} | classes {spec.classes} | {spec.complexity}")

# %% [markdown]
# ## 1 · Global memory as a mask over full attention
#
# Put g memory slots in front of N tokens (a sequence of length g + N) and allow
#
# * memory rows to attend to **everything** (the memory *gathers* from the sequence), and
# * token rows to attend to **the memory** only (each token *reads* the memory; the residual connection keeps the
#   token's own content).
#
# That is full attention with a boolean mask (`full.forward(q, k, v, mask=...)`); the mask has
# g(g + N) + N g allowed entries — O(N g), not O(N²). An efficient kernel would compute only those blocks; here we
# use the dense masked form to *see* the pattern.

# %%
g, n_tok, d = 3, 21, 8
L = g + n_tok
is_mem = np.arange(L) < g
mask = is_mem[:, None] | is_mem[None, :]                              # (L, L): memory rows and memory columns
print(f"allowed entries: {mask.sum()} of {L * L}  (g(g+N) + N g = {g * (g + n_tok) + n_tok * g})")
plot_pattern(mask, title=f"g={g} memory slots + N={n_tok} tokens")
plt.show()

# %% [markdown]
# **Two hops reach everything.** After one masked layer a token's output depends only on itself (through the residual)
# and the memory; after
# two layers it depends on every token, because the memory gathered them all in the first layer. We check it by
# perturbing one token and watching another token's output (q = k = v = the layer input, to keep it minimal).

# %%
rng = np.random.default_rng(0)
x = rng.standard_normal((1, L, d))


def layer(h):
    out, _ = full.forward(h, h, h, mask=mask)
    return h + out                                                       # residual, as in a Transformer block


i, j = g + 2, g + 15                                                     # two ordinary tokens
x2 = x.copy()
x2[0, j] += 1.0
one = np.abs(layer(x2)[0, i] - layer(x)[0, i]).max()
two = np.abs(layer(layer(x2))[0, i] - layer(layer(x))[0, i]).max()
print(f"token {i} after one layer changes by {one:.1e}, after two layers by {two:.1e}")
assert one == 0.0 and two > 1e-6

# %% [markdown]
# **ISAB is this pattern with the memory taken out of the sequence.** Its inducing points I are parameters, not
# tokens: the first MAB is the memory rows (m queries over N keys, an m x N attention), the second MAB is the token rows
# (N queries over the m summaries, an N x m attention); a token keeps its own content through the residual
# connection. (The memory-to-memory block of the left picture has no counterpart: ISAB's inducing points do not read
# each other.) Below: the same support drawn as ISAB's two blocks.

# %%
m = g
fig = plot_patterns([mask, np.ones((m, n_tok), bool), np.ones((n_tok, m), bool)],
                    ["global memory inside the sequence", "ISAB step 1: H = MAB(I, X)  (m x N)",
                     "ISAB step 2: MAB(X, H)  (N x m)"])
plt.show()

# %% [markdown]
# The models of notebook 02 (*fixed patterns with global memory*, FP + M) use input tokens as the memory, beside a local window. Where
# they are registered, their effective attention shows the global rows and columns (the survey classes them FP + M).
#
# **The code of the memory** (`effattn/nn/global_tokens.py`, shared by the three). The two halves of the mask above
# are two functions: the *gather* rows (memory row $i \in G$ attends to every key, $\mathrm{softmax}(q_i K^\top/\sqrt d)V$)
# are `global_rows_forward`, a dense $(g \times N)$ attention (`q_rows` = the $g$ memory queries); the *read* columns
# (every token attends to the memory) are `global_keys`, which appends the $g$ memory keys `x` to the keys of each of the
# `groups` query blocks of the local pattern, as a broadcast view; its backward sums the blocks' gradients back.

# %%
from effattn.nn import global_tokens

show_source(global_tokens.global_rows_forward)
show_source(global_tokens.global_keys)
show_source(global_tokens.global_keys_backward)

# %%
others = [name for name in ("longformer", "etc", "bigbird") if name in effattn.names()]
mats, titles = [], []
for name in others:
    spec = effattn.get(name)
    case = spec.example(np.random.default_rng(0), batch=1, heads=1, n=48, d=8)
    _, cache = spec.forward(**case.inputs, **case.config)
    mats.append(np.abs(np.asarray(effattn.to_numpy(spec.weights(cache)))[0, 0]) > 0)
    titles.append(f"{name}: {spec.complexity}")
if mats:
    plot_patterns(mats, titles, suptitle="global tokens next to local patterns")
    plt.show()
print("registered global-token models:", others or "none yet")
