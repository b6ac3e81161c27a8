"""effattn against the peers' own numbers (HuggingFace transformers, lucidrains' packages, the
official Set Transformer code): every fixture in tests/parity/fixtures, written by the generators
``tests/parity/peer_*.py`` (run ``python tests/parity/generate.py`` in an environment with torch
and the peers; see fixture.py for the format). Outputs and gradients must agree to the fixture's
tolerance (1e-10 where the maths is the same)."""
import numpy as np
import pytest
from fixture import all_fixtures, load

import effattn
from effattn.backend import asarray, to_numpy

FIXTURES = all_fixtures()
MIN_MECHANISMS = 13


def _arr(x):
    return asarray(x) if isinstance(x, np.ndarray) else x


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_effattn_equals_the_peer(path):
    meta, inputs, config, out, dout, grads = load(path)
    spec = effattn.get(meta["mechanism"])
    inputs = {k: asarray(v) for k, v in inputs.items()}
    config = {k: _arr(v) for k, v in config.items()}
    mine, cache = spec.forward(**inputs, **config)
    mine = np.asarray(to_numpy(mine))
    assert mine.shape == out.shape, f"{path.stem}: out shape {mine.shape}, the peer's {out.shape}"
    diff = float(np.abs(mine - out).max())
    assert diff <= meta["atol_out"], f"{path.stem} ({meta['peer']}): max |out - peer| = {diff:.2e}"
    if grads:
        g = spec.backward(asarray(dout), cache)
        for name, want in grads.items():
            got = np.asarray(to_numpy(g[name]))
            gd = float(np.abs(got - want).max())
            assert gd <= meta["atol_grad"], f"{path.stem} ({meta['peer']}): max |d{name} - peer| = {gd:.2e}"


def test_the_fixtures_cover_the_peers():
    """At least 13 mechanisms have a fixture, each stamped with its peer and version."""
    mechanisms = set()
    for path in FIXTURES:
        meta = load(path)[0]
        assert meta["peer"] and meta["peer_version"], f"{path.stem} is not stamped with its peer and version"
        mechanisms.add(meta["mechanism"])
    assert len(mechanisms) >= MIN_MECHANISMS, f"parity fixtures cover {sorted(mechanisms)} only"
