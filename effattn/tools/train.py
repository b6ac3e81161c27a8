"""Train a small transformer with any attention kernel on a generated task: ``python -m effattn train``.

    python -m effattn train --task copy --attention full
    python -m effattn train --task lm --attention local --attn w=8 --steps 400 --save lm.npz
    python -m effattn train --task lm --attention local --attn w=8 --steps 800 --resume lm.npz

The loop (:func:`fit`): draw a batch from a seeded generator, forward,
cross-entropy (padding ignored), the hand-written backward of the whole
model, global-norm gradient clipping, Adam with linear warmup then decay
(inverse square root by default: it needs no horizon, so ``--steps`` can be
raised on resume), with a tqdm bar (loss, accuracy; ``TQDM_DISABLE=1`` hides
it) and a held-out evaluation every ``--eval-every`` steps. The run ends
with ONE JSON line: task, attention, steps, loss and accuracy of the final
evaluation (token accuracy for copy/reverse/lm, class accuracy for
listops/image), seconds.

Reproducible: the seed fixes the model (``default_rng([seed, 1])``), the
batches (``default_rng([seed, 2])``) and the held-out set (the task's own
seed). A checkpoint (``--save``, ``.npz``) holds the parameters, the Adam
moments and step, the batch generator's state and the settings, so training
2k steps equals training k, saving, resuming and training k more, bit for
bit. A checkpoint that is corrupt, foreign (a ``.npy`` array, any other
file) or made with other settings is refused with one message naming the
file before anything is changed. Saving is atomic: a temporary file in the
same folder, then ``os.replace``; a failed or interrupted save leaves the
old file as it was and no temporary file behind.

Everything is checked before any work: every option (``--save`` must name a
file in an existing folder, ``--resume`` an existing file, ``--attn`` may not
set what the trainer sets itself, such as ``key_mask``), and the memory of
the largest array a step allocates (:func:`largest_array`: the
``batch x heads x N x N`` attention matrix of a quadratic kernel such as
``full``), which must fit in half the machine's memory (:func:`memory_limit`).

How a run can stop early:

- **divergence** (:class:`Diverged`): the loss, an activation or a gradient
  became NaN or inf (e.g. ``--lr 1e30 --clip 0``). Training stops at that
  step with one message naming the step and the loss; the parameters are not
  updated with it and nothing is saved (a ``--save`` file keeps what it held).
- **Ctrl-C** (:class:`Interrupted`): the state of the last *completed* step is
  kept (an update is never half applied: Ctrl-C waits for it) and, with
  ``--save``, saved, so ``--resume`` continues bit for bit.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import json
import math
import os
import signal
import time

import numpy as np

from .. import backend, registry
from ..models import MODES
from ..models.attention import resolve_kernel
from ..models.downsampling import ARCHS as ENCODER_ARCHS, FunnelEncoder, PerceiverEncoder
from ..models.recurrence import XLDecoder

ARCHS = ENCODER_ARCHS + ("xl",)
from ..models.ffn import FFN_KINDS
from ..nn.optim import Adam, WarmupDecay, clip_grad_norm
from ..nn.precision import PRECISIONS, LossScaler, set_storage
from ..validate import NonFiniteError
from .tasks import DEFAULTS, TASK_MODES, TASKS, make_task

FORMAT = "effattn-train-1"
# settings that must match for a checkpoint to be resumed
STRUCTURAL = ("task", "attention", "attn", "decoder_attention", "cross_attention", "layers", "d_model", "heads",
              "d_ff", "seq_len", "dtype", "positions", "pool", "seed", "schedule", "warmup", "decay_steps",
              "reversible", "ffn", "ffn_config", "arch", "arch_config")
# what a checkpoint written before a structural setting existed had instead
STRUCTURAL_DEFAULTS = {"reversible": False, "ffn": "dense", "ffn_config": {}, "arch": "plain", "arch_config": {}}
# kernel arguments the trainer passes itself, so --attn may not set them (where each comes from)
TRAINER_SETS = {"q": "the model's query projection", "k": "the model's key projection",
                "v": "the model's value projection", "causal": "the task (decoders are causal)",
                "key_mask": "the padding of each batch", "rng": "--seed", "n": "--seq-len and --max-len",
                "d": "--d-model / --heads", "heads": "--heads", "dtype": "--dtype"}


class Diverged(RuntimeError):
    """The loss, an activation or a gradient became NaN or inf at ``step``: training stopped there
    (a step whose loss or gradient failed applies no update) and nothing was saved. The command
    line exits with status 1."""

    exit_status = 1

    def __init__(self, message, step):
        super().__init__(message)
        self.step = step


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``step`` is the last completed step, whose state (parameters,
    optimizer, batch generator) the model, optimizer and generator hold."""

    def __init__(self, message, step):
        super().__init__(message)
        self.step = step


# --------------------------------------------------------------------------- arguments
def parse_attn(items):
    """``["w=8", "causal_blocks=True", "kind=lsh"]`` -> {"w": 8, "causal_blocks": True, "kind": "lsh"}
    (values are Python literals when they parse, strings otherwise)."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--attn expects KEY=VALUE, got {item!r}")
        key, val = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key.isidentifier():
            raise ValueError(f"--attn key {key!r} is not a valid name")
        try:
            out[key] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            out[key] = val
    return check_attn_keys(out)


def check_attn_keys(attn):
    """Refuse kernel options the trainer sets itself (:data:`TRAINER_SETS`), by name."""
    for key in attn:
        if key in TRAINER_SETS:
            raise ValueError(f"--attn {key}: the trainer sets {key!r} itself (from {TRAINER_SETS[key]}); remove it")
    return attn


def add_train_arguments(parser):
    """Add the ``train`` options to an ``argparse`` parser."""
    p = parser
    p.add_argument("--task", default="copy", help=f"one of {', '.join(TASKS)} (default copy)")
    p.add_argument("--attention", default="full", help="registered kernel name (python -m effattn list)")
    p.add_argument("--attn", action="append", default=[], metavar="KEY=VALUE",
                   help="kernel option, repeatable; value parsed as a Python literal")
    p.add_argument("--decoder-attention", default=None,
                   help="encoder-decoder tasks: the decoder's causal self-attention (default: --attention)")
    p.add_argument("--cross-attention", default="full", help="encoder-decoder tasks: cross-attention kernel")
    p.add_argument("--steps", type=int, default=None, help="total training steps (task default)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--d-ff", type=int, default=None, help="feed-forward width (default 4 d_model)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (image: side*side pixels)")
    p.add_argument("--max-len", type=int, default=None, help="positions the model has (default: the task's length)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (Adam)")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps")
    p.add_argument("--schedule", default="invsqrt", choices=WarmupDecay.KINDS, help="decay after warmup")
    p.add_argument("--decay-steps", type=int, default=None, help="horizon of cosine/linear decay (default --steps)")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    p.add_argument("--positions", default="sinusoidal", choices=("sinusoidal", "learned"))
    p.add_argument("--pool", default="mean", choices=("mean", "cls"), help="encoder tasks: pooling")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--backend", default=None, choices=("numpy", "cupy"))
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS threads (default 1: these small matrices run faster on one thread)")
    p.add_argument("--save", default=None, metavar="PATH",
                   help="write a checkpoint (.npz) at the end, in an existing folder. On Ctrl-C the state of the "
                        "last completed step is saved there (resume it with --resume); if training diverges "
                        "(NaN/inf) nothing is saved and the file keeps what it held")
    p.add_argument("--resume", default=None, metavar="PATH", help="continue from a checkpoint (never overwritten "
                   "when refused)")
    g = p.add_argument_group("efficiency techniques (issue 16; notebook 10)")
    g.add_argument("--reversible", action="store_true",
                   help="reversible blocks: the backward rebuilds each block's input from its output")
    g.add_argument("--checkpoint", type=int, default=None, metavar="K",
                   help="gradient checkpointing: keep every K-th block's input, recompute the rest in the backward")
    g.add_argument("--ffn-chunk", type=int, default=None, metavar="C",
                   help="run the feed-forwards by chunks of C positions (same result, less memory)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16/fp16: linear layers compute and store in 16 bits over float32 master weights "
                        "(fp16 with dynamic loss scaling; needs --dtype float32)")
    g = p.add_argument_group("sparse feed-forward (issue 15; notebook 09)")
    g.add_argument("--ffn", default="dense", choices=FFN_KINDS,
                   help="every block's feed-forward: the dense MLP, or switch (a mixture of --experts expert MLPs "
                        "of width --d-ff; its load-balancing and z losses enter the training loss)")
    g.add_argument("--experts", type=int, default=None, metavar="E", help="--ffn switch: experts (default 8)")
    g.add_argument("--capacity", type=float, default=None, metavar="CF",
                   help="--ffn switch: capacity factor, tokens an expert takes = CF x tokens / E (default 1.25; "
                        "decoders never drop: that would leak the future)")
    g.add_argument("--router-k", type=int, default=None, metavar="K",
                   help="--ffn switch: experts per token, 1 (Switch) or 2 (GShard) (default 1)")
    g.add_argument("--aux-weight", type=float, default=None, metavar="A",
                   help="--ffn switch: weight of the load-balancing loss (Switch's alpha, default 1e-2; 0: off)")
    g.add_argument("--z-weight", type=float, default=None, metavar="Z",
                   help="--ffn switch: weight of the router z-loss (ST-MoE's c_z, default 1e-3; 0: off)")
    g.add_argument("--pkm-keys", type=int, default=None, metavar="K",
                   help="--ffn pkm: memory slots K, a square (default 1024)")
    g.add_argument("--pkm-topk", type=int, default=None, metavar="k",
                   help="--ffn pkm: slots read per token and head, at most sqrt(K) (default 32)")
    g.add_argument("--pkm-heads", type=int, default=None, metavar="H", help="--ffn pkm: memory heads (default 4)")
    g = p.add_argument_group("downsampling encoders (issue 14; notebook 08): encoder tasks only")
    g.add_argument("--arch", default="plain", choices=ARCHS,
                   help="plain: --layers blocks at full length; funnel: stages of blocks with pooled-query "
                        "attention between them; perceiver: latents cross-attend to the input (default plain)")
    g.add_argument("--stages", default=None, metavar="K,K,...",
                   help="--arch funnel: blocks per stage, e.g. 2,2,2 (default: --layers split into 3 stages)")
    g.add_argument("--stride", type=int, default=None, metavar="S", help="--arch funnel: pooling stride (default 2)")
    g.add_argument("--funnel-pool", default=None, choices=("mean", "max"), help="--arch funnel: pooling (default mean)")
    g.add_argument("--decoder-layers", type=int, default=None, metavar="K",
                   help="--arch funnel: full-length blocks after upsampling back to N (default 0)")
    g.add_argument("--latents", type=int, default=None, metavar="M", help="--arch perceiver: latents (default 16)")
    g.add_argument("--latent-layers", type=int, default=None, metavar="L",
                   help="--arch perceiver: latent self-attention blocks (default --layers)")
    g = p.add_argument_group("recurrence (issue 13; notebook 07): --arch xl, a Transformer-XL language model")
    g.add_argument("--segment", type=int, default=None, metavar="N",
                   help="--arch xl: tokens per segment; each batch runs segment by segment (default seq_len / 2)")
    g.add_argument("--mem-len", type=int, default=None, metavar="L",
                   help="--arch xl: states each layer keeps for the next segment, 0: no memory (default --segment)")
    g.add_argument("--eval-mem-len", type=int, default=None, metavar="L",
                   help="--arch xl: the memory at evaluation, may exceed --mem-len (default --mem-len)")
    g.add_argument("--cmem-len", type=int, default=None, metavar="L",
                   help="--arch xl: a Compressive Transformer's compressed memory per layer (default 0: Transformer-XL)")
    g.add_argument("--compress-rate", type=int, default=None, metavar="C",
                   help="--arch xl --cmem-len L: states per compressed state (default 2)")
    return parser


ARCH_FLAGS = {  # arch -> {arch_config key: (args attribute, flag)}
    "funnel": {"stages": ("stages", "--stages"), "stride": ("stride", "--stride"),
               "funnel_pool": ("funnel_pool", "--funnel-pool"), "decoder_layers": ("decoder_layers", "--decoder-layers")},
    "perceiver": {"latents": ("latents", "--latents"), "latent_layers": ("latent_layers", "--latent-layers")},
    "xl": {"segment": ("segment", "--segment"), "mem_len": ("mem_len", "--mem-len"),
           "eval_mem_len": ("eval_mem_len", "--eval-mem-len"), "cmem_len": ("cmem_len", "--cmem-len"),
           "rate": ("compress_rate", "--compress-rate")},
}


def arch_config_from_args(args, layers):
    """(arch, arch_config) from --arch and its options; an option without its --arch is refused."""
    arch = getattr(args, "arch", "plain")
    for kind, table in ARCH_FLAGS.items():
        if kind == arch:
            continue
        for attr, flag in table.values():
            if getattr(args, attr, None) is not None:
                raise ValueError(f"{flag} is an option of --arch {kind} (got --arch {arch})")
    given = {key: getattr(args, attr, None) for key, (attr, _) in ARCH_FLAGS.get(arch, {}).items()}
    given = {k: v for k, v in given.items() if v is not None}
    if "stages" in given:
        try:
            stages = [int(t) for t in str(given["stages"]).split(",")]
        except ValueError:
            stages = []
        if not stages or min(stages) < 1:
            raise ValueError(f"--stages must be positive block counts separated by commas, e.g. 2,2,2; got "
                             f"{given['stages']!r}")
        given["stages"] = stages
    elif arch == "funnel":
        k = max(1, layers // 3)
        given["stages"] = [layers - 2 * k, k, k] if layers >= 3 else [1] * layers
    for key, lo in (("stride", 1), ("latents", 1), ("latent_layers", 0), ("decoder_layers", 0), ("segment", 1),
                    ("mem_len", 0), ("eval_mem_len", 0), ("cmem_len", 0), ("rate", 1)):
        if key in given and (isinstance(given[key], bool) or given[key] < lo):
            raise ValueError(f"{ARCH_FLAGS[arch][key][1]} must be an integer >= {lo}, got {given[key]!r}")
    if arch == "perceiver":
        given.setdefault("latent_layers", layers)
    if given.get("decoder_layers") and len(given["stages"]) < 2:
        raise ValueError("--decoder-layers: the decoder upsamples a pooled sequence; give at least two --stages")
    return arch, given


FFN_FLAGS = {  # ffn kind -> {ffn_config key: (args attribute, flag)}
    "switch": {"experts": ("experts", "--experts"), "capacity_factor": ("capacity", "--capacity"),
               "k": ("router_k", "--router-k"), "aux_weight": ("aux_weight", "--aux-weight"),
               "z_weight": ("z_weight", "--z-weight")},
    "pkm": {"keys": ("pkm_keys", "--pkm-keys"), "topk": ("pkm_topk", "--pkm-topk"),
            "heads": ("pkm_heads", "--pkm-heads")},
}


def ffn_config_from_args(args):
    """(ffn, ffn_config) from --ffn and its options; an option without its --ffn is refused."""
    ffn = getattr(args, "ffn", "dense")
    for kind, table in FFN_FLAGS.items():
        if kind == ffn:
            continue
        for attr, flag in table.values():
            if getattr(args, attr, None) is not None:
                raise ValueError(f"{flag} is an option of --ffn {kind} (got --ffn {ffn})")
    given = {key: getattr(args, attr, None) for key, (attr, _) in FFN_FLAGS.get(ffn, {}).items()}
    given = {k: v for k, v in given.items() if v is not None}
    for key in ("experts", "keys", "topk", "heads"):
        if key in given and (isinstance(given[key], bool) or given[key] < 1):
            raise ValueError(f"{FFN_FLAGS[ffn][key][1]} must be a positive integer, got {given[key]!r}")
    if "keys" in given and math.isqrt(given["keys"]) ** 2 != given["keys"]:
        raise ValueError(f"--pkm-keys must be a square (K = sqrtK^2 product keys), got {given['keys']}")
    if "topk" in given and given["topk"] > math.isqrt(given.get("keys", 1024)):
        raise ValueError(f"--pkm-topk must be at most sqrt(--pkm-keys) = {math.isqrt(given.get('keys', 1024))}, "
                         f"got {given['topk']}")
    if "k" in given and given["k"] not in (1, 2):
        raise ValueError(f"--router-k must be 1 (Switch) or 2 (GShard), got {given['k']!r}")
    if "capacity_factor" in given and not (given["capacity_factor"] > 0 and math.isfinite(given["capacity_factor"])):
        raise ValueError(f"--capacity must be a positive number, got {given['capacity_factor']!r}")
    for key in ("aux_weight", "z_weight"):
        if key in given and not (given[key] >= 0 and math.isfinite(given[key])):
            raise ValueError(f"{FFN_FLAGS[ffn][key][1]} must be a number >= 0, got {given[key]!r}")
    return ffn, given


def settings_from_args(args):
    """Validated settings dict (task defaults filled in); raises ValueError with one clear line."""
    task = args.task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    d = DEFAULTS[task]
    s = {
        "task": task, "attention": args.attention, "attn": parse_attn(args.attn),
        "decoder_attention": args.decoder_attention, "cross_attention": args.cross_attention,
        "steps": d["steps"] if args.steps is None else args.steps,
        "layers": d["layers"] if args.layers is None else args.layers,
        "d_model": d["d_model"] if args.d_model is None else args.d_model,
        "heads": d["heads"] if args.heads is None else args.heads,
        "d_ff": args.d_ff, "seq_len": d["seq_len"] if args.seq_len is None else args.seq_len,
        "max_len": args.max_len,
        "batch_size": d["batch_size"] if args.batch_size is None else args.batch_size,
        "lr": d["lr"] if args.lr is None else args.lr,
        "warmup": d["warmup"] if args.warmup is None else args.warmup,
        "schedule": args.schedule, "decay_steps": args.decay_steps, "clip": args.clip,
        "positions": args.positions, "pool": args.pool, "dtype": args.dtype, "seed": args.seed,
        "eval_every": args.eval_every, "backend": args.backend or backend.get_backend(),
        "threads": args.threads, "save": args.save, "resume": args.resume,
        "reversible": bool(getattr(args, "reversible", False)), "checkpoint": getattr(args, "checkpoint", None),
        "ffn_chunk": getattr(args, "ffn_chunk", None), "precision": getattr(args, "precision", "fp32"),
    }
    s["ffn"], s["ffn_config"] = ffn_config_from_args(args)
    s["arch"], s["arch_config"] = arch_config_from_args(args, s["layers"])
    if s["arch"] != "plain":
        clash = [flag for flag, on in (("--reversible", s["reversible"]), ("--checkpoint", s["checkpoint"] is not None),
                                       ("--ffn-chunk", s["ffn_chunk"] is not None), ("--ffn", s["ffn"] != "dense"))
                 if on]
        if clash:
            raise ValueError(f"{clash[0]} is an option of the plain encoder's stack, not of --arch {s['arch']}")
        if s["arch"] == "xl":
            if TASK_MODES[task] != "decoder":
                raise ValueError(f"--arch xl builds a language model (decoder); task {task} needs "
                                 f"{'an encoder' if TASK_MODES[task] == 'encoder' else 'an encoder-decoder'}: "
                                 "use --task lm or recall")
            if args.attention != "full":
                raise ValueError("--attention: the xl layer's attention is its own (relative positions over "
                                 "[memory; segment]); leave --attention full")
            s["arch_config"].setdefault("segment", max(1, s["seq_len"] // 2))
        elif TASK_MODES[task] != "encoder":
            raise ValueError(f"--arch {s['arch']} builds an encoder (classifier); task {task} needs "
                             f"{'a decoder' if TASK_MODES[task] == 'decoder' else 'an encoder-decoder'}: use --arch plain")
        if s["arch"] == "perceiver" and args.attention != "full":
            raise ValueError("--attention: the perceiver's attention is its own (cross- and latent attention); "
                             "leave --attention full")
    if s["ffn"] != "dense" and s["ffn_chunk"] is not None:
        raise ValueError(f"--ffn-chunk: a {s['ffn']} feed-forward routes the tokens of the whole batch together; "
                         "chunking is for --ffn dense")
    for key in ("steps", "layers", "d_model", "heads", "seq_len", "batch_size"):
        v = s[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {v!r}")
    for key, lo in (("warmup", 0), ("eval_every", 0), ("decay_steps", 1), ("d_ff", 1), ("max_len", 1),
                    ("threads", 1), ("checkpoint", 1), ("ffn_chunk", 1)):
        v = s[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise ValueError(f"--{key.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
    if s["reversible"] and s["checkpoint"] is not None:
        raise ValueError("--checkpoint: a reversible model stores no block's activations already; "
                         "use --checkpoint or --reversible, not both")
    if s["precision"] not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {s['precision']!r}")
    if s["precision"] != "fp32" and s["dtype"] != "float32":
        raise ValueError(f"--precision {s['precision']} emulates 16-bit storage over float32 master weights; "
                         f"use --dtype float32 (got {s['dtype']})")
    if s["d_model"] % s["heads"]:
        raise ValueError(f"--heads {s['heads']} must divide --d-model {s['d_model']}")
    if not (s["lr"] > 0 and math.isfinite(s["lr"])):
        raise ValueError(f"--lr must be a positive number, got {s['lr']!r}")
    if not (s["clip"] >= 0 and math.isfinite(s["clip"])):
        raise ValueError(f"--clip must be >= 0, got {s['clip']!r}")
    if s["max_len"] is None:
        s["max_len"] = s["seq_len"]
    elif s["seq_len"] > s["max_len"]:
        raise ValueError(f"--seq-len {s['seq_len']} is longer than the {s['max_len']} positions the model has (--max-len)")
    if s["schedule"] not in ("cosine", "linear"):
        s["decay_steps"] = None            # no horizon: a resumed run may raise --steps
    elif s["decay_steps"] is None:
        s["decay_steps"] = s["steps"]
    if s["eval_every"] is None:
        s["eval_every"] = max(1, s["steps"] // 4)
    if s["save"] is not None:
        check_save_path(s["save"])
    if s["resume"] is not None and not os.path.isfile(s["resume"]):
        what = "is a folder, not a checkpoint file" if os.path.isdir(s["resume"]) else "does not exist"
        raise ValueError(f"--resume: checkpoint {s['resume']!r} {what}")
    # attention names and decoding ability, before any work
    mode = {"copy": "encoder-decoder", "reverse": "encoder-decoder", "lm": "decoder"}.get(task, "encoder")
    s["mode"] = mode
    resolve_kernel(s["attention"], causal=(mode == "decoder"), rng=np.random.default_rng(0))
    if mode == "encoder-decoder":
        resolve_kernel(s["decoder_attention"] or s["attention"], causal=True, rng=np.random.default_rng(0))
        resolve_kernel(s["cross_attention"], causal=False)
    return s


def check_save_path(path):
    """``--save`` must name a file (not a folder) in an existing, writable folder: checked before
    training, so that a run never fails at its end."""
    if os.path.isdir(path):
        raise ValueError(f"--save {path!r} is a folder; name a file in it, e.g. {os.path.join(path, 'checkpoint.npz')!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--save {path!r}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--save {path!r}: the folder {folder!r} is not writable")
    return path


def largest_array(s):
    """(bytes, how) of the largest array one training step allocates, estimated simply: the
    ``(batch, heads, N, N)`` attention matrix when a kernel is quadratic (not ``subquadratic`` in the
    registry: full, the synthesizers), else the ``(batch, N, d_ff)`` feed-forward activation."""
    b, h, n, item = s["batch_size"], s["heads"], s["seq_len"], np.dtype(s["dtype"]).itemsize
    kernels = [s["attention"]]
    if s["mode"] == "encoder-decoder":
        kernels += [s["decoder_attention"] or s["attention"], s["cross_attention"]]
    quadratic = [k for k in dict.fromkeys(kernels) if not registry.get(k).subquadratic]
    if quadratic:
        return b * h * n * n * item, f"the attention matrix of {quadratic[0]}, batch {b} x heads {h} x N^2 x {item} bytes"
    d_ff = s["d_ff"] or 4 * s["d_model"]
    return b * n * d_ff * item, f"the feed-forward activation, batch {b} x N x d_ff {d_ff} x {item} bytes"


def memory_limit():
    """Half the machine's physical memory (the GPU's on the cupy backend): the most one array of a
    step may take, since a step holds several of its size (the cache, the gradient)."""
    total = None
    if backend.get_backend() == "cupy":
        with contextlib.suppress(Exception):
            total = int(backend.xp().cuda.Device().mem_info[1])
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):   # not POSIX: assume 16 GiB
            total = 16 * 2**30
    return total // 2


def check_memory(s):
    """Refuse, before anything is allocated, a run whose largest array (:func:`largest_array`)
    exceeds :func:`memory_limit`."""
    need, how = largest_array(s)
    limit = memory_limit()
    if need > limit:
        raise ValueError(f"--seq-len {s['seq_len']}: the largest array of a step, {how}, needs {_size(need)}, "
                         f"more than the {_size(limit)} allowed (half this machine's memory); lower --seq-len or "
                         f"--batch-size, or use a subquadratic --attention")


def _size(nbytes):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1024


# --------------------------------------------------------------------------- building
def build(s):
    """(task, model, optimizer, schedule) for validated settings ``s``."""
    task = make_task(s["task"], seq_len=s["seq_len"], seed=s["seed"])
    if task.max_len > s["max_len"]:
        raise ValueError(f"the {s['task']} task needs {task.max_len} positions, more than --max-len {s['max_len']}")
    attn_config = dict(s["attn"])
    rng = np.random.default_rng([s["seed"], 1])
    kw = dict(d_model=s["d_model"], heads=s["heads"], layers=s["layers"], d_ff=s["d_ff"], max_len=s["max_len"],
              attention=s["attention"], attn_config=attn_config, positions=s["positions"], dtype=s["dtype"],
              reversible=s.get("reversible", False), checkpoint=s.get("checkpoint"), ffn_chunk=s.get("ffn_chunk"),
              ffn=s.get("ffn", "dense"), ffn_config=s.get("ffn_config") or None)
    cls = MODES[task.mode]
    arch, ac = s.get("arch", "plain"), dict(s.get("arch_config") or {})
    if arch == "funnel":
        model = FunnelEncoder(task.vocab, task.n_classes, rng, d_model=s["d_model"], heads=s["heads"], d_ff=s["d_ff"],
                              max_len=s["max_len"], attention=s["attention"], attn_config=attn_config,
                              positions=s["positions"], pool=s["pool"], dtype=s["dtype"], stages=tuple(ac["stages"]),
                              stride=ac.get("stride", 2), funnel_pool=ac.get("funnel_pool", "mean"),
                              decoder_layers=ac.get("decoder_layers", 0))
    elif arch == "perceiver":
        if s["pool"] != "mean":
            raise ValueError("--pool: the perceiver classifies the mean of its latents; leave --pool mean")
        model = PerceiverEncoder(task.vocab, task.n_classes, rng, d_model=s["d_model"], heads=s["heads"],
                                 d_ff=s["d_ff"], max_len=s["max_len"], positions=s["positions"], dtype=s["dtype"],
                                 latents=ac.get("latents", 16), latent_layers=ac["latent_layers"])
    elif arch == "xl":
        model = XLDecoder(task.vocab, rng, d_model=s["d_model"], heads=s["heads"], layers=s["layers"], d_ff=s["d_ff"],
                          segment=ac["segment"], mem_len=ac.get("mem_len"), cmem_len=ac.get("cmem_len", 0),
                          rate=ac.get("rate", 2), dtype=s["dtype"], max_len=s["max_len"])
    elif task.mode == "encoder":
        model = cls(task.vocab, task.n_classes, rng, pool=s["pool"], **kw)
    elif task.mode == "decoder":
        model = cls(task.vocab, rng, **kw)
    else:
        model = cls(task.src_vocab, task.tgt_vocab, rng, cross_attention=s["cross_attention"],
                    decoder_attention=s["decoder_attention"], **kw)
    for name, m in model.modules():           # the self-attentions, which attn_config configures
        clash = sorted(set(getattr(m, "param_names", ())) & set(attn_config)) if name.endswith(".attn.") else []
        if clash:
            raise ValueError(f"--attn {clash[0]}: {clash[0]!r} is a learnable parameter of {s['attention']}, "
                             f"made by the trainer; remove it")
    set_storage(model, s.get("precision", "fp32"))
    params = dict(model.parameters())
    opt = Adam(params, lr=s["lr"])
    sched = WarmupDecay(s["lr"], warmup=s["warmup"], total=s["decay_steps"], kind=s["schedule"])
    return task, model, opt, sched


def ffn_summary(model):
    """After the last forward (the last held-out batch): the weighted auxiliary loss, each expert's share of the dispatched
    tokens summed over the layers, and the share of the tokens' choices dropped (mean over layers); for a product-key
    memory the share of its slots read (mean over layers)."""
    layers = model.aux()["layers"].values()
    loads = [a["load"] for a in layers if "load" in a]
    out = {"aux_loss": round(model.aux()["loss"], 6)}
    if loads:
        tot = np.sum(loads, axis=0)
        out["expert_load"] = [round(float(c) / max(float(tot.sum()), 1.0), 4) for c in tot]
        out["dropped"] = round(float(np.mean([a["dropped"] for a in layers if "dropped" in a])), 4)
    usage = [a["usage"] for a in layers if "usage" in a]
    if usage:
        out["memory_usage"] = round(float(np.mean(usage)), 4)
    return out


def to_device(batch):
    return {k: backend.asarray(v) for k, v in batch.items()}


def evaluate(model, task, size=64, mem_len=None):
    """(mean loss, accuracy) over the task's fixed held-out set (no gradients). ``mem_len``: a
    Transformer-XL evaluates with this memory (restored afterwards)."""
    train_mem = getattr(model, "mem_len", None)
    if mem_len is not None:
        model.set_mem_len(mem_len)
    tot_loss = tot_correct = tot_count = 0
    try:
        for b in task.eval_batches(size):
            loss, correct, count = model.loss_and_backward(to_device(b), backward=False)
            tot_loss += loss * count
            tot_correct += correct
            tot_count += count
    finally:
        if mem_len is not None:
            model.set_mem_len(train_mem)
    return tot_loss / max(tot_count, 1), tot_correct / max(tot_count, 1)


def _nonfinite(exc):
    """Whether ``exc`` says that numbers became NaN or inf: the loss check of :func:`fit`, the
    optimizer's refusal of a non-finite gradient, or a kernel refusing NaN/inf inputs (the
    message of ``validate.check_float_array``, e.g. "q contains NaN or inf")."""
    return isinstance(exc, (FloatingPointError, NonFiniteError))


@contextlib.contextmanager
def _interrupt_deferred():
    """Hold Ctrl-C (SIGINT) until the block ends, so that an update is applied whole or not at all.
    Outside the main thread, where signals cannot be caught, the block just runs."""
    caught = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        if caught:
            signal.raise_signal(signal.SIGINT)      # delivered now, to the handler that was there


def fit(model, task, opt, sched, rng, *, steps, start=0, batch_size=32, clip=1.0, eval_every=0,
        progress=True, history=None, desc="train", scaler=None):
    """Train from step ``start`` to ``steps`` (totals). Returns the history dict
    {"step", "loss", "acc", "eval_step", "eval_loss", "eval_acc"} (lists, appended to ``history``).

    Raises :class:`Diverged` (naming the step and the loss) when the loss, an activation or a
    gradient is NaN or inf; that step's update is not applied. On Ctrl-C raises
    :class:`Interrupted` with ``step`` the last completed step: ``model``, ``opt`` and ``rng`` are
    as they were right after it (the update runs with Ctrl-C held; the generator is set back
    to before the interrupted step's batch), so saving them resumes bit for bit.

    ``scaler`` (:class:`effattn.nn.precision.LossScaler`, float16 training): the backward runs on
    S * loss, the gradients are divided by S; a step whose gradients overflowed applies no update
    (counted in ``history["skipped"]``, S halved) instead of raising :class:`Diverged`."""
    from tqdm import tqdm

    h = history if history is not None else {"step": [], "loss": [], "acc": [], "eval_step": [], "eval_loss": [],
                                             "eval_acc": []}
    h.setdefault("skipped", [])
    hide = not progress or os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")
    bar = tqdm(total=steps, initial=start, desc=desc, disable=hide, leave=False, dynamic_ncols=True)
    run_loss = run_acc = None
    done, rng_done = start, rng.bit_generator.state       # the last completed step and the generator after it
    try:
        for t in range(start + 1, steps + 1):
            loss = float("nan")
            try:
                batch = to_device(task.batch(rng, batch_size))
                model.zero_grad()
                overflow = False
                if scaler is None:
                    loss, correct, count = model.loss_and_backward(batch)
                else:
                    try:
                        loss, correct, count = model.loss_and_backward(batch, loss_scale=scaler.scale)
                    except (ValueError, FloatingPointError) as exc:     # the scaled backward overflowed
                        if not _nonfinite(exc):
                            raise
                        overflow = True
                        loss, correct, count = model.loss_and_backward(batch, backward=False)
                if not math.isfinite(loss):
                    raise FloatingPointError("the loss is not finite")
                grads = dict(model.gradients())
                if overflow:
                    scaler.overflowed()
                if overflow or (scaler is not None and not scaler.unscale(grads)):
                    h["skipped"].append(t)                # an overflow: no update, a smaller scale next step
                    done, rng_done = t, rng.bit_generator.state
                    bar.update(1)
                    continue
                if clip:
                    clip_grad_norm(grads, clip)           # NonFiniteGradient, nothing scaled, if one is NaN/inf
                with _interrupt_deferred():
                    opt.lr = sched(t)
                    opt.step(grads)                       # NonFiniteGradient, nothing changed, if one is NaN/inf
                    done, rng_done = t, rng.bit_generator.state
                if eval_every and t % eval_every == 0 and t != steps:
                    el, ea = evaluate(model, task)
                    if not math.isfinite(el):
                        raise FloatingPointError(f"the held-out loss after step {t} is {el}")
            except (ValueError, FloatingPointError) as exc:
                if not _nonfinite(exc):
                    raise
                last = f"; last finite loss {h['loss'][-1]:.4g} at step {h['step'][-1]}" if h["loss"] else ""
                raise Diverged(f"training diverged at step {t}: loss {loss:.4g} ({exc}){last}", t) from None
            acc = correct / max(count, 1)
            h["step"].append(t)
            h["loss"].append(loss)
            h["acc"].append(acc)
            run_loss = loss if run_loss is None else 0.9 * run_loss + 0.1 * loss
            run_acc = acc if run_acc is None else 0.9 * run_acc + 0.1 * acc
            bar.update(1)
            if eval_every and t % eval_every == 0 and t != steps:
                h["eval_step"].append(t)
                h["eval_loss"].append(el)
                h["eval_acc"].append(ea)
                bar.set_postfix(loss=f"{run_loss:.3f}", acc=f"{run_acc:.3f}", eval_acc=f"{ea:.3f}")
            else:
                bar.set_postfix(loss=f"{run_loss:.3f}", acc=f"{run_acc:.3f}", refresh=False)
    except KeyboardInterrupt:
        rng.bit_generator.state = rng_done
        raise Interrupted(f"after step {done}", done) from None
    finally:
        bar.close()
    return h


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, model, opt, step, rng, settings, scaler=None):
    """Write parameters, optimizer state, step, generator state, settings (and a float16 run's
    loss-scaler state, ``scaler``) to ``path`` (.npz).

    Atomic: the file is written under a temporary name in the same folder, then moved over
    ``path`` (``os.replace``), so ``path`` holds the old checkpoint or the new one, never half of
    one; on any failure (Ctrl-C included) the temporary file is removed."""
    arrays = {f"param/{k}": backend.to_numpy(v) for k, v in model.parameters()}
    for k, v in opt.state_dict().items():
        arrays[f"opt/{k}"] = np.asarray(backend.to_numpy(v))
    meta = {"format": FORMAT, "step": int(step), "rng": rng.bit_generator.state,
            "settings": {k: settings.get(k) for k in STRUCTURAL}}
    if scaler is not None:
        meta["scaler"] = scaler.state_dict()
    arrays["meta"] = np.array(json.dumps(meta))
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def _read_npz(path):
    """{name: array} of the .npz file ``path``; ValueError naming it for anything else."""
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a folder, not a file")
    try:   # a foreign or damaged file can fail in many ways (zip, zlib, pickle, OS): each is "unreadable"
        loaded = np.load(path, allow_pickle=False)
        if not hasattr(loaded, "files"):
            raise ValueError("it holds a single array, as a .npy file does; checkpoints are .npz files from --save")
        with loaded as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"checkpoint {path!r} is not a readable .npz file ({exc})") from None


def _read_meta(path, data, rng):
    """(step, settings, generator state) from the ``meta`` entry, each checked."""
    try:
        meta = json.loads(str(data.pop("meta")))
    except KeyError:
        raise ValueError(f"checkpoint {path!r} has no metadata (not written by --save)") from None
    except ValueError as exc:
        raise ValueError(f"checkpoint {path!r} has no valid metadata ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"checkpoint {path!r} has no valid metadata (format {found!r}, expected {FORMAT!r})")
    step, saved, rng_state = meta.get("step"), meta.get("settings"), meta.get("rng")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint {path!r} has no valid metadata (step {step!r})")
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint {path!r} has no valid metadata (settings {saved!r})")
    try:
        copy.deepcopy(rng).bit_generator.state = rng_state     # validated on a copy
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
        raise ValueError(f"checkpoint {path!r} has an invalid generator state ({type(exc).__name__}: {exc})") from None
    return step, saved, rng_state, meta.get("scaler")


def load_checkpoint(path, model, opt, rng, settings, scaler=None):
    """Restore a :func:`save_checkpoint` file into ``model``, ``opt`` and ``rng`` (and the loss
    scale into ``scaler``, when the checkpoint has one: a float16 run; a checkpoint without one
    leaves ``scaler`` at its fresh scale); returns the step.

    Everything is read and checked first (a readable .npz, its metadata, the generator state,
    the settings, every name, shape and finiteness); on any problem a ValueError naming the file
    explains it and nothing is changed (neither the model nor the file).
    """
    data = _read_npz(path)
    step, saved, rng_state, scaler_state = _read_meta(path, data, rng)
    diff = [f"{k}: checkpoint {saved.get(k)!r} != now {settings.get(k)!r}" for k in STRUCTURAL
            if _norm(saved.get(k, STRUCTURAL_DEFAULTS.get(k))) != _norm(settings.get(k))]
    if diff:
        raise ValueError(f"checkpoint {path!r} was made with other settings: " + "; ".join(diff))
    params = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
    state = {k[len("opt/"):]: v for k, v in data.items() if k.startswith("opt/")}
    bad = [k for k, v in {**params, **state}.items()
           if k != "t" and (v.dtype.kind != "f" or not np.isfinite(v).all())]
    if bad:
        raise ValueError(f"checkpoint {path!r} is corrupt: non-finite or non-float arrays {bad[:5]}")
    try:
        model.check_parameters(params)
        opt.check_state_dict(state)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"checkpoint {path!r} does not match this model: {exc}") from None
    if step > settings["steps"]:
        raise ValueError(f"checkpoint {path!r} is at step {step}, beyond --steps {settings['steps']}")
    if scaler is not None and scaler_state is not None:
        try:
            copy.deepcopy(scaler).load_state_dict(scaler_state)          # validated on a copy
        except ValueError as exc:
            raise ValueError(f"checkpoint {path!r} has an invalid loss-scaler state ({exc})") from None
    model.load_parameters(params)
    opt.load_state_dict(state)
    rng.bit_generator.state = rng_state
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    return step


def _norm(v):
    """JSON round trip, so tuples equal lists when settings are compared."""
    return json.loads(json.dumps(v))


# --------------------------------------------------------------------------- command
def run_train(args) -> dict:
    """Run ``train`` from parsed arguments; returns the result dict (the CLI prints it as one JSON line)."""
    return _run(settings_from_args(args), progress=True)["result"]


def train_model(task="copy", attention="full", *, progress=False, **options):
    """Train from Python (notebooks): the options of the command line as keywords
    (``steps=200, d_model=32, attn={"w": 8}``). Returns a dict with the JSON ``result``
    and the ``task``, ``model`` and ``history`` (per-step loss/accuracy, evaluations)."""
    ap = argparse.ArgumentParser()
    add_train_arguments(ap)
    args = ap.parse_args(["--task", task, "--attention", attention])
    attn = options.pop("attn", {})
    for key, value in options.items():
        if not hasattr(args, key):
            raise ValueError(f"unknown option {key!r}; options: {', '.join(sorted(vars(args)))}")
        setattr(args, key, value)
    s = settings_from_args(args)
    s["attn"] = check_attn_keys(dict(attn))
    return _run(s, progress=progress)


def _run(s, progress=True):
    if s["backend"] != backend.get_backend():
        backend.set_backend(s["backend"])
    if s["backend"] == "numpy":
        backend.set_blas_threads(s["threads"])
    check_memory(s)
    t0 = time.time()
    task, model, opt, sched = build(s)
    # float16 needs loss scaling (its gradients underflow); bfloat16 has float32's range and does not.
    # A resumed run goes on with the scale its checkpoint saved.
    scaler = LossScaler() if s.get("precision") == "fp16" else None
    rng = np.random.default_rng([s["seed"], 2])
    start = done = 0
    if s["resume"]:
        start = done = load_checkpoint(s["resume"], model, opt, rng, s, scaler=scaler)
    try:
        # NumPy's overflow warnings are silenced: the checks of fit report a divergence in one line
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            h = fit(model, task, opt, sched, rng, steps=s["steps"], start=start, batch_size=s["batch_size"],
                    clip=s["clip"], eval_every=s["eval_every"], progress=progress,
                    desc=f"{s['task']}/{s['attention']}", scaler=scaler)
            done = s["steps"]
            try:
                loss, acc = evaluate(model, task, mem_len=(s.get("arch_config") or {}).get("eval_mem_len"))
                if not math.isfinite(loss):
                    raise FloatingPointError(f"the held-out loss is {loss}")
            except (ValueError, FloatingPointError) as exc:
                if not _nonfinite(exc):
                    raise
                raise Diverged(f"training diverged: the evaluation after step {done} failed ({exc})", done) from None
    except KeyboardInterrupt as exc:
        done = getattr(exc, "step", done)
        if not s["save"]:
            raise Interrupted(f"after step {done} of {s['steps']}; nothing saved (no --save)", done) from None
        save_checkpoint(s["save"], model, opt, done, rng, s, scaler=scaler)
        raise Interrupted(f"after step {done} of {s['steps']}; its state is saved in {s['save']!r}, "
                          f"continue with --resume {s['save']}", done) from None
    except Diverged as exc:
        kept = f"{s['save']!r} keeps what it held" if s["save"] else "no --save"
        raise Diverged(f"{exc}; nothing saved ({kept})", exc.step) from None
    if s["save"]:
        save_checkpoint(s["save"], model, opt, s["steps"], rng, s, scaler=scaler)
    result = {
        "task": s["task"], "attention": s["attention"], "mode": task.mode, "steps": s["steps"],
        "loss": round(loss, 6), "accuracy": round(acc, 6), "metric": task.metric,
        "train_loss": round(float(np.mean(h["loss"][-20:])), 6) if h["loss"] else None,
        "eval_history": [[st, round(a, 4)] for st, a in zip(h["eval_step"], h["eval_acc"])],
        "params": model.num_parameters(), "seq_len": s["seq_len"], "seed": s["seed"],
        "backend": backend.get_backend(), "resumed_from": start if s["resume"] else None,
        "seconds": round(time.time() - t0, 2), "precision": s.get("precision", "fp32"),
        "loss_scale": None if scaler is None else scaler.scale, "skipped_steps": len(h.get("skipped", ())),
    }
    if s.get("ffn", "dense") != "dense":
        result.update(ffn=s["ffn"], **ffn_summary(model))
    if s.get("arch", "plain") != "plain":
        result.update(arch=s["arch"], arch_config=s["arch_config"])
    return {"result": result, "task": task, "model": model, "history": h, "settings": s}


def train_main(args) -> int:
    """``python -m effattn.tools.train``: run and print the one JSON line; bad input prints one line
    and exits 2, a divergence 1, Ctrl-C 130 (as ``python -m effattn train``)."""
    import sys

    try:
        result = run_train(args)
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc})" if str(exc) else "interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, Diverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_status", 2)
    print(json.dumps(result))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m effattn.tools.train", description=__doc__.splitlines()[0])
    add_train_arguments(ap)
    return train_main(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
