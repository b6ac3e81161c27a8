# %% [markdown]
# ## 5 · Low precision
#
# Sixteen-bit formats halve the bytes of every stored number. `effattn.nn.precision` emulates them exactly on top of
# float32: `round_bf16` rounds to the nearest bfloat16 (ties to even) by integer arithmetic on the bit pattern,
# `round_fp16` through IEEE float16. The two formats split their 16 bits differently — measured below from the
# rounding functions themselves:

# %%
from effattn.nn import precision

show_source(precision.round_bf16)
for r in techniques.format_table():
    print(f"{r['format']:9s} mantissa {r['mantissa bits']:2d} bits  spacing at 1 {r['spacing at 1']:.1e}  "
          f"largest {r['largest']:.3e}  smallest normal {r['smallest normal']:.1e}")

# %% [markdown]
# bfloat16 keeps float32's range and gives up precision (3 significant digits); float16 keeps more precision and
# gives up range: its largest number is 65504, so $e^{x}$ overflows for $x > \ln 65504 \approx 11.1$. A softmax that
# does not subtract the row maximum first meets that at once:

# %%
logits = np.array([[3.0, 9.0, 11.5, 12.0]])
print("float16 softmax, no max subtraction:", precision.softmax_in(logits, subtract_max=False))
print("float16 softmax, max subtracted:    ", precision.softmax_in(logits))
assert np.isnan(precision.softmax_in(logits, subtract_max=False)).any()

# %% [markdown]
# **Mixed precision and loss scaling.** Training keeps float32 *master weights*; each linear layer computes with a
# 16-bit copy of its weight and input, accumulates in float32 and stores its output and gradients in 16 bits
# (`precision.set_storage`, `train --precision`). float16's gradients underflow below $6 \cdot 10^{-8}$, so the
# loss is multiplied by a scale $S$ before the backward and the gradients divided by $S$ after; a step whose
# gradients overflow is skipped and $S$ halved, and $S$ doubles after a run of good steps. A real float16 run (the
# `lm` task) started with a scale that is far too large, $2^{24}$, with doubling after 20 good steps:

# %%
trace = techniques.loss_scale_trace(120, scale=2.0 ** 24, growth_interval=20)
skipped = [t + 1 for t, ok in enumerate(trace["applied"]) if not ok]
print(f"{len(skipped)} of 120 steps skipped (overflow), at steps {skipped}")
assert skipped[:1] == [1] and 3 <= len(skipped) < 30
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
steps = np.arange(1, len(trace["scale"]) + 1)
a.semilogy(steps, trace["scale"], drawstyle="steps-post", base=2)
a.plot(skipped, [trace["scale"][t - 1] for t in skipped], "rx", label="skipped (overflow)")
a.set(xlabel="step", ylabel="loss scale S", title="dynamic loss scaling, float16"); a.legend()
st, ls = zip(*trace["loss"])
b.plot(st, ls); b.set(xlabel="step", ylabel="training loss", title="the applied steps")
plt.tight_layout(); plt.show()

# %% [markdown]
# **Attention in 16 bits and in int8.** `precision.lowp_attention` stores q, k, v, the scores, the weights and the
# output in bfloat16 or float16 and sums in float32, as a 16-bit matrix unit does; `precision.int8_attention` runs
# both products in 8-bit integers with symmetric scales — $q$ and $k$ per row for the logits, $P$ per row and $v$ per
# column for the output, the integer products summed exactly. The error against float64, max |error| / max |out|, over
# the length and the sharpness of the logits:

# %%
show_source(precision.int8_attention)
err = techniques.error_table(ns=(64, 256, 1024), logit_scales=(0.5, 1.0, 2.0, 4.0))
scales = sorted({r["logit scale"] for r in err})
for fmt in ("bf16", "fp16", "int8"):
    print(f"{fmt:5s} N \\ logit scale " + "".join(f"{c:>9}" for c in scales))
    for n in sorted({r["n"] for r in err}):
        print(f"{n:>22d}" + "".join(f"{r['error']:9.4f}" for r in err if r["n"] == n and r["format"] == fmt))
worst = {fmt: max(r["error"] for r in err if r["format"] == fmt) for fmt in ("bf16", "fp16", "int8")}
print("worst:", {k: round(v, 4) for k, v in worst.items()})
assert worst["fp16"] < worst["bf16"] and all(v < 0.2 for v in worst.values())
