# %% [markdown]
# # 00b · Training transformers by hand-written backprop, with any attention
#
# *Efficient Transformers: A Survey* — Tay et al. ([arXiv 2009.06732](https://arxiv.org/abs/2009.06732)), Section 2,
# *Background on Transformers* (its subsection *Transformer Mode*: the three modes), on top of *Attention Is All You Need* — Vaswani et al. ([arXiv 1706.03762](https://arxiv.org/abs/1706.03762)).
#
# **Intuition.** Every mechanism of this package is a kernel `(q, k, v) -> out` with a hand-derived backward. Put it
# between the projections of a multi-head attention layer, stack pre-LayerNorm blocks, chain the backwards in reverse
# order — and the whole transformer trains with NumPy alone, no autograd. The survey uses a transformer in three
# **modes**:
#
# | mode | attention | task here | metric |
# |---|---|---|---|
# | encoder | bidirectional | `listops` (Long Range Arena rules), `image` (pixels as a sequence) | class accuracy |
# | decoder | causal | recall at a distance (here); `lm`, characters of the standard library's docstrings (command line) | next-token accuracy |
# | encoder-decoder | encoder bidirectional, decoder causal + cross-attention | `copy`, `reverse` | token accuracy |
#
# Each block is pre-LN:  $x \leftarrow x + \mathrm{MHA}(\mathrm{LN}_1(x))$, [$x \leftarrow x + \mathrm{MHA}(\mathrm{LN}_2(x), \text{memory})$],
# $x \leftarrow x + \mathrm{FFN}(\mathrm{LN}_3(x))$, and the attention is any registered kernel chosen by name.
# The same thing runs from the command line:
#
# ```
# python -m effattn train --task copy --attention full
# python -m effattn train --task lm --attention local --attn block=8 --steps 400 --save lm.npz
# ```
#
# The block, as the package writes it (`effattn/models/transformer.py`): the forward is the three residual lines above,
# the backward runs them in reverse — each residual passes $dy$ through and adds the sublayer's backward:

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import effattn
from effattn.gradcheck import rel_error
from effattn.models import Decoder, Encoder, EncoderDecoder
from effattn.tools.train import train_model
from effattn.figures.style import plot_pattern, plot_patterns
from effattn.models.attention import MultiHeadAttention
from effattn.models.transformer import Block
from effattn.tools.teach import check, load_answer, show_source

T0 = time.time()
show_source(Block.forward)
show_source(Block.backward)
print("kernels usable in a model:", ", ".join(effattn.names("kernel")))


# %% [markdown]
# Inside `MultiHeadAttention.forward` the kernel — any registered name — sits between the projections, with its own
# learnable parameters and configuration for the current length:

# %%
show_source(MultiHeadAttention.forward, "q = self._split", "return self.o.forward")


def curves(runs, title):
    """Training loss (smoothed) and held-out accuracy of several runs."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    for label, r in runs.items():
        h = r["history"]
        loss = np.convolve(h["loss"], np.ones(10) / 10, mode="valid")
        a.plot(np.arange(len(loss)) + 10, loss, label=label)
        b.plot(h["eval_step"] + [r["result"]["steps"]], h["eval_acc"] + [r["result"]["accuracy"]], "o-", label=label)
    a.set(xlabel="step", ylabel="training loss", yscale="log")
    b.set(xlabel="step", ylabel=r["result"]["metric"].replace("_", " "), ylim=(0, 1.02))
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    plt.show()
