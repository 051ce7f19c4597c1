"""Outputs are written with the user's umask (issue 13): ``atomic_path`` stages through
``mkstemp`` (mode 0600), so every mesh, GIF, grid and CSV used to be unreadable for the group.

The reference mode is that of a file made by a plain ``open(path, "w")`` under the same umask.
"""

from __future__ import annotations

import os
import stat
import threading

import pytest
import torch

from recon3d.utils.io import atomic_write_text, current_umask


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _write_everything(d):
    from recon3d.metrics.protocol import EvaluationProtocol
    from recon3d.render.export import save_mesh, save_video
    from recon3d.utils.images import save_view_grid

    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    faces = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
    save_mesh(d / "mesh.glb", verts, faces, torch.rand(4, 3))
    save_mesh(d / "mesh.obj", verts, faces, torch.rand(4, 3))
    save_video(d / "turntable.gif", torch.rand(3, 3, 16, 16))
    save_view_grid(d / "grid.png", torch.rand(1, 2, 3, 8, 8), torch.rand(1, 2, 3, 8, 8), torch.rand(1, 2, 3, 8, 8))
    ev = EvaluationProtocol(image_metrics=("psnr",))
    ev.update_views(["obj"], torch.rand(1, 1, 3, 8, 8), torch.rand(1, 1, 3, 8, 8))
    ev.write(d / "test")
    atomic_write_text(d / "notes.txt", "x")
    return [d / "mesh.glb", d / "mesh.obj", d / "turntable.gif", d / "grid.png", d / "test" / "metrics.csv",
            d / "test" / "per_object.csv", d / "test" / "metrics.json", d / "notes.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002, 0o077])
def test_outputs_follow_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        want = _mode(tmp_path / "plain.txt")
        assert current_umask() == umask
        written = _write_everything(tmp_path)
    finally:
        os.umask(old)
    assert want == 0o666 & ~umask
    modes = {p.name: oct(_mode(p)) for p in written}
    assert modes == {p.name: oct(want) for p in written}
    assert not list(tmp_path.rglob(".*.tmp")) and not [p for p in tmp_path.rglob(".*") if p.is_file()]


def test_reading_the_umask_does_not_change_it():
    old = os.umask(0o027)
    try:
        seen = []
        threads = [threading.Thread(target=lambda: seen.append(current_umask())) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert seen == [0o027] * 8
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)
