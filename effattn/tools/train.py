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
bit. A checkpoint that is corrupt or made with other settings is refused
with a message before anything is changed.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import time
import zipfile

import numpy as np

from .. import backend
from ..models import MODES
from ..models.attention import resolve_kernel
from ..nn.optim import Adam, WarmupDecay, clip_grad_norm
from .tasks import DEFAULTS, TASKS, make_task

FORMAT = "effattn-train-1"
# settings that must match for a checkpoint to be resumed
STRUCTURAL = ("task", "attention", "attn", "decoder_attention", "cross_attention", "layers", "d_model", "heads",
              "d_ff", "seq_len", "dtype", "positions", "pool", "seed", "schedule", "warmup", "decay_steps")


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
    return out


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
    p.add_argument("--save", default=None, metavar="PATH", help="write a checkpoint (.npz) at the end")
    p.add_argument("--resume", default=None, metavar="PATH", help="continue from a checkpoint")
    return parser


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
    }
    for key in ("steps", "layers", "d_model", "heads", "seq_len", "batch_size"):
        v = s[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {v!r}")
    for key, lo in (("warmup", 0), ("eval_every", 0), ("decay_steps", 1), ("d_ff", 1), ("max_len", 1),
                    ("threads", 1)):
        v = s[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise ValueError(f"--{key.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
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
    # attention names and decoding ability, before any work
    mode = {"copy": "encoder-decoder", "reverse": "encoder-decoder", "lm": "decoder"}.get(task, "encoder")
    s["mode"] = mode
    resolve_kernel(s["attention"], causal=(mode == "decoder"), rng=np.random.default_rng(0))
    if mode == "encoder-decoder":
        resolve_kernel(s["decoder_attention"] or s["attention"], causal=True, rng=np.random.default_rng(0))
        resolve_kernel(s["cross_attention"], causal=False)
    return s


# --------------------------------------------------------------------------- building
def build(s):
    """(task, model, optimizer, schedule) for validated settings ``s``."""
    task = make_task(s["task"], seq_len=s["seq_len"], seed=s["seed"])
    if task.max_len > s["max_len"]:
        raise ValueError(f"the {s['task']} task needs {task.max_len} positions, more than --max-len {s['max_len']}")
    attn_config = dict(s["attn"])
    rng = np.random.default_rng([s["seed"], 1])
    kw = dict(d_model=s["d_model"], heads=s["heads"], layers=s["layers"], d_ff=s["d_ff"], max_len=s["max_len"],
              attention=s["attention"], attn_config=attn_config, positions=s["positions"], dtype=s["dtype"])
    cls = MODES[task.mode]
    if task.mode == "encoder":
        model = cls(task.vocab, task.n_classes, rng, pool=s["pool"], **kw)
    elif task.mode == "decoder":
        model = cls(task.vocab, rng, **kw)
    else:
        model = cls(task.src_vocab, task.tgt_vocab, rng, cross_attention=s["cross_attention"],
                    decoder_attention=s["decoder_attention"], **kw)
    params = dict(model.parameters())
    opt = Adam(params, lr=s["lr"])
    sched = WarmupDecay(s["lr"], warmup=s["warmup"], total=s["decay_steps"], kind=s["schedule"])
    return task, model, opt, sched


def to_device(batch):
    return {k: backend.asarray(v) for k, v in batch.items()}


def evaluate(model, task, size=64):
    """(mean loss, accuracy) over the task's fixed held-out set (no gradients)."""
    tot_loss = tot_correct = tot_count = 0
    for b in task.eval_batches(size):
        loss, correct, count = model.loss_and_backward(to_device(b), backward=False)
        tot_loss += loss * count
        tot_correct += correct
        tot_count += count
    return tot_loss / max(tot_count, 1), tot_correct / max(tot_count, 1)


def fit(model, task, opt, sched, rng, *, steps, start=0, batch_size=32, clip=1.0, eval_every=0,
        progress=True, history=None, desc="train"):
    """Train from step ``start`` to ``steps`` (totals). Returns the history dict
    {"step", "loss", "acc", "eval_step", "eval_loss", "eval_acc"} (lists, appended to ``history``)."""
    from tqdm import tqdm

    h = history if history is not None else {"step": [], "loss": [], "acc": [], "eval_step": [], "eval_loss": [],
                                             "eval_acc": []}
    grads_of = dict  # readability: the gradient dict the optimizer needs
    hide = not progress or os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")
    bar = tqdm(total=steps, initial=start, desc=desc, disable=hide, leave=False, dynamic_ncols=True)
    run_loss = run_acc = None
    for t in range(start + 1, steps + 1):
        batch = to_device(task.batch(rng, batch_size))
        model.zero_grad()
        loss, correct, count = model.loss_and_backward(batch)
        if not math.isfinite(loss):
            bar.close()
            raise FloatingPointError(f"loss became {loss} at step {t}")
        grads = grads_of(model.gradients())
        if clip:
            clip_grad_norm(grads, clip)
        opt.lr = sched(t)
        opt.step(grads)
        acc = correct / max(count, 1)
        h["step"].append(t)
        h["loss"].append(loss)
        h["acc"].append(acc)
        run_loss = loss if run_loss is None else 0.9 * run_loss + 0.1 * loss
        run_acc = acc if run_acc is None else 0.9 * run_acc + 0.1 * acc
        bar.update(1)
        if eval_every and t % eval_every == 0 and t != steps:
            el, ea = evaluate(model, task)
            h["eval_step"].append(t)
            h["eval_loss"].append(el)
            h["eval_acc"].append(ea)
            bar.set_postfix(loss=f"{run_loss:.3f}", acc=f"{run_acc:.3f}", eval_acc=f"{ea:.3f}")
        else:
            bar.set_postfix(loss=f"{run_loss:.3f}", acc=f"{run_acc:.3f}", refresh=False)
    bar.close()
    return h


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, model, opt, step, rng, settings):
    """Write parameters, optimizer state, step, generator state and settings to ``path`` (.npz)."""
    arrays = {f"param/{k}": backend.to_numpy(v) for k, v in model.parameters()}
    for k, v in opt.state_dict().items():
        arrays[f"opt/{k}"] = np.asarray(backend.to_numpy(v))
    meta = {"format": FORMAT, "step": int(step), "rng": rng.bit_generator.state,
            "settings": {k: settings.get(k) for k in STRUCTURAL}}
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_checkpoint(path, model, opt, rng, settings):
    """Restore a :func:`save_checkpoint` file into ``model``, ``opt`` and ``rng``; returns the step.

    Everything is read and checked first (format, settings, every name, shape
    and finiteness); on any problem a ValueError explains it and nothing is changed.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path!r} does not exist") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"checkpoint {path!r} is not a readable .npz file ({exc})") from None
    try:
        meta = json.loads(str(data.pop("meta")))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        step = int(meta["step"])
        rng_state = meta["rng"]
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint {path!r} has no valid metadata ({exc})") from None
    saved = meta.get("settings", {})
    diff = [f"{k}: checkpoint {saved.get(k)!r} != now {settings.get(k)!r}" for k in STRUCTURAL
            if _norm(saved.get(k)) != _norm(settings.get(k))]
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
        if rng_state.get("bit_generator") != rng.bit_generator.state["bit_generator"]:
            raise ValueError(f"generator {rng_state.get('bit_generator')!r} is not {rng.bit_generator.state['bit_generator']!r}")
    except ValueError as exc:
        raise ValueError(f"checkpoint {path!r} does not match this model: {exc}") from None
    if step > settings["steps"]:
        raise ValueError(f"checkpoint {path!r} is at step {step}, beyond --steps {settings['steps']}")
    model.load_parameters(params)
    opt.load_state_dict(state)
    rng.bit_generator.state = rng_state
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
    s["attn"] = dict(attn)
    return _run(s, progress=progress)


def _run(s, progress=True):
    if s["backend"] != backend.get_backend():
        backend.set_backend(s["backend"])
    if s["backend"] == "numpy":
        backend.set_blas_threads(s["threads"])
    t0 = time.time()
    task, model, opt, sched = build(s)
    rng = np.random.default_rng([s["seed"], 2])
    start = 0
    if s["resume"]:
        start = load_checkpoint(s["resume"], model, opt, rng, s)
    h = fit(model, task, opt, sched, rng, steps=s["steps"], start=start, batch_size=s["batch_size"],
            clip=s["clip"], eval_every=s["eval_every"], progress=progress,
            desc=f"{s['task']}/{s['attention']}")
    loss, acc = evaluate(model, task)
    if s["save"]:
        save_checkpoint(s["save"], model, opt, s["steps"], rng, s)
    result = {
        "task": s["task"], "attention": s["attention"], "mode": task.mode, "steps": s["steps"],
        "loss": round(loss, 6), "accuracy": round(acc, 6), "metric": task.metric,
        "train_loss": round(float(np.mean(h["loss"][-20:])), 6) if h["loss"] else None,
        "eval_history": [[st, round(a, 4)] for st, a in zip(h["eval_step"], h["eval_acc"])],
        "params": model.num_parameters(), "seq_len": s["seq_len"], "seed": s["seed"],
        "backend": backend.get_backend(), "resumed_from": start if s["resume"] else None,
        "seconds": round(time.time() - t0, 2),
    }
    return {"result": result, "task": task, "model": model, "history": h, "settings": s}


def train_main(args) -> int:
    """``python -m effattn train``: run and print the one JSON line; bad input prints one line, exit 2."""
    import sys

    try:
        result = run_train(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m effattn.tools.train", description=__doc__.splitlines()[0])
    add_train_arguments(ap)
    return train_main(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
