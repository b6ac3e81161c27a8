"""effattn against the peers' own numbers (HuggingFace transformers, lucidrains' packages, the
official Set Transformer code): every fixture in tests/parity/fixtures, written by the generators
``tests/parity/peer_*.py`` (run ``python tests/parity/generate.py`` in an environment with torch
and the peers; :mod:`effattn.tools.parity` has the format). Outputs and gradients must agree to
the fixture's tolerance (1e-10 where the maths is the same)."""
import pytest

from effattn.tools.parity import all_fixtures, compare, load

FIXTURES = all_fixtures()
MIN_MECHANISMS = 13


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_effattn_equals_the_peer(path):
    r = compare(path)
    m = r["meta"]
    assert r["out"] <= m["atol_out"], f"{path.stem} ({m['peer']}): max |out - peer| = {r['out']:.2e}"
    for name, diff in r["grads"].items():
        assert diff <= m["atol_grad"], f"{path.stem} ({m['peer']}): max |d{name} - peer| = {diff:.2e}"


def test_the_fixtures_cover_the_peers():
    """At least 13 mechanisms have a fixture, each stamped with its peer and version."""
    mechanisms = set()
    for path in FIXTURES:
        meta = load(path)["meta"]
        assert meta["peer"] and meta["peer_version"], f"{path.stem} is not stamped with its peer and version"
        mechanisms.add(meta["mechanism"])
    assert len(mechanisms) >= MIN_MECHANISMS, f"parity fixtures cover {sorted(mechanisms)} only"
