"""Issue 2 §8: every bad input gives one DataError naming the file and what was expected."""

from __future__ import annotations

import pytest

from recon3d.errors import DataError

from .bad_inputs import CASES


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_gives_one_line_data_error(case, tmp_path):
    factory, expected = case(tmp_path / "case")
    with pytest.raises(DataError) as info:
        factory()
    err = info.value
    msg = str(err)
    assert expected in msg, msg
    assert "\n" not in msg, msg
    # names a file under the fixture folder, before the problem
    assert msg.startswith(str(tmp_path)), msg
    assert err.path and err.problem
    # raised at the loader edge: no chained library traceback
    assert err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__


def test_corpus_has_every_issue_category():
    names = " ".join(c.__name__ for c in CASES)
    for word in ("missing_image", "garbage_image", "truncated_png", "five_numbers", "wrong_shape", "garbled_json",
                 "nan_", "singular_rotation", "mask_wrong_size", "rgb_instead_of_rgba", "escaping", "empty_folder"):
        assert word in names, word
