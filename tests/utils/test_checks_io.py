"""Shape checks name the argument; atomic writes never leave partial files; weights load safely."""

import os

import pytest
import torch

from recon3d.errors import CheckpointError, ShapeError
from recon3d.utils.checkpoint import load_state_dict_file, load_weights_into
from recon3d.utils.checks import check_shape
from recon3d.utils.io import atomic_path, atomic_write_text


def test_check_shape_binds_and_reports():
    dims = check_shape(torch.zeros(2, 3, 4, 5), "B V 4 W", "images")
    assert dims == {"B": 2, "V": 3, "W": 5}
    with pytest.raises(ShapeError, match=r"masks: expected dimension B=2"):
        check_shape(torch.zeros(3, 3, 4, 5), "B V 4 W", "masks", dims)
    assert check_shape(torch.zeros(7, 2, 3), "*N 3", "pts")["N"] == (7, 2)
    with pytest.raises(ShapeError, match=r"pts: expected shape \(\*N 3\)"):
        check_shape(torch.zeros(7, 2), "*N 3", "pts")
    with pytest.raises(ShapeError, match="expected a torch.Tensor"):
        check_shape([1, 2], "N", "x")


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/recon3d_pwned",))


def test_pickled_code_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, path)
    if os.path.exists("/tmp/recon3d_pwned"):
        os.remove("/tmp/recon3d_pwned")
    with pytest.raises(CheckpointError, match="refused to load.*allow_pickle"):
        load_state_dict_file(path)
    assert not os.path.exists("/tmp/recon3d_pwned")


def test_weights_mismatch_is_one_line(tmp_path):
    net = torch.nn.Linear(3, 2)
    torch.save({"weight": torch.zeros(2, 4), "bias": torch.zeros(2), "extra": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError) as e:
        load_weights_into(net, tmp_path / "w.pt")
    assert "1 unexpected" in str(e.value) and "other shapes" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_state_dict_file(tmp_path / "junk.pt")
