# %% [markdown]
# ## Encoder: classify shapes from their pixels with axial attention
#
# An 8 x 8 image of a circle, square, cross or line is read as a sequence of 64 pixel tokens. Axial attention
# (Ho et al., 2019) lets each pixel attend along its row and its column — the 2-D structure the flat sequence hides.
# The classifier mean-pools the encoder's states.

# %%
enc = train_model("image", "axial", steps=100, eval_every=25)
print(enc["result"])
curves({"axial": enc}, "shapes (encoder)")

# %%
task, model = enc["task"], enc["model"]
b = task.eval_batches(8)[0]
pred = model.forward(b["x"]).argmax(-1)
mha = model.attention_layers()[-1][1]
W = mha.attention_weights()                                    # (B, H, 64, 64)
fig, axes = plt.subplots(2, 4, figsize=(10, 5))
for j, ax in enumerate(axes[0]):
    ax.imshow(b["x"][j].reshape(task.image_shape), cmap="gray_r")
    ax.set_title(f"{task.CLASSES[b['y'][j]]} -> {task.CLASSES[pred[j]]}", fontsize=9)
    ax.axis("off")
q = 3 * task.side + 4                                          # one query pixel (row 3, column 4)
for j, ax in enumerate(axes[1]):
    ax.imshow(W[j, 0, q].reshape(task.image_shape), cmap="viridis")
    ax.plot(4, 3, "r+")
    ax.set_title("head 0: where pixel (3, 4) looks", fontsize=9)
    ax.axis("off")
fig.tight_layout()
plt.show()
