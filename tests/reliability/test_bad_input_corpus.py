"""Every case of the bad-input corpus (:mod:`tests.reliability.corpus`) ends in one error line
naming the thing and what was expected: no traceback, no changed or half-written file, and no
planted code executed."""

from __future__ import annotations

import pytest

from tests.reliability.corpus import all_cases, check

ALL = all_cases()


def test_corpus_size():
    assert len(ALL) >= 20
    assert {c.category for c in ALL} == {"data", "config", "checkpoint", "output"}
    assert {c.outcome for c in ALL} == {"refused", "correct"}  # never "accepted with a wrong result"


@pytest.mark.parametrize("case", ALL, ids=lambda c: f"{c.category}-{c.name.replace(' ', '_')}")
def test_bad_input(case, tmp_path, synthetic_cache):
    ok, line = check(case, tmp_path / "case", synthetic_cache)
    assert ok, line
    assert "\n" not in line and (line.startswith("recon3d: error:") or case.outcome == "correct")
