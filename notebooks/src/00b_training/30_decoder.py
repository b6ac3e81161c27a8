# %% [markdown]
# ## Decoder: a character language model with local attention
#
# The decoder mode needs a kernel that can decode (`spec.causal`): asking for one that cannot (BigBird, Linformer, ...)
# fails at once with the kernel's own reason. Here the blockwise `local` attention of the Image Transformer / Memory
# Compressed Transformer reads the docstrings of the standard library, next to `full` attention.

# %%
try:
    Decoder(97, np.random.default_rng(0), attention="linformer", max_len=32)
except ValueError as exc:
    print("ValueError:", exc)

# %%
lm = {name: train_model("lm", name, steps=120, d_model=32, heads=4, eval_every=40) for name in ("full", "local")}
for name, r in lm.items():
    print(name, {k: r["result"][k] for k in ("accuracy", "loss", "seconds")})
curves(lm, "character LM (decoder)")

# %%
r = lm["local"]
task, model = r["task"], r["model"]
prompt = task.eval_batches(1)[0]["x"][:, :16]
sample = model.generate(prompt, 40, temperature=0.7, rng=np.random.default_rng(1))
print(repr(task.decode(prompt[0])), "->", repr(task.decode(sample[0, 16:])))
model.forward(task.eval_batches(1)[0]["x"])
(name, mha), = [(n, m) for n, m in model.attention_layers() if n == "stack.blocks.1.attn"]
print("local config:", mha.config_for(task.seq_len))
fig = plot_patterns([mha.attention_weights()[0, h] for h in range(mha.heads)],
                    [f"{name} head {h}" for h in range(mha.heads)], suptitle="learned causal local attention")
plt.show()
