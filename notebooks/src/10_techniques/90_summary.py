# %% [markdown]
# ## Summary
#
# | technique | same numbers? | memory (measured above) | extra compute |
# |---|---|---|---|
# | `flash` | yes, to rounding (an exact kernel: the whole contract) | O(N d) instead of O(N M) | the backward recomputes each tile |
# | chunked FFN | yes, to rounding | O(c d_ff) instead of O(N d_ff) | a second fc1 + GELU per chunk |
# | reversible blocks | its own architecture; the backward equals the stored chain rule (1e-15 in float64) | flat in the depth L | one forward per block again |
# | checkpointing every k | yes, exactly | ~ L/k inputs + k blocks, least near k = √L | one forward again |
# | bf16 / fp16 / int8 | no: relative spacing 2^-8 / 2^-11 per number; int8 attention 1–7 % off (section 5) | 1/2, 1/2, 1/4 of float32's bytes | fp16 needs loss scaling |
#
# * Exactness is what makes a technique free to use: the first four change no result, so every test of the model
#   holds with them switched on (`tests/test_techniques.py` checks the gradients against the plain model).
# * The reversible block trades exact arithmetic for memory: in float32 the rebuilt input differs from the real one
#   by rounding that grows with the depth (the table of section 3).
# * bfloat16 has float32's range and needs no loss scaling; float16 has more mantissa but overflows above 65504 and
#   underflows below 6e-8: the softmax must subtract its maximum and the gradients need a dynamic scale.
#
# **Exercises.**
# 1. Section 4: measure the memory of checkpointing 16 blocks for k = 1, 2, 4, 8, 16
#    (`techniques.stack_memory(16, technique="checkpoint", k=k)`). Where is the minimum, and why is it not
#    exactly at k = √16 = 4? *Hint: a segment's caches are larger than its saved input.*
# 2. Section 3: run the float32 reconstruction for 32 and 64 blocks. Does the error grow like L, or like √L (random
#    rounding)? *Hint: fit the exponent of `input_error` against L on log-log axes.*
# 3. Section 5: in `int8_attention`, quantise $P$ with one scale per whole matrix instead of per row. Which rows lose
#    the most? *Hint: a row with a flat softmax has only small weights.*
# 4. Train `python -m effattn train --task lm --precision fp16 --steps 200` and `--precision bf16`; compare the
#    losses with float32 and read `loss_scale` and `skipped_steps` in the JSON line.

# %%
print(f"notebook ran in {time.time() - T0:.0f} s")
