"""The evaluation grid: under DDP one PNG of the first ``ceil(n / W)`` objects of every rank's first
batch (rank 0's batch alone before), objects the distributed sampler repeated shown once; one
process: its first batch, as before."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from recon3d.data.batch import Batch, Views
from recon3d.methods.toy import ToyTriplaneModule
from recon3d.utils.images import save_view_grid

IDS = {0: ["a", "b", "c", "d"], 1: ["b", "e", "f", "g"]}  # rank 1's "b": the sampler's padding repeats an object


def _images(ids: list[str], views: int, size: int, salt: int) -> torch.Tensor:
    """Distinct deterministic images per object id (and role ``salt``)."""
    out = []
    for oid in ids:
        g = torch.Generator().manual_seed(1000 * salt + ord(oid))
        out.append(torch.rand(views, 3, size, size, generator=g))
    return torch.stack(out)


def _batch(ids: list[str]) -> tuple[Batch, torch.Tensor]:
    batch = Batch(object_ids=list(ids), inputs=Views(_images(ids, 2, 16, 1)), targets=Views(_images(ids, 3, 8, 2)))
    return batch, _images(ids, 3, 8, 3)  # the predictions


def _model(out: Path, rank: int, world: int) -> ToyTriplaneModule:
    m = ToyTriplaneModule(vis_views=2)
    m._trainer = SimpleNamespace(world_size=world, is_global_zero=rank == 0, sanity_checking=False, logger=None,
                                 default_root_dir=str(out), current_epoch=3, global_step=7)
    return m


def _expected(path: Path, ids: list[str]) -> np.ndarray:
    batch, pred = _batch(ids)
    save_view_grid(path, batch.inputs.images, pred[:, :2], batch.targets.images[:, :2], object_ids=ids)
    return np.asarray(Image.open(path))


def _grid(out: Path) -> np.ndarray:
    files = sorted(out.glob("val_grid_*.png"))
    assert [f.name for f in files] == ["val_grid_epoch0003_step0000007.png"]
    return np.asarray(Image.open(files[0]))


def test_one_process_grid_is_its_first_batch(tmp_path):
    m = _model(tmp_path / "run", 0, 1)
    m.on_validation_epoch_start()
    for ids in (["a", "b"], ["c", "d"]):  # only the first batch is shown
        batch, pred = _batch(ids)
        m._save_grid(batch, pred, "val")
    m._write_grid("val")
    np.testing.assert_array_equal(_grid(tmp_path / "run"), _expected(tmp_path / "ref.png", ["a", "b"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        m = _model(Path(out), rank, world)
        m.on_validation_epoch_start()
        batch, pred = _batch(IDS[rank])
        m._save_grid(batch, pred, "val")
        m._write_grid("val")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_process_grid_shows_every_ranks_objects_once(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path / "run")), nprocs=2, join=True, start_method="fork")
    # two of each rank's four: rank 0's a, b, then rank 1's e (its repeated b is left out)
    np.testing.assert_array_equal(_grid(tmp_path / "run"), _expected(tmp_path / "ref.png", ["a", "b", "e"]))
