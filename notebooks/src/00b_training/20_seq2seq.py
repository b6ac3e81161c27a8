# %% [markdown]
# ## Encoder-decoder: reverse a sequence
#
# The decoder reads `[BOS, y_0, ..., y_{N-2}]` (teacher forcing) and must output `y = reversed(src)`. It can only do so
# through cross-attention: target position $i$ has to find source position $M-1-i$. After training, the
# cross-attention maps of the decoder should show that anti-diagonal.

# %%
rev = train_model("reverse", "full", steps=200, eval_every=50)
print(rev["result"])
curves({"full": rev}, "reverse (encoder-decoder)")

# %%
model, task = rev["model"], rev["task"]
src = task.eval_batches(4)[0]["src"]
out = model.generate(src, bos=task.BOS, steps=task.seq_len)            # greedy decoding
print("source   ", src[0] - 2)
print("greedy   ", out[0] - 2)
print("reversed?", np.array_equal(out, src[:, ::-1]))
model.forward(src, np.concatenate([np.full((4, 1), task.BOS), out[:, :-1]], 1))
maps = [(n, m.attention_weights()) for n, m in model.attention_layers() if n.endswith("xattn")]
fig = plot_patterns([w[0, h] for n, w in maps for h in range(w.shape[1])],
                    [f"{n.split('.')[1]}.{n.split('.')[2]} head {h}" for n, w in maps for h in range(w.shape[1])],
                    suptitle="decoder cross-attention (target i -> source j)", ncols=4,
                    xlabel="source j", ylabel="target i")
plt.show()
