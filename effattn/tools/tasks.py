"""Small training tasks that need no download, one per transformer mode.

============  =================  ===============================================
task          mode               what the model must do
============  =================  ===============================================
``copy``      encoder-decoder    output the source sequence (cross-attention aligns i -> i)
``reverse``   encoder-decoder    output the source reversed (i -> M-1-i)
``lm``        decoder            next character of English text (docstrings of the standard library)
``listops``   encoder            value (0-9) of a nested MAX/MIN/MED/SM expression (Long Range Arena)
``image``     encoder            class of a generated shape (circle, square, cross, line) from pixels
``recall``    decoder            repeat the first half of the sequence (answers lie seq_len / 2 back)
============  =================  ===============================================

Every task draws its data from explicit ``numpy.random.Generator`` objects:
``batch(rng, size)`` draws a training batch, ``eval_batches(size)`` returns a
fixed held-out set built from the task's own seed, so evaluation never moves
the training generator (a resumed run gives the same numbers). Batches are
dicts of NumPy arrays: encoder ``{"x", "mask", "y"}`` (y: class per
sequence), decoder ``{"x", "y"}``, encoder-decoder ``{"src", "tgt", "y"}``
(``tgt`` is ``y`` shifted right behind a BOS token, teacher forcing).
Targets equal to ``effattn.nn.functional.IGNORE`` (-100) are padding and count in no loss or accuracy.

ListOps follows the generator of Long Range Arena (Tay et al., 2021,
https://arxiv.org/abs/2011.04006; Nangia & Bowman, 2018): operators
``[MAX``, ``[MIN``, ``[MED`` (median, truncated to an integer as LRA's
``int(np.median)``), ``[SM`` (sum mod 10), values 0-9, ``]`` closing a list;
a node is a list with probability 0.25 below the maximum depth; trees are
drawn until their token count lies in [min_len, max_len]. LRA's brackets
``(`` ``)`` are dropped as LRA's input pipeline does.
"""
from __future__ import annotations

import inspect
import math

import numpy as np

TASKS = ("copy", "reverse", "lm", "listops", "image", "recall")

# Settings per task that meet the README's targets in about a minute on two CPU cores.
DEFAULTS = {
    "copy":    dict(steps=500, batch_size=32, seq_len=10, d_model=32, heads=2, layers=2, lr=3e-3, warmup=50),
    "reverse": dict(steps=500, batch_size=32, seq_len=10, d_model=32, heads=2, layers=2, lr=3e-3, warmup=50),
    "lm":      dict(steps=500, batch_size=32, seq_len=32, d_model=64, heads=4, layers=2, lr=3e-3, warmup=50),
    "listops": dict(steps=800, batch_size=32, seq_len=32, d_model=32, heads=2, layers=2, lr=2e-3, warmup=50),
    "image":   dict(steps=400, batch_size=32, seq_len=64, d_model=32, heads=2, layers=2, lr=2e-3, warmup=50),
    "recall":  dict(steps=300, batch_size=32, seq_len=32, d_model=32, heads=2, layers=1, lr=3e-3, warmup=30),
}


class Task:
    """Base: ``name``, ``mode``, vocabularies, ``max_len``, ``batch``, ``eval_batches``."""

    name = ""
    mode = ""
    metric = "token_accuracy"
    n_classes = None

    def __init__(self, seq_len, seed=0, n_eval=256):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        self.seq_len, self.seed, self.n_eval = seq_len, seed, n_eval
        self._eval = None

    @property
    def max_len(self):
        """Longest sequence the model sees (positions it needs)."""
        return self.seq_len

    def eval_batches(self, size=64):
        """The fixed held-out set (drawn from the task's seed, never from the training generator)."""
        if self._eval is None:
            rng = np.random.default_rng([self.seed, 7919])
            self._eval = self._draw(rng, self.n_eval, held_out=True)
        n = next(iter(self._eval.values())).shape[0]
        return [{k: v[i:i + size] for k, v in self._eval.items()} for i in range(0, n, size)]

    def batch(self, rng, size):
        return self._draw(rng, size, held_out=False)

    def _draw(self, rng, size, held_out):
        raise NotImplementedError


# --------------------------------------------------------------------------- copy / reverse
class Copy(Task):
    """Source: ``seq_len`` random symbols; target: the same symbols (``reverse``: reversed).

    Vocabulary: 0 = PAD, 1 = BOS, symbols 2 .. 2 + n_symbols - 1. The decoder
    input is [BOS, y_0, ..., y_{N-2}].
    """

    name, mode = "copy", "encoder-decoder"
    PAD, BOS = 0, 1

    def __init__(self, seq_len=10, seed=0, n_symbols=10, n_eval=256):
        super().__init__(seq_len, seed, n_eval)
        self.n_symbols = n_symbols
        self.src_vocab = self.tgt_vocab = self.vocab = n_symbols + 2

    def _target(self, src):
        return src

    def _draw(self, rng, size, held_out):
        src = rng.integers(2, 2 + self.n_symbols, size=(size, self.seq_len))      # (B, M)
        y = self._target(src)                                                      # (B, N)
        tgt = np.concatenate([np.full((size, 1), self.BOS), y[:, :-1]], axis=1)    # (B, N) teacher forcing
        return {"src": src, "tgt": tgt, "y": y}


class Reverse(Copy):
    name = "reverse"

    def _target(self, src):
        return src[:, ::-1].copy()


# --------------------------------------------------------------------------- character LM
LM_MODULES = ("abc", "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
              "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "glob",
              "heapq", "inspect", "io", "ipaddress", "itertools", "json", "logging", "operator", "os",
              "pathlib", "pickle", "pprint", "random", "re", "shutil", "statistics", "string", "subprocess",
              "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest", "uuid", "warnings",
              "zipfile")


def stdlib_text(modules=LM_MODULES):
    """English text available offline: the docstrings of standard-library modules and of
    their public members, in a fixed order (sorted names). Deterministic for one Python version."""
    import importlib
    import warnings

    with warnings.catch_warnings():       # typing.io / typing.re warn when touched
        warnings.simplefilter("ignore", DeprecationWarning)
        return _stdlib_text(modules, importlib)


def _stdlib_text(modules, importlib):
    parts = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        doc = inspect.getdoc(mod)
        if doc:
            parts.append(doc)
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == mod.__name__:
                d = inspect.getdoc(obj)
                if d:
                    parts.append(d)
    return "\n\n".join(parts)


class CharLM(Task):
    """Next-character prediction. Vocabulary: 0 = newline, 1..95 = ASCII 32..126, 96 = any other.

    The text is split at 90%: training windows are drawn anywhere in the first
    part, the held-out windows are evenly spaced in the last 10%.
    """

    name, mode = "lm", "decoder"

    def __init__(self, seq_len=48, seed=0, n_eval=128, text=None):
        super().__init__(seq_len, seed, n_eval)
        self.text = stdlib_text() if text is None else text
        codes = np.frombuffer(self.text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.where((codes >= 32) & (codes <= 126), codes - 31, 96)
        ids[codes == 10] = 0
        self.ids = ids
        self.vocab = 97
        cut = int(0.9 * len(ids))
        self.train_ids, self.test_ids = ids[:cut], ids[cut:]
        if len(self.test_ids) < seq_len + 2:
            raise ValueError(f"text too short for seq_len={seq_len}")

    @staticmethod
    def decode(ids):
        return "".join("\n" if i == 0 else (chr(int(i) + 31) if i < 96 else "?") for i in np.asarray(ids).ravel())

    def _windows(self, data, starts):
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]                # (B, N + 1)
        w = data[idx]
        return {"x": w[:, :-1], "y": w[:, 1:]}

    def _draw(self, rng, size, held_out):
        data = self.test_ids if held_out else self.train_ids
        hi = len(data) - self.seq_len - 1
        starts = (np.linspace(0, hi, size).astype(np.int64) if held_out
                  else rng.integers(0, hi + 1, size=size))
        return self._windows(data, starts)


# --------------------------------------------------------------------------- ListOps
LISTOPS_TOKENS = ("<pad>",) + tuple(str(i) for i in range(10)) + ("[MIN", "[MAX", "[MED", "[SM", "]")
_TOK = {t: i for i, t in enumerate(LISTOPS_TOKENS)}
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
VALUE_P = 0.25  # LRA: probability that a node below max depth is a list


def listops_tree(rng, depth, max_depth, max_args):
    """LRA's ``generate_tree``: a value 0-9, or (operator, [children]); returns (tree, token count)."""
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        return int(rng.integers(10)), 1
    n_args = int(rng.integers(2, max_args + 1))
    children, length = [], 2
    for _ in range(n_args):
        t, n = listops_tree(rng, depth + 1, max_depth, max_args)
        children.append(t)
        length += n
    return (OPERATORS[int(rng.integers(len(OPERATORS)))], children), length


def listops_value(tree):
    """Evaluate a tree: MIN, MAX, MED (int of the median, as LRA), SM (sum mod 10)."""
    if isinstance(tree, int):
        return tree
    op, children = tree
    vals = [listops_value(c) for c in children]
    if op == "[MIN":
        return min(vals)
    if op == "[MAX":
        return max(vals)
    if op == "[SM":
        return sum(vals) % 10
    s = sorted(vals)
    mid = len(s) // 2
    return int(s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2)


def listops_tokens(tree):
    if isinstance(tree, int):
        return [str(tree)]
    op, children = tree
    out = [op]
    for c in children:
        out += listops_tokens(c)
    return out + ["]"]


class ListOps(Task):
    """ListOps sequences of ``min_len``..``seq_len`` tokens, padded with 0 (``mask`` marks real tokens).

    Defaults for short sequences: max depth 3, at most 4 arguments (LRA: depth 10,
    10 arguments, 500-2000 tokens).
    """

    name, mode, metric = "listops", "encoder", "class_accuracy"
    n_classes = 10

    def __init__(self, seq_len=32, seed=0, n_eval=512, max_depth=None, max_args=None, min_len=None):
        super().__init__(seq_len, seed, n_eval)
        self.vocab = len(LISTOPS_TOKENS)
        self.max_depth = max_depth or max(2, min(10, int(math.log2(seq_len)) - 2))
        self.max_args = max_args or max(2, min(10, seq_len // 8))
        self.min_len = min_len or max(4, seq_len // 4)
        if self.min_len > seq_len:
            raise ValueError(f"min_len={self.min_len} exceeds seq_len={seq_len}")

    def sample(self, rng):
        while True:
            tree, n = listops_tree(rng, 1, self.max_depth, self.max_args)
            if self.min_len <= n <= self.seq_len:
                return tree

    def _draw(self, rng, size, held_out):
        x = np.zeros((size, self.seq_len), dtype=np.int64)
        y = np.zeros(size, dtype=np.int64)
        for i in range(size):
            tree = self.sample(rng)
            toks = [_TOK[t] for t in listops_tokens(tree)]
            x[i, :len(toks)] = toks
            y[i] = listops_value(tree)
        return {"x": x, "mask": x != 0, "y": y}


# --------------------------------------------------------------------------- images
class Shapes(Task):
    """Binary ``side`` x ``side`` images of one shape, read as a sequence of ``side**2`` pixel tokens
    (row-major; token 0 = background, 1 = ink), with 3% of the pixels flipped.

    Classes: 0 circle (ring), 1 square (outline), 2 cross (+), 3 line (horizontal,
    vertical or diagonal); random centre and size. ``image_shape`` is (side, side)
    for 2-D attention mechanisms.
    """

    name, mode, metric = "image", "encoder", "class_accuracy"
    CLASSES = ("circle", "square", "cross", "line")
    n_classes = 4

    def __init__(self, seq_len=64, seed=0, n_eval=512, noise=0.03):
        super().__init__(seq_len, seed, n_eval)
        side = int(round(math.sqrt(seq_len)))
        if side * side != seq_len or side < 6:
            raise ValueError(f"seq_len must be a square side*side with side >= 6 for the image task, got {seq_len}")
        self.side, self.image_shape, self.noise, self.vocab = side, (side, side), noise, 2

    def draw_image(self, rng, cls):
        s = self.side
        yy, xx = np.mgrid[0:s, 0:s]
        r = int(rng.integers(2, max(3, s // 2 - 1) + 1))                 # integer radius / half-size
        cy, cx = rng.integers(r, s - r, size=2)                           # integer centre inside the image
        if cls == 0:
            img = np.abs(np.hypot(yy - cy, xx - cx) - r) < 0.5
        elif cls == 1:
            d = np.maximum(np.abs(yy - cy), np.abs(xx - cx))
            img = d == r
        elif cls == 2:
            img = ((yy == cy) & (np.abs(xx - cx) <= r)) | ((xx == cx) & (np.abs(yy - cy) <= r))
        else:
            kind = int(rng.integers(3))
            if kind == 0:
                img = (yy == cy) & (np.abs(xx - cx) <= r)
            elif kind == 1:
                img = (xx == cx) & (np.abs(yy - cy) <= r)
            else:
                sign = 1 if rng.random() < 0.5 else -1
                img = ((yy - cy) == sign * (xx - cx)) & (np.abs(xx - cx) <= r)
        flip = rng.random((s, s)) < self.noise
        return (img ^ flip).astype(np.int64)

    def _draw(self, rng, size, held_out):
        y = rng.integers(self.n_classes, size=size)
        x = np.stack([self.draw_image(rng, int(c)).reshape(-1) for c in y])       # (B, side * side)
        return {"x": x, "y": y}


_CLASSES = {"copy": Copy, "reverse": Reverse, "lm": CharLM, "listops": ListOps, "image": Shapes}  # recall: below


def make_task(name, *, seq_len=None, seed=0, **kw):
    """The task ``name`` (one of :data:`TASKS`) with its default ``seq_len`` unless given."""
    if name not in _CLASSES:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    seq_len = DEFAULTS[name]["seq_len"] if seq_len is None else seq_len
    return _CLASSES[name](seq_len=seq_len, seed=seed, **kw)


# --------------------------------------------------------------------------- recall at a distance
class DistantRecall(Task):
    """Decoder task whose answers lie exactly ``lag`` positions back: a window that short cannot learn it.

    A sequence of ``2 * lag`` symbols whose second half repeats the first: x[t] = x[t - lag] for
    t >= lag. The model predicts the next symbol (y[t] = x[t + 1]); only the targets that are
    determined by the past count (t + 1 >= lag, the others are IGNORE), and the answer to the query
    at t is the token at t + 1 - lag, ``lag - 1`` positions back. A mechanism whose stacked layers
    cannot reach that far sees only independent random symbols and stays at chance,
    1 / ``n_symbols``; full attention learns the fixed-offset lookup. Vocabulary: the symbols
    0 .. n_symbols - 1. In :data:`TASKS` as ``recall`` (``seq_len`` = 2 lag): cut into segments of
    ``lag`` tokens, every answer of the second segment lies in the first, so a Transformer-XL
    without memory stays at chance there and one with a memory of ``lag`` states can learn it
    (``train --task recall --arch xl --segment 16 --mem-len 16|0``; notebook 07).
    """

    name, mode = "recall", "decoder"

    def __init__(self, lag=20, seed=0, n_symbols=8, n_eval=256, seq_len=None):
        if seq_len is not None:
            if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 4 or seq_len % 2:
                raise ValueError(f"seq_len must be an even integer >= 4 (the recall task is two halves), got {seq_len!r}")
            lag = seq_len // 2
        if isinstance(lag, bool) or not isinstance(lag, int) or lag < 2:
            raise ValueError(f"lag must be an integer >= 2, got {lag!r}")
        if isinstance(n_symbols, bool) or not isinstance(n_symbols, int) or n_symbols < 2:
            raise ValueError(f"n_symbols must be an integer >= 2, got {n_symbols!r}")
        super().__init__(2 * lag, seed, n_eval)
        self.lag, self.n_symbols, self.vocab = lag, n_symbols, n_symbols

    @property
    def chance(self):
        """The accuracy of a model that cannot see the answer: 1 / n_symbols."""
        return 1.0 / self.n_symbols

    def _draw(self, rng, size, held_out):
        from ..nn.functional import IGNORE

        first = rng.integers(0, self.n_symbols, size=(size, self.lag))                  # (B, lag)
        seq = np.concatenate([first, first, first[:, :1]], axis=1)[:, :self.seq_len + 1]  # (B, N + 1)
        x, y = seq[:, :-1], seq[:, 1:].copy()                                           # (B, N) each
        y[:, :self.lag - 1] = IGNORE                                                    # not yet determined
        return {"x": x, "y": y}


_CLASSES["recall"] = DistantRecall
TASK_MODES = {name: cls.mode for name, cls in _CLASSES.items()}   # task -> "encoder" | "decoder" | "encoder-decoder"
