# %% [markdown]
# ## The whole model's backward, checked
#
# The backward of a block undoes its forward in reverse; a residual $y = x + f(x)$ passes $\partial y$ straight through
# and adds $f$'s backward: $\partial x = \partial y + f'(x)^\top \partial y$. Mean pooling divides the gradient over the
# real tokens; the embedding's backward adds up the rows of repeated tokens (`xp.add.at`). We check a 2-layer
# encoder-decoder in float64 against central differences, a few entries of *every* parameter
# (`tests/test_models.py` does the three modes).

# %%
rng = np.random.default_rng(0)
s2s = EncoderDecoder(7, 6, rng, d_model=8, heads=2, layers=2, d_ff=12, max_len=8, dtype="float64")
batch = {"src": rng.integers(0, 7, (2, 5)), "tgt": rng.integers(0, 6, (2, 4)), "y": rng.integers(0, 6, (2, 4)),
         "src_mask": np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)}
s2s.zero_grad()
s2s.loss_and_backward(batch)
grads = dict(s2s.gradients())
worst, h = 0.0, 1e-5
for name, p in s2s.parameters():
    flat = p.reshape(-1)
    for i in rng.choice(p.size, min(p.size, 3), replace=False):
        old = flat[i]
        flat[i] = old + h
        up = s2s.loss_and_backward(batch, backward=False)[0]
        flat[i] = old - h
        down = s2s.loss_and_backward(batch, backward=False)[0]
        flat[i] = old
        num, ana = (up - down) / (2 * h), grads[name].reshape(-1)[i]
        worst = max(worst, abs(num - ana) / max(abs(num) + abs(ana), 1e-6))
print(f"{s2s.num_parameters()} parameters in {len(grads)} arrays; worst relative error {worst:.1e}")
assert worst < 1e-6
