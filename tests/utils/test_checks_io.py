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


def _recording_fsync(monkeypatch) -> list[str]:
    """Record what each ``os.fsync`` synced: ``"dir"`` or ``"file:<name>"`` (by fstat of the fd)."""
    import stat

    seen: list[str] = []
    real = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        seen.append("dir" if stat.S_ISDIR(st.st_mode) else f"file:{st.st_size}")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_every_atomic_writer_fsyncs_file_then_folder(tmp_path, monkeypatch):
    """One rule for every writer: fsync the bytes, rename, fsync the folder (the rename is durable)."""
    from recon3d.utils.ckpt_io import atomic_torch_save, write_atomically

    seen = _recording_fsync(monkeypatch)
    atomic_write_text(tmp_path / "a.txt", "hello")
    assert seen == ["file:5", "dir"] and (tmp_path / "a.txt").read_text() == "hello"
    seen.clear()
    write_atomically(tmp_path / "b.bin", lambda f: f.write(b"12345678"))
    assert seen == ["file:8", "dir"] and (tmp_path / "b.bin").read_bytes() == b"12345678"
    seen.clear()
    atomic_torch_save({"x": torch.arange(3)}, tmp_path / "c.ckpt")
    assert seen[-1] == "dir" and len(seen) == 2
    assert torch.equal(torch.load(tmp_path / "c.ckpt", weights_only=True)["x"], torch.arange(3))
    # checkpoint temporaries never match *.ckpt, and a killed write's leftover is removed next time
    stale = tmp_path / ".c.ckpt.k2x9q0a1.tmp"
    stale.write_bytes(b"half")
    atomic_torch_save({"x": torch.arange(2)}, tmp_path / "c.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.ckpt"]


def test_atomic_path_mode_and_failed_write(tmp_path):
    from recon3d.utils.io import current_umask

    with atomic_path(tmp_path / "lib.so", mode=0o777) as tmp:
        assert tmp.name.startswith(".lib.so.") and tmp.suffix == ".so"
        tmp.write_bytes(b"\x7fELF")
    assert (tmp_path / "lib.so").stat().st_mode & 0o777 == 0o777 & ~current_umask()
    with pytest.raises(RuntimeError, match="compile failed"), atomic_path(tmp_path / "other.so") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("compile failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib.so"]


def test_merge_weights_checks_names_and_values():
    from recon3d.errors import ConfigError
    from recon3d.utils.checks import merge_weights

    paper = {"sdf": 1.0, "rgb": 0.1}
    assert merge_weights("model.loss_weights", paper, None) == paper
    assert merge_weights("model.loss_weights", paper, {"rgb": 0.5}) == {"sdf": 1.0, "rgb": 0.5}
    assert paper == {"sdf": 1.0, "rgb": 0.1}  # the defaults are not changed in place
    with pytest.raises(ConfigError, match=r"model.loss_weights: unknown terms \['rbg'\]; expected \['rgb', 'sdf'\]"):
        merge_weights("model.loss_weights", paper, {"rbg": 0.5})
    with pytest.raises(ConfigError, match=r"model.loss_weights.rgb: expected a finite number, got nan"):
        merge_weights("model.loss_weights", paper, {"rgb": float("nan")})
