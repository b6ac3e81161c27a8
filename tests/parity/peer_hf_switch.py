"""Parity fixtures for effattn ``switch`` (top-1 Switch) against HuggingFace transformers'
``SwitchTransformersSparseMLP`` (its ``SwitchTransformersTop1Router`` and
``SwitchTransformersExperts``) and its ``load_balancing_loss_func`` / ``router_z_loss_func``
(transformers 5.24.0, ``models/switch_transformers/modeling_switch_transformers.py``).

The peer's own modules run in float64 on the CPU in eval mode (``SwitchTransformersConfig(d_model=D,
d_ff=F, num_experts=E, expert_capacity=C, router_bias=False, router_jitter_noise=0,
dense_act_fn="relu", dropout_rate=0)``, ``.double()``), x is a leaf and autograd gives the gradients
of x and of every peer parameter. Mapping (effattn's parameters copied into the peer):

    router.classifier.weight (E, D)      = Wr.T                     (no bias on either side)
    experts.expert_e.wi.weight (F, D)    = W1[e].T                  (no bias in HF)
    experts.expert_e.wo.weight (D, F)    = W2[e].T                  (no bias in HF)
    b1 = 0, b2 = 0                        (HF's experts are wi -> act -> wo without biases)
    dense_act_fn = "relu"                 (effattn's experts are ReLU FFNs, nn.experts)
    the peer's gradients, transposed back, -> grad.x, grad.Wr, grad.W1, grad.W2

The bias gradients grad.b1 / grad.b2 are not in the fixtures: the peer has no biases to give one.

Conventions, and how each case meets them:

- Precision. The router's "selective precision" dtype is float32 by default and the config only
  accepts float32 / float16 / bfloat16; the generator sets ``router.dtype = torch.float64`` on the
  instance after construction, so the router (logits, softmax) runs in the fixture's float64.
- Jitter. HF multiplies the router input by ``uniform(1 - eps, 1 + eps)`` in training mode, the
  same multiplicative form as effattn's :func:`draw_jitter`, but in place: ``hidden_states.to(
  router_dtype)`` is the caller's tensor itself when the dtypes agree, so ``*=`` also jitters the
  tensor the experts then read (measured: the input of ``SparseMLP.forward`` is changed, in
  float32 with the default router dtype as well as in float64; on a leaf x it raises "a leaf
  Variable that requires grad is being used in an in-place operation"). effattn's experts see x
  itself (the paper's form). Not matched: every case runs the peer in eval mode (no jitter) and
  effattn with ``jitter=None``.
- Capacity. HF takes an integer ``expert_capacity`` C; effattn C = ceil(capacity_factor T_real / E).
  The cases choose capacity_factor so that both C agree (``top1_capacity``) or nothing can drop.
- Dropped tokens. HF's experts start from zeros and ``index_add_`` only the dispatched tokens, so a
  dropped token's SparseMLP output is 0 (the residual is added outside, in
  ``SwitchTransformersLayerFF``), which is effattn's convention: every row is compared, no ``rows``.
  Its gate (the max probability) then gets no gradient, as in effattn.
- Priority order. HF's queue is ``cumsum(one_hot(argmax p), dim=-2)``: token order along the
  sequence, not sorted by router probability (whatever its class docstring says), counted per
  sequence (``Route on the unflattened hidden states so that expert capacity is accounted per
  sequence``). effattn's queue is every token of the call in row-major order (batch, then
  position). The two agree for one sequence: ``top1_capacity`` has B = 1 (with B > 1 effattn's
  sequence 2 queues behind sequence 1; HF gives each sequence its own C).
- Auxiliary losses. ``router_z_loss_func(logits) = sum(logsumexp^2) / (G T_g)`` over all tokens:
  effattn's L_z for any batch. ``load_balancing_loss_func(probs, argmax logits) = E^2 mean_{g,i}
  f_gi P_gi`` with f_gi, P_gi the top-1 share and mean probability of expert i within group g (the
  batch axis: a group is a sequence), i.e. E (1/G) sum_g sum_i f_gi P_gi. f counts the argmax of the
  logits before any dropping, as effattn's f does (``SwitchTransformersForConditionalGeneration``
  passes ``router_logits.argmax(-1)``). For G = 1 this is effattn's E sum_i f_i P_i; for G > 1 HF
  averages per-sequence products where effattn multiplies the call's f and P (the ``aux`` note
  records how far the two are apart for its batch). ``aux`` (B = 2) therefore calls both HF
  functions on the call seen as one group, the logits viewed as (1, B N, E), which is effattn's
  grouping. HF casts the one-hot f to float32: T = 16 tokens makes every f_i = count / 16 exact.
  The torch objective is sum(dout * out) + aux_weight * HF balance + z_weight * HF z-loss, whose
  gradients effattn's backward returns (its aux losses are folded into it).
- Top-2 (GShard, effattn ``k=2``) has no HF peer in this module (the Top1Router only): not here.

Cases (E 4, D 6, F 5): ``top1`` (B 2, N 8, HF capacity 16, effattn capacity_factor None: nothing
dropped, aux weights 0), ``top1_capacity`` (B 1, N 16, capacity_factor 1.0 -> C = 4 = HF's
expert_capacity; the seed makes tokens drop), ``aux`` (B 2, N 8, nothing dropped, aux_weight 0.7,
z_weight 0.3).

Run: ``cd /work/main && PYTHONPATH=/work/main:/work/main/tests/parity /root/peers/bin/python
tests/parity/generate.py hf_switch``.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers
from transformers import SwitchTransformersConfig
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersSparseMLP, load_balancing_loss_func, router_z_loss_func)

from effattn.layers.switch import aux_losses, init_params
from torch_tools import DT, effattn_diffs, leaf, t2n, write

PEER = "transformers.SwitchTransformersSparseMLP"
D, F, E = 6, 5, 4


def peer_module(params, capacity):
    """The peer's SparseMLP in float64 / eval, effattn's Wr, W1, W2 copied in."""
    cfg = SwitchTransformersConfig(d_model=D, d_ff=F, num_experts=E, expert_capacity=capacity, router_bias=False,
                                   router_jitter_noise=0.0, dense_act_fn="relu", dropout_rate=0.0)
    m = SwitchTransformersSparseMLP(cfg).to(DT).eval()
    m.router.dtype = DT                      # the config only takes float32 / float16 / bfloat16
    with torch.no_grad():
        m.router.classifier.weight.copy_(torch.tensor(params["Wr"].T))
        for e in range(E):
            m.experts[f"expert_{e}"].wi.weight.copy_(torch.tensor(params["W1"][e].T))
            m.experts[f"expert_{e}"].wo.weight.copy_(torch.tensor(params["W2"][e].T))
    return m


def switch_case(rng, case, *, b, n, capacity_factor, hf_capacity, aux_weight=0.0, z_weight=0.0, expect_drop=False):
    params = {k: np.asarray(v) for k, v in init_params(rng, D, F, E).items()}
    params["b1"], params["b2"] = np.zeros((E, F)), np.zeros((E, D))
    x = rng.standard_normal((b, n, D))
    m = peer_module(params, hf_capacity)
    xl = leaf(x)
    logits = {}
    m.router.register_forward_hook(lambda mod, inp, o: logits.update(l=o[2]))
    out = m(xl)
    dout = rng.standard_normal(out.shape)
    total = (out * torch.as_tensor(dout, dtype=DT)).sum()
    note = ("HF SparseMLP (eval, float64 router, relu experts, no biases: b1 = b2 = 0, no bias grads); "
            "Wr = classifier.weight.T, W1[e] = wi.weight.T, W2[e] = wo.weight.T.")
    extra = ""
    if aux_weight or z_weight:
        lg = logits["l"].reshape(1, b * n, E)                  # the call as one group: effattn's grouping
        balance = load_balancing_loss_func(torch.softmax(lg, dim=-1), lg.argmax(dim=-1))
        zloss = router_z_loss_func(lg)
        total = total + aux_weight * balance + z_weight * zloss
        per_seq = load_balancing_loss_func(torch.softmax(logits["l"], -1), logits["l"].argmax(-1)).item()
        extra = (f" Objective sum(dout*out) + {aux_weight} * load_balancing_loss_func + {z_weight} * "
                 f"router_z_loss_func, both on the logits viewed as (1, B N, E) (effattn's one group per call); "
                 f"HF balance {balance.item():.6f}, z {zloss.item():.6f}; HF's per-sequence balance (groups = "
                 f"the B sequences) would be {per_seq:.6f}.")
        print(f"  {case}: balance one group {balance.item():.12f}, per sequence {per_seq:.12f}, z {zloss.item():.12f}")
    plist = [xl, m.router.classifier.weight] + [m.experts[f"expert_{e}"].wi.weight for e in range(E)] + \
            [m.experts[f"expert_{e}"].wo.weight for e in range(E)]
    g = [t2n(t) for t in torch.autograd.grad(total, plist)]
    grads = {"x": g[0], "Wr": g[1].T, "W1": np.stack([w.T for w in g[2:2 + E]]),
             "W2": np.stack([w.T for w in g[2 + E:]])}
    config = {"causal": False, "k": 1, "capacity_factor": capacity_factor, "aux_weight": aux_weight,
              "z_weight": z_weight, "jitter": None}
    # effattn's routing and aux losses against the peer's before saving
    _, _, cache = effattn_diffs("switch", {"x": x, **params}, config, t2n(out), dout, grads)
    st = aux_losses(cache)
    with torch.no_grad():
        ei, _, _ = m.router(torch.as_tensor(x))
    hf_keep = t2n(ei.sum(-1)).reshape(-1).astype(bool)
    assert np.array_equal(hf_keep, np.asarray(cache.keep)[:, 0]), "HF and effattn dispatch different tokens"
    assert (st["dropped"] > 0) == expect_drop, f"{case}: dropped share {st['dropped']}"
    if aux_weight or z_weight:
        assert abs(st["balance"] - balance.item()) < 1e-12 and abs(st["z"] - zloss.item()) < 1e-12
    if expect_drop:
        extra += (f" Capacity C = {cache.capacity} (HF expert_capacity {hf_capacity}); "
                  f"{int((~hf_keep).sum())} of {hf_keep.size} tokens dropped (output 0 on both sides), "
                  f"queue in token order, B = 1 (HF counts capacity per sequence, effattn per call).")
    path, _ = write(f"switch__hf_switch_transformers__{case}", mechanism="switch", peer=PEER,
                    peer_version=transformers.__version__, case=case, config=config, inputs={"x": x, **params},
                    out=t2n(out), dout=dout, grads=grads, note=note + extra)
    return path


def generate():
    rng = np.random.default_rng(11)
    return [switch_case(rng, "top1", b=2, n=8, capacity_factor=None, hf_capacity=16),
            switch_case(rng, "top1_capacity", b=1, n=16, capacity_factor=1.0, hf_capacity=4, expect_drop=True),
            switch_case(rng, "aux", b=2, n=8, capacity_factor=None, hf_capacity=16, aux_weight=0.7, z_weight=0.3)]
