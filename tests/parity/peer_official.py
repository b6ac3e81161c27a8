"""Parity fixtures against the official Set Transformer code: ISAB and PMA.

Peer: github.com/juho-lee/set_transformer, ``modules.py`` (classes ``MAB``, ``ISAB``, ``PMA``; not on
PyPI). It is *not* copied here: at generation time it is loaded from a local copy outside the
repository, the first that exists of

- ``$SET_TRANSFORMER`` (a checkout holding ``modules.py``, or that file itself),
- ``/work/peers/set_transformer/modules.py``,
- the git mirror ``/work/.mirror/juho-lee+set_transformer/repo`` (read with ``git show HEAD:modules.py``).

If none exists, :func:`generate` writes nothing and says so (tests/test_mab.py holds a NumPy
transcription of the official MAB for the unit tests).

Mapping (effattn ``form="official"``, float64, batch of 2 sets): every ``nn.Linear`` (out, in) weight
is effattn's (in, out) ``W`` transposed; ``fc_q`` -> ``Wq, bq``, ``fc_k`` -> ``Wk`` (its bias adds the
same q . b_k to every logit of a row and cancels in the softmax: effattn has no ``bk``, and the
peer's gradient of it is zero up to rounding), ``fc_v`` -> ``Wv, bv``, ``fc_o`` -> ``W1, b1`` (the
official ``O + relu(fc_o(O))``), ``ln0``/``ln1`` -> ``ln0_g, ln0_b, ln1_g, ln1_b``; ISAB's ``I``
(1, m, D) -> ``I`` (m, D) with ``mab0`` = MAB(I, X), ``mab1`` = MAB(X, H); PMA's ``S`` (1, k, D) ->
``S`` (k, D), ``mab`` = MAB(S, X). Every parameter gradient is in the fixture. The official code has
no masks, so neither have the fixtures. Cases: ``isab`` ``ln`` (D_in = 3 != D = 4, LayerNorms on)
and ``noln`` (the official default ``ln=False``), ``pma`` ``ln`` and ``noln``.

Run: ``cd /work/main && PYTHONPATH=/work/main:/work/main/tests/parity /work/peers/bin/python
tests/parity/generate.py official``.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import types

import numpy as np
import torch

from torch_tools import DT, t2n, write

MIRROR = pathlib.Path("/work/.mirror/juho-lee+set_transformer/repo")
CHECKOUTS = [os.environ.get("SET_TRANSFORMER", ""), "/work/peers/set_transformer/modules.py"]


# --------------------------------------------------------------------------- helpers of this peer
def load_official():
    """(the official modules.py as a module, its version string), or (None, why)."""
    for place in filter(None, CHECKOUTS):
        path = pathlib.Path(place)
        path = path / "modules.py" if path.is_dir() else path
        if path.is_file():
            return _module(path.read_text(), str(path)), f"modules.py from {path}"
    if MIRROR.exists():
        git = ["git", "--git-dir", str(MIRROR)]
        text = subprocess.run(git + ["show", "HEAD:modules.py"], capture_output=True, text=True, check=True).stdout
        commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        return _module(text, f"{MIRROR}:modules.py"), f"git {commit}"
    return None, "no local copy of juho-lee/set_transformer modules.py (set $SET_TRANSFORMER)"


def _module(text, origin):
    mod = types.ModuleType("set_transformer_modules")
    mod.__file__ = origin
    exec(compile(text, origin, "exec"), vars(mod))
    return mod


def jitter_layer_norms(module, rng):
    """LayerNorm gains 1 + 0.1 N(0, 1), offsets 0.1 N(0, 1), so a swapped gain / offset would show."""
    with torch.no_grad():
        for ln in (m for m in module.modules() if isinstance(m, torch.nn.LayerNorm)):
            ln.weight.copy_(1 + 0.1 * torch.as_tensor(rng.standard_normal(ln.weight.shape)))
            ln.bias.copy_(0.1 * torch.as_tensor(rng.standard_normal(ln.bias.shape)))


def mab_arrays(mab, prefix, use_grad=False):
    """One official MAB's parameters (or their gradients) under effattn's names."""
    get = (lambda p: p.grad) if use_grad else (lambda p: p)
    out = {f"{prefix}Wq": get(mab.fc_q.weight).T, f"{prefix}bq": get(mab.fc_q.bias),
           f"{prefix}Wk": get(mab.fc_k.weight).T,
           f"{prefix}Wv": get(mab.fc_v.weight).T, f"{prefix}bv": get(mab.fc_v.bias),
           f"{prefix}W1": get(mab.fc_o.weight).T, f"{prefix}b1": get(mab.fc_o.bias)}
    if getattr(mab, "ln0", None) is not None:
        out.update({f"{prefix}ln0_g": get(mab.ln0.weight), f"{prefix}ln0_b": get(mab.ln0.bias),
                    f"{prefix}ln1_g": get(mab.ln1.weight), f"{prefix}ln1_b": get(mab.ln1.bias)})
    return {k: t2n(v) for k, v in out.items()}


def run_and_save(name, *, mechanism, peer, peer_version, case, module, mabs, learned, x, heads, ln, note, seed):
    """Forward and backward of the official module on x; effattn's differences; the fixture."""
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    dout = np.random.default_rng(seed).standard_normal(tuple(out.shape))
    (out * torch.as_tensor(dout)).sum().backward()
    inputs = {"x": t2n(x), learned: t2n(getattr(module, learned))[0]}
    grads = {"x": t2n(x.grad), learned: t2n(getattr(module, learned).grad)[0]}
    for prefix, mab in mabs.items():
        inputs.update(mab_arrays(mab, prefix))
        grads.update(mab_arrays(mab, prefix, use_grad=True))
    bk = max(float(mab.fc_k.bias.grad.abs().max()) for mab in mabs.values())
    config = {"heads": heads, "ln": ln, "form": "official"}
    path, _ = write(name, mechanism=mechanism, peer=peer, peer_version=peer_version, case=case, config=config,
                    inputs=inputs, out=t2n(out), dout=dout, grads=grads,
                    note=note + f" The peer's fc_k.bias gradient is {bk:.0e} (it cancels in the softmax).")
    return path


# --------------------------------------------------------------------------- ISAB, PMA
def isab_fixture(mod, version, case, *, ln, d_in, D, heads, m, n, seed):
    torch.manual_seed(seed)
    isab = mod.ISAB(d_in, D, heads, m, ln=ln).to(DT)
    jitter_layer_norms(isab, np.random.default_rng(seed))
    x = torch.randn(2, n, d_in, dtype=DT)
    note = (f"official ISAB(dim_in={d_in}, dim_out={D}, num_heads={heads}, num_inds={m}, ln={ln}) -> effattn isab "
            "form='official': I = ISAB.I[0], mab0_* = mab0 (MAB(I, X)), mab1_* = mab1 (MAB(X, H)), each Linear's "
            "weight transposed, fc_o -> W1, b1, no key bias.")
    return run_and_save(f"isab__official_set_transformer__{case}", mechanism="isab", peer="set_transformer.ISAB",
                        peer_version=version, case=case, module=isab, mabs={"mab0_": isab.mab0, "mab1_": isab.mab1},
                        learned="I", x=x, heads=heads, ln=ln, note=note, seed=seed)


def pma_fixture(mod, version, case, *, ln, D, heads, k, n, seed):
    torch.manual_seed(seed)
    pma = mod.PMA(D, heads, k, ln=ln).to(DT)
    jitter_layer_norms(pma, np.random.default_rng(seed))
    x = torch.randn(2, n, D, dtype=DT)
    note = (f"official PMA(dim={D}, num_heads={heads}, num_seeds={k}, ln={ln}) -> effattn pma form='official' "
            "(MAB(S, X), no rFF on X): S = PMA.S[0], mab_* = mab, each Linear's weight transposed, fc_o -> W1, b1, "
            "no key bias.")
    return run_and_save(f"pma__official_set_transformer__{case}", mechanism="pma", peer="set_transformer.PMA",
                        peer_version=version, case=case, module=pma, mabs={"mab_": pma.mab}, learned="S", x=x,
                        heads=heads, ln=ln, note=note, seed=seed)


def generate():
    mod, version = load_official()
    if mod is None:
        print(f"  official: skipped: {version}")
        return []
    return [isab_fixture(mod, version, "ln", ln=True, d_in=3, D=4, heads=2, m=3, n=7, seed=30),
            isab_fixture(mod, version, "noln", ln=False, d_in=4, D=4, heads=2, m=3, n=6, seed=31),
            pma_fixture(mod, version, "ln", ln=True, D=4, heads=2, k=2, n=7, seed=32),
            pma_fixture(mod, version, "noln", ln=False, D=4, heads=1, k=1, n=5, seed=33)]
