"""The swappable feed-forward (issue 15): a mixture of experts (and a product-key memory) inside
the models, trained with their auxiliary losses. Oracles: central differences of CE + aux (the objective the backward claims),
the causal forward for decoding, the unpadded batch for padding, the dense block for the shapes."""
import numpy as np
import pytest

from effattn.gradcheck import rel_error
from effattn.models import Encoder
from effattn.models.ffn import SparseFeedForward, make_ffn
from effattn.nn.modules import FeedForward

from test_models import H, tiny, tiny_batch

SWITCH = {"experts": 3, "k": 2, "capacity_factor": 1.0, "aux_weight": 0.5, "z_weight": 0.1}
PKM = {"keys": 16, "topk": 3, "heads": 2, "dq": 4}


def objective(model, batch):
    """CE + the weighted auxiliary losses of the same forward (no backward)."""
    loss = model.loss_and_backward(batch, backward=False)[0]
    return loss + model.aux()["loss"]


@pytest.mark.parametrize("ffn, config, own", [("switch", SWITCH, ".ff.Wr"), ("pkm", PKM, ".ff.keys1")])
@pytest.mark.parametrize("mode", ["encoder", "decoder", "encoder-decoder"])
def test_gradients_of_ce_plus_aux_by_finite_differences(mode, ffn, config, own):
    rng = np.random.default_rng(0)
    model = tiny(mode, rng, ffn=ffn, ffn_config=config)
    batch = tiny_batch(mode, rng)
    model.zero_grad()
    model.loss_and_backward(batch)
    if ffn == "switch":
        assert model.aux()["loss"] > 0.01                 # the aux terms are big enough to be seen
    grads = dict(model.gradients())
    assert any(own in n for n in grads) and any(".ff.W" in n for n in grads)
    for name, p in model.parameters():
        idx = np.arange(p.size) if p.size <= 4 else rng.choice(p.size, 4, replace=False)
        flat, num = p.reshape(-1), []
        for i in idx:
            old = flat[i]
            flat[i] = old + H
            lp = objective(model, batch)
            flat[i] = old - H
            lm = objective(model, batch)
            flat[i] = old
            num.append((lp - lm) / (2 * H))
        num, ana = np.array(num), grads[name].reshape(-1)[idx]
        scale = max(np.abs(ana).max(), np.abs(num).max())
        err = rel_error(ana, num) if scale > 1e-7 else np.abs(ana - num).max()
        assert err < 1e-6, f"{mode} {name}: {err}"


def test_a_switch_block_holds_e_times_the_dense_parameters():
    rng = np.random.default_rng(0)
    dense = make_ffn("dense", 8, 12, rng)
    moe = make_ffn("switch", 8, 12, rng, config={"experts": 4})
    assert isinstance(dense, FeedForward) and isinstance(moe, SparseFeedForward)
    assert moe.num_parameters() == 4 * dense.num_parameters() + 8 * 4        # + the router (D, E)


def test_a_pkm_block_holds_the_memory_and_its_query_net():
    rng = np.random.default_rng(0)
    mem = make_ffn("pkm", 8, 12, rng, config={"keys": 64, "heads": 2, "dq": 6, "topk": 4})
    # values K D + query net D (H dq) + H dq + two sub-key sets H sqrtK dq/2
    assert mem.num_parameters() == 64 * 8 + 8 * 12 + 12 + 2 * 2 * 8 * 3
    assert mem.options == {"heads": 2, "topk": 4}


def test_a_pkm_decoder_decodes_by_steps():
    rng = np.random.default_rng(1)
    lm = tiny("decoder", rng, ffn="pkm", ffn_config=PKM)
    ids = rng.integers(0, 7, (2, 6))
    full = lm.forward(ids)
    assert 0 < lm.aux()["layers"]["stack.blocks.0.ff"]["usage"] <= 1
    state = lm.init_state(2)
    first, state = lm.prefill(ids[:, :3], state)
    rows = [first[:, i] for i in range(3)]
    for t in range(3, 6):
        lt, state = lm.step(ids[:, t], state)
        rows.append(lt)
    assert np.abs(np.stack(rows, axis=1) - full).max() < 1e-10


def test_the_decoder_runs_without_dropping_and_decodes_by_steps():
    rng = np.random.default_rng(1)
    lm = tiny("decoder", rng, ffn="switch", ffn_config={"experts": 3, "capacity_factor": 0.5})
    ff = lm.stack.blocks[0].ff
    assert ff.options["capacity_factor"] is None                      # the decodable setting
    ids = rng.integers(0, 7, (2, 6))
    full = lm.forward(ids)
    assert lm.aux()["layers"]["stack.blocks.0.ff"]["dropped"] == 0.0
    state = lm.init_state(2)
    first, state = lm.prefill(ids[:, :3], state)
    rows = [first[:, i] for i in range(3)]
    for t in range(3, 6):
        lt, state = lm.step(ids[:, t], state)
        rows.append(lt)
    assert np.abs(np.stack(rows, axis=1) - full).max() < 1e-10
    # the future cannot leak: changing token 4 leaves rows 0..3 as they were
    ids2 = ids.copy()
    ids2[:, 4] = (ids2[:, 4] + 1) % 7
    assert np.abs(lm.forward(ids2)[:, :4] - full[:, :4]).max() < 1e-12


def test_padding_takes_no_capacity():
    """A padded batch classifies its real tokens exactly as the unpadded one (mean pooling)."""
    rng = np.random.default_rng(2)
    model = tiny("encoder", rng, ffn="switch", ffn_config={"experts": 3, "capacity_factor": 1.0})
    x = rng.integers(0, 7, (1, 5))
    padded = np.concatenate([x, rng.integers(0, 7, (1, 3))], axis=1)
    mask = np.arange(8)[None] < 5
    a = model.forward(x, np.ones((1, 5), bool))
    load_a = model.aux()["layers"]["stack.blocks.0.ff"]["load"]
    b = model.forward(padded, mask)
    assert np.abs(a - b).max() < 1e-12
    assert model.aux()["layers"]["stack.blocks.0.ff"]["load"] == load_a


def test_loss_scaling_scales_the_auxiliary_gradients_too():
    rng = np.random.default_rng(3)
    model = tiny("encoder", rng, ffn="switch", ffn_config=SWITCH)
    batch = tiny_batch("encoder", rng)
    model.zero_grad()
    model.loss_and_backward(batch)
    g1 = {n: g.copy() for n, g in model.gradients()}
    model.zero_grad()
    model.loss_and_backward(batch, loss_scale=1024.0)
    for n, g in model.gradients():
        assert np.abs(g - 1024.0 * g1[n]).max() <= 1e-9 * max(1.0, np.abs(g).max()), n


def test_reversible_and_checkpointed_stacks_keep_the_gradients():
    batch = tiny_batch("encoder", np.random.default_rng(5))
    out = []
    for kw in ({}, {"checkpoint": 1}):
        model = tiny("encoder", np.random.default_rng(4), ffn="switch", ffn_config=SWITCH, **kw)
        model.zero_grad()
        model.loss_and_backward(batch)
        out.append(dict(model.gradients()))
    for n in out[0]:
        assert np.abs(out[0][n] - out[1][n]).max() < 1e-12, n
    rev = []
    for reconstruct in (True, False):
        model = tiny("encoder", np.random.default_rng(4), ffn="switch", ffn_config=SWITCH, reversible=True)
        model.stack.reconstruct = reconstruct
        model.zero_grad()
        model.loss_and_backward(batch)
        rev.append(dict(model.gradients()))
    for n in rev[0]:
        assert np.abs(rev[0][n] - rev[1][n]).max() < 1e-10, n


@pytest.mark.parametrize("kw, word", [
    ({"ffn": "dense_moe"}, "ffn"),
    ({"ffn": "switch", "ffn_config": {"expert": 4}}, "expert"),
    ({"ffn": "switch", "ffn_config": {"experts": 0}}, "experts"),
    ({"ffn": "switch", "ffn_config": {"k": 3}}, "k"),
    ({"ffn": "dense", "ffn_config": {"experts": 4}}, "ffn_config"),
    ({"ffn": "switch", "ffn_chunk": 4}, "ffn_chunk"),
    ({"ffn": "pkm", "ffn_config": {"keys": 15}}, "square"),
    ({"ffn": "pkm", "ffn_config": {"keys": 16, "topk": 5}}, "topk"),
    ({"ffn": "pkm", "ffn_config": {"experts": 4}}, "experts"),
    ({"ffn": "pkm", "ffn_config": {"dq": 3}}, "dq"),
])
def test_bad_options_name_the_argument(kw, word):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=word):
        m = Encoder(7, 3, rng, d_model=8, heads=2, layers=1, d_ff=12, max_len=8, **kw)
        m.forward(rng.integers(0, 7, (1, 4)))        # options the layer checks at its first call


def test_train_runs_a_mixture_of_experts_and_reports_its_load():
    from effattn.tools.train import train_model

    out = train_model("lm", steps=3, d_model=16, heads=2, layers=1, seq_len=16, batch_size=4, eval_every=0,
                      ffn="switch", experts=4)["result"]
    assert out["ffn"] == "switch" and out["dropped"] == 0.0 and out["aux_loss"] > 0
    assert len(out["expert_load"]) == 4 and abs(sum(out["expert_load"]) - 1) < 1e-3


def test_train_runs_a_product_key_memory_and_reports_its_usage():
    from effattn.tools.train import train_model

    out = train_model("lm", steps=3, d_model=16, heads=2, layers=1, seq_len=16, batch_size=4, eval_every=0,
                      ffn="pkm", pkm_keys=64, pkm_topk=4)["result"]
    assert out["ffn"] == "pkm" and 0 < out["memory_usage"] <= 1 and "expert_load" not in out


@pytest.mark.parametrize("opts, word", [
    ({"experts": 4}, "--experts is an option of --ffn switch"),
    ({"ffn": "switch", "router_k": 3}, "--router-k"),
    ({"ffn": "switch", "capacity": 0.0}, "--capacity"),
    ({"ffn": "switch", "ffn_chunk": 8}, "--ffn-chunk"),
    ({"ffn": "switch", "aux_weight": -1.0}, "--aux-weight"),
    ({"z_weight": 0.0}, "--z-weight is an option"),
    ({"ffn": "switch", "pkm_keys": 64}, "--pkm-keys is an option of --ffn pkm"),
    ({"ffn": "pkm", "pkm_keys": 63}, "--pkm-keys"),
    ({"ffn": "pkm", "pkm_keys": 64, "pkm_topk": 9}, "--pkm-topk"),
    ({"ffn": "pkm", "experts": 4}, "--experts is an option of --ffn switch"),
])
def test_train_refuses_bad_ffn_options(opts, word):
    from effattn.tools.train import train_model

    with pytest.raises(ValueError, match=word):
        train_model("lm", steps=1, **opts)
