"""Optimizers, gradient clipping and the learning-rate schedule.

Optimizers update a dict ``{name: array}`` of parameters *in place* (the
arrays a :class:`~effattn.nn.modules.Module` holds, from
``dict(model.parameters())``) given a dict of gradients with the same names.
Their state (moments, step count) is a flat dict of arrays, so it goes into a
``.npz`` checkpoint beside the parameters; ``load_state_dict`` checks every
name and shape before touching anything (never half-loaded).

Non-finite numbers are refused, never spread: ``step`` raises
:class:`NonFiniteGradient` (a ValueError naming the parameter) when a
gradient holds NaN or inf, before changing the parameters or the state (the
moments and the step count), and :func:`clip_grad_norm` raises it too,
scaling nothing, instead of turning an infinite norm into NaN gradients.

SGD with momentum (Polyak / PyTorch convention, ``v <- mu v + g``; ``p <- p - lr v``)
and Adam (Kingma & Ba, 2015, https://arxiv.org/abs/1412.6980), with bias correction:

    m_t = b1 m_{t-1} + (1 - b1) g          v_t = b2 v_{t-1} + (1 - b2) g^2
    m^ = m_t / (1 - b1^t)                   v^ = v_t / (1 - b2^t)
    p <- p - lr (m^ / (sqrt(v^) + eps) + wd p)       (decoupled weight decay, AdamW, if wd > 0)
"""
from __future__ import annotations

import math

from ..backend import get_namespace
from ..validate import NonFiniteError, check_int


def _check_lr(lr):
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    return float(lr)


class NonFiniteGradient(NonFiniteError):
    """A gradient holds NaN or inf (the message names the parameter); nothing was changed."""


def _nonfinite_names(grads):
    return [k for k, g in grads.items() if not bool(get_namespace(g).isfinite(g).all())]


def _refuse_nonfinite(grads):
    bad = _nonfinite_names(grads)
    if bad:
        raise NonFiniteGradient(f"the gradient of {bad[0]!r} is not finite (NaN or inf)"
                                + (f", and of {len(bad) - 1} more" if len(bad) > 1 else "")
                                + "; nothing was changed")


def clip_grad_norm(grads, max_norm):
    """Scale every gradient in place so the global L2 norm is at most ``max_norm``.

    norm = sqrt(sum_i ||g_i||^2) (summed in float64, so finite float32 gradients never give an
    infinite norm); if norm > max_norm: g_i <- g_i * max_norm / norm. Returns the norm before
    clipping (a Python float). A NaN or inf gradient raises :class:`NonFiniteGradient` naming the
    parameter, and nothing is scaled.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm!r}")
    total = 0.0
    for g in grads.values():
        g64 = g.astype("float64", copy=False)
        total += float((g64 * g64).sum())
    if not math.isfinite(total):
        _refuse_nonfinite(grads)
    norm = math.sqrt(total)
    if norm > max_norm:
        scale = max_norm / (norm + 1e-12)
        for g in grads.values():
            g *= scale
    return norm


class Optimizer:
    """Shared bookkeeping: the parameter dict, the step counter, state save/load."""

    slots: tuple = ()

    def __init__(self, params, lr):
        self.params = dict(params)
        if not self.params:
            raise ValueError("params is empty")
        self.lr = _check_lr(lr)
        self.t = 0
        self.state = {s: {k: get_namespace(p).zeros_like(p) for k, p in self.params.items()} for s in self.slots}

    def _check_grads(self, grads):
        """Every parameter's gradient is present, of its shape and finite (:class:`NonFiniteGradient`
        otherwise); checked before :meth:`step` changes anything."""
        missing = [k for k in self.params if k not in grads]
        if missing:
            raise ValueError(f"grads is missing {missing}")
        for k, p in self.params.items():
            if tuple(grads[k].shape) != tuple(p.shape):
                raise ValueError(f"grads[{k!r}] has shape {tuple(grads[k].shape)}, expected {tuple(p.shape)}")
        _refuse_nonfinite({k: grads[k] for k in self.params})

    def state_dict(self):
        """Flat dict: ``"t"`` plus ``"<slot>/<param name>"`` arrays."""
        out = {"t": self.t}
        for s in self.slots:
            for k, a in self.state[s].items():
                out[f"{s}/{k}"] = a
        return out

    def load_state_dict(self, state):
        """Restore a :meth:`state_dict`; every entry is checked first, nothing changes on error."""
        t = self.check_state_dict(state)
        from ..backend import asarray

        for s in self.slots:
            for k, p in self.params.items():
                self.state[s][k] = asarray(state[f"{s}/{k}"], dtype=p.dtype).copy()
        self.t = t

    def check_state_dict(self, state):
        """Raise ValueError unless ``state`` matches this optimizer's parameters; returns the step."""
        want = {f"{s}/{k}": p.shape for s in self.slots for k, p in self.params.items()}
        missing = sorted(set(want) - set(state)) + ([] if "t" in state else ["t"])
        extra = sorted(set(state) - set(want) - {"t"})
        wrong = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k])]
        if missing or extra or wrong:
            raise ValueError(f"optimizer state does not match: missing {missing}, unexpected {extra}, wrong shapes {wrong}")
        t = state["t"]
        kind = getattr(getattr(t, "dtype", None), "kind", "i" if isinstance(t, int) and not isinstance(t, bool) else "")
        if kind not in ("i", "u") or getattr(t, "ndim", 0) != 0 or int(t) < 0:
            raise ValueError(f"optimizer step t must be one integer >= 0, got {t!r}")
        return int(t)


class SGD(Optimizer):
    """p <- p - lr v,  v <- momentum v + g  (plain SGD when momentum = 0).

    ``step(grads)`` raises :class:`NonFiniteGradient` naming the parameter when a gradient is
    NaN or inf, leaving the parameters, the velocity and the step count unchanged."""

    slots = ("velocity",)

    def __init__(self, params, lr=0.01, momentum=0.0):
        super().__init__(params, lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)

    def step(self, grads):
        self._check_grads(grads)
        self.t += 1
        for k, p in self.params.items():
            v = self.state["velocity"][k]
            v *= self.momentum
            v += grads[k]
            p -= self.lr * v


class Adam(Optimizer):
    """Adam with bias correction (and optional decoupled weight decay, AdamW).

    ``step(grads)`` raises :class:`NonFiniteGradient` naming the parameter when a gradient is
    NaN or inf, leaving the parameters, the moments ``m``, ``v`` and the step count ``t`` unchanged."""

    slots = ("m", "v")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.b1, self.b2, self.eps, self.weight_decay = float(b1), float(b2), float(eps), float(weight_decay)

    def step(self, grads):
        self._check_grads(grads)
        self.t += 1
        c1 = 1.0 - self.b1 ** self.t                  # bias corrections (Python floats)
        c2 = 1.0 - self.b2 ** self.t
        for k, p in self.params.items():
            g = grads[k]
            xp = get_namespace(p)
            m, v = self.state["m"][k], self.state["v"][k]
            m *= self.b1
            m += (1.0 - self.b1) * g                  # m_t = b1 m + (1 - b1) g
            v *= self.b2
            v += (1.0 - self.b2) * (g * g)            # v_t = b2 v + (1 - b2) g^2
            update = (m / c1) / (xp.sqrt(v / c2) + self.eps)
            if self.weight_decay:
                update = update + self.weight_decay * p
            p -= self.lr * update


class WarmupDecay:
    """Learning rate at step t (1-based, the step about to be taken):

    * linear warmup: lr * t / warmup for t <= warmup;
    * then ``"invsqrt"``: lr * sqrt(warmup / t) (Vaswani et al.; needs no horizon,
      so a resumed run follows the same curve whatever its total length), or
      ``"cosine"``: min_lr + (lr - min_lr) (1 + cos(pi u)) / 2, u = (t - warmup) / (total - warmup),
      or ``"linear"``: lr - (lr - min_lr) u, or ``"constant"``.
    """

    KINDS = ("invsqrt", "cosine", "linear", "constant")

    def __init__(self, lr, warmup=0, total=None, kind="invsqrt", min_lr=0.0):
        self.lr = _check_lr(lr)
        self.warmup = check_int("warmup", warmup, minimum=0)
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        if kind in ("cosine", "linear"):
            total = check_int("total", total, minimum=1)
        self.total, self.kind, self.min_lr = total, kind, float(min_lr)

    def __call__(self, t):
        t = check_int("t", t, minimum=1)
        if self.warmup and t <= self.warmup:
            return self.lr * t / self.warmup
        if self.kind == "constant":
            return self.lr
        if self.kind == "invsqrt":
            return self.lr * math.sqrt(max(self.warmup, 1) / t)
        u = min(1.0, (t - self.warmup) / max(self.total - self.warmup, 1))
        if self.kind == "cosine":
            return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * u))
        return self.lr - (self.lr - self.min_lr) * u
