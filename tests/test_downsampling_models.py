"""The downsampling encoders (effattn.models.downsampling): whole-model backward against central
differences (every parameter, float64), the lengths of the funnel's stages, the decoder's way back
to N, padding invariance, and bad configuration."""
import numpy as np
import pytest

from effattn.gradcheck import rel_error
from effattn.models.downsampling import FunnelEncoder, PerceiverEncoder
from test_models import sampled_numerical


def batch(rng, n=9):
    mask = np.ones((3, n), bool)
    mask[0, 5:] = False
    return {"x": rng.integers(0, 7, (3, n)), "mask": mask, "y": rng.integers(0, 3, 3)}


def check_model(model, b, rng):
    """Every parameter's gradient at 4 sampled entries against central differences of the loss."""
    model.zero_grad()
    model.loss_and_backward(b)
    grads = dict(model.gradients())
    names = [n for n, _ in model.parameters()]
    assert len(names) == len(set(names))
    for name, p in model.parameters():
        idx = np.arange(p.size) if p.size <= 4 else rng.choice(p.size, 4, replace=False)
        num, ana = sampled_numerical(model, b, p, idx), grads[name].reshape(-1)[idx]
        scale = max(np.abs(ana).max(), np.abs(num).max())
        err = rel_error(ana, num) if scale > 1e-7 else np.abs(ana - num).max()
        assert err < 1e-6, f"{name}: {err} (analytic {ana}, numeric {num})"
    return names


@pytest.mark.parametrize("kw", [{}, {"pool": "cls", "positions": "learned", "funnel_pool": "max"},
                                {"decoder_layers": 1}, {"stages": (1, 1, 1), "decoder_layers": 1, "pool": "cls"}])
def test_funnel_encoder_gradients_every_parameter(kw):
    rng = np.random.default_rng(0)
    cfg = dict(d_model=8, heads=2, stages=(1, 2), d_ff=12, max_len=9)
    cfg.update(kw)
    model = FunnelEncoder(7, 3, rng, **cfg)
    names = check_model(model, batch(rng), rng)
    assert any("funnel" in n for n in names)


@pytest.mark.parametrize("kw", [{}, {"latent_layers": 0, "positions": "learned"}])
def test_perceiver_encoder_gradients_every_parameter(kw):
    rng = np.random.default_rng(1)
    cfg = dict(d_model=8, heads=2, latents=3, latent_layers=1, d_ff=16, max_len=9)
    cfg.update(kw)
    model = PerceiverEncoder(7, 3, rng, **cfg)
    names = check_model(model, batch(rng), rng)
    assert "perceiver.latents" in names


def test_stage_lengths_halve_and_padding_changes_nothing():
    rng = np.random.default_rng(2)
    for model in (FunnelEncoder(7, 3, rng, d_model=8, heads=2, stages=(1, 1, 1), max_len=16),
                  FunnelEncoder(7, 3, rng, d_model=8, heads=2, stages=(1, 1, 1), max_len=16, decoder_layers=1),
                  PerceiverEncoder(7, 3, rng, d_model=8, heads=2, latents=4, max_len=16)):
        ids = rng.integers(0, 7, (2, 16))
        mask = np.ones((2, 16), bool)
        mask[:, 11:] = False
        a = model.forward(ids, mask)
        if isinstance(model, FunnelEncoder):
            assert model.cache == [16, 9, 5]                 # [CLS] kept: 1 + ceil(15 / 2), 1 + ceil(8 / 2)
        ids2 = ids.copy()
        ids2[:, 11:] = rng.integers(0, 7, (2, 5))
        np.testing.assert_allclose(model.forward(ids2, mask), a, rtol=0, atol=1e-12)


def test_bad_configuration_is_named():
    rng = np.random.default_rng(3)
    for kw, name in (({"stages": ()}, "stages"), ({"stages": (2, 0)}, "stages"), ({"decoder_layers": 1, "stages": (2,)},
                     "decoder_layers"), ({"heads": 3}, "heads")):
        with pytest.raises(ValueError, match=name):
            FunnelEncoder(7, 3, rng, d_model=8, **{"heads": 2, **kw})
    with pytest.raises(ValueError, match="d_ff"):
        PerceiverEncoder(7, 3, rng, d_model=8, heads=2, d_ff=12)
    with pytest.raises(ValueError, match="latents"):
        PerceiverEncoder(7, 3, rng, d_model=8, heads=2, latents=0)
