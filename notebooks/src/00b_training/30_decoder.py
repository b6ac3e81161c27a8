# %% [markdown]
# ## Decoder: recall at a distance — where a local window cannot reach
#
# The decoder mode needs a kernel that can decode (`spec.causal`): asking for one that cannot (BigBird, Linformer, ...)
# fails at once with the kernel's own reason.

# %%
try:
    Decoder(97, np.random.default_rng(0), attention="linformer", max_len=32)
except ValueError as exc:
    print("ValueError:", exc)

# %% [markdown]
# **The task** (`effattn.tools.tasks.DistantRecall`): a sequence of $2L$ random symbols ($L = 20$, 8 symbols) whose
# second half repeats the first, $x_t = x_{t-L}$. The decoder predicts the next symbol; the targets that the past
# determines are those of positions $t \ge L - 1$, and each answer is the token $L - 1 = 19$ positions back. Nothing
# else in the sequence says anything about it: a model that cannot see 19 positions back can only guess, accuracy
# $1/8$.
#
# **Two decoders, same size, same data, same steps** (one layer, $D = 32$, 2 heads): `full` attention, and the
# blockwise `local` attention of the Image Transformer / Memory-Compressed Transformer with blocks of $b = 4$ and
# `look_back=1` — each query sees its own block and the previous one, at most $2b - 1 = 7$ positions back, fewer than
# 19 (stacking layers widens this receptive field by a block per layer, notebook 01):

# %%
from effattn.attention import local as local_mod
from effattn.nn.factorized import receptive_field
from effattn.nn.optim import Adam, WarmupDecay
from effattn.tools.tasks import DistantRecall
from effattn.tools.train import evaluate, fit

task = DistantRecall(lag=20, n_symbols=8)
print("example (first 2 sequences):\n", task.eval_batches(2)[0]["x"])
a_local = local_mod.build_pattern(task.seq_len, block=4, look_back=1, causal=True, xp=np)
for layers in (1, 2, 3):
    reach = receptive_field(*[a_local] * layers)
    back = max(t - int(np.flatnonzero(reach[t])[0]) for t in range(task.seq_len))
    print(f"{layers} local layer(s) reach at most {back} positions back; the answer is {task.lag - 1} back")
far = max(t - int(np.flatnonzero(a_local[t])[0]) for t in range(task.seq_len))
assert far < task.lag - 1


def train_decoder(attention, attn_config=None, steps=200, seed=0):
    """A 1-layer decoder trained on the task with Adam (the trainer's own `fit`); CPU seconds and the history."""
    model = Decoder(task.vocab, np.random.default_rng(seed), attention=attention, attn_config=attn_config or {},
                    d_model=32, heads=2, layers=1, max_len=task.seq_len, dtype="float32")
    opt = Adam(dict(model.parameters()), lr=5e-3)
    t0 = time.process_time()
    history = fit(model, task, opt, WarmupDecay(5e-3, warmup=20), np.random.default_rng([seed, 2]), steps=steps,
                  batch_size=32, eval_every=50, progress=False)
    loss, acc = evaluate(model, task)
    return {"model": model, "history": history, "seconds": time.process_time() - t0,
            "result": {"steps": steps, "accuracy": acc, "loss": loss, "metric": task.metric}}


effattn.backend.set_blas_threads(1)                          # small matrices: one BLAS thread is fastest
recall = {"full": train_decoder("full"), "local b=4": train_decoder("local", {"block": 4, "look_back": 1})}
for name, r in recall.items():
    print(f"{name:10s} held-out accuracy {r['result']['accuracy']:.3f} (chance {task.chance:.3f}), "
          f"{r['seconds']:.1f} s CPU")
curves(recall, f"recall {task.lag - 1} positions back (decoder)")
assert recall["full"]["result"]["accuracy"] > 0.9
assert recall["local b=4"]["result"]["accuracy"] < task.chance + 0.08

# %% [markdown]
# Full attention learns the lookup (accuracy near 1); local attention, whatever it learns, stays at chance — the
# answer is outside its window. The learned maps say why: full attention's heads put a large share of their weight on
# the key $L - 1$ back (the diagonal offset by 19, from query $L$ on; the number below), local attention's weights are
# confined to its band, where nothing predicts the answer.

# %%
b = task.eval_batches(4)[0]
maps, titles = [], []
for name, r in recall.items():
    model = r["model"]
    model.forward(b["x"])
    for n_, mha in model.attention_layers():
        if n_.endswith("attn"):
            w = mha.attention_weights()[0]                       # (H, N, N) of the first sequence
            for h in range(w.shape[0]):
                maps.append(w[h]); titles.append(f"{name}: head {h}")
plot_patterns(maps, titles, suptitle="learned causal attention, one sequence", ncols=4, weights=True)
plt.show()
model = recall["full"]["model"]
model.forward(b["x"])
w_full = model.attention_layers()[0][1].attention_weights()                  # (B, H, N, N)
lagged = np.diagonal(w_full, -(task.lag - 1), axis1=-2, axis2=-1)[..., 1:]    # weight on the key 19 back, t >= L
print(f"full: mean weight on the key 19 back (queries t >= {task.lag}), per head: {lagged.mean(axis=(0, 2)).round(2)}")
