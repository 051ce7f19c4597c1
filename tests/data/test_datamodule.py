"""ReconDataModule: splits, view sampling, compositing, sharding, resumable order, skips."""

import pytest
import torch

from recon3d.data.base import ObjectDataset
from recon3d.data.datamodule import ReconDataModule
from recon3d.data.sampling import ObjectSampler
from recon3d.data.synthetic import SyntheticDataset
from recon3d.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    ds = SyntheticDataset(num_objects=9, views_per_object=8, resolution=24, num_surface_points=64, num_sdf_points=64,
                          mesh_resolution=0, cache_dir=str(tmp_path_factory.mktemp("synth")))
    ds.prepare()
    return ds


def _dm(ds, **kw):
    args = dict(num_val_objects=2, num_test_objects=2, num_input_views=2, num_target_views=3, batch_size=2)
    args.update(kw)
    return ReconDataModule(ds, **args)


def test_splits_are_disjoint_and_cover(synth):
    s = _dm(synth).split_indices()
    tr, va, te = set(s["train"][1]), set(s["val"][1]), set(s["test"][1])
    assert not (tr & va or tr & te or va & te)
    assert tr | va | te == set(range(9))
    with pytest.raises(ConfigError, match="too few"):
        _dm(synth, num_val_objects=5, num_test_objects=4).split_indices()


def test_batch_contract_and_compositing(synth):
    dm = _dm(synth, input_resolution=16, background="black")
    b = next(iter(dm.train_dataloader()))
    assert b.inputs.images.shape == (2, 2, 3, 16, 16)
    assert b.targets.images.shape == (2, 5, 3, 24, 24)  # supervise_inputs: 2 inputs + 3 others
    assert b.inputs.cameras.width == 16 and b.inputs.cameras.K[0, 0, 0, 0] < b.targets.cameras.K[0, 0, 0, 0]
    # Black background: pixels outside the mask are 0.
    out = b.targets.masks < 1e-3
    assert b.targets.images.masked_select(out.expand_as(b.targets.images)).abs().max() == 0
    assert b.geometry.surface_points.shape == (2, 64, 3)
    # Targets start with the inputs (same cameras).
    assert torch.allclose(b.targets.cameras.c2w[:, :2], b.inputs.cameras.c2w)


def test_eval_views_fixed_train_views_vary(synth):
    dm = _dm(synth)
    item = dm.loader("train").dataset
    assert item.choose_views(0, 0) != item.choose_views(0, 1)
    assert item.choose_views(0, 3) == item.choose_views(0, 3)
    ev = dm.loader("val").dataset
    assert ev.choose_views(0, 0) == ev.choose_views(0, 7)
    inputs, targets = ev.choose_views(0, 0)
    assert inputs == [0, 4] and len(set(targets[2:]) & set(inputs)) == 0


def test_ddp_shards_partition_the_epoch():
    idx = list(range(11))
    shards = [list(ObjectSampler(idx, num_replicas=2, rank=r, shuffle=True, seed=3)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6  # padded to equal length
    assert {i for s in shards for i, _ in s} == set(idx)
    ev = [list(ObjectSampler(idx, num_replicas=2, rank=r, shuffle=False, pad=False)) for r in range(2)]
    assert sorted(i for s in ev for i, _ in s) == idx  # no object evaluated twice


def test_loader_resumes_mid_epoch(synth):
    dm = _dm(synth)
    dl = dm.train_dataloader()
    dl.sampler.set_epoch(2)
    full = [b.object_ids for b in dl]
    it = iter(dl)
    next(it)
    state = dl.state_dict()
    assert state == {"epoch": 2, "batches": 1}
    fresh = _dm(synth).train_dataloader()
    fresh.load_state_dict(state)
    rest = [b.object_ids for b in fresh]
    assert rest == full[1:]
    assert len(fresh) == len(full)  # Lightning expects the full epoch length


class _Broken(ObjectDataset):
    name = "broken"

    def __init__(self, inner):
        self.inner = inner

    def object_ids(self):
        return self.inner.object_ids()

    def num_views(self, i):
        return self.inner.num_views(i)

    def load_views(self, i, views):
        if i % 3 == 0:
            raise DataError(f"/data/obj{i}/000.png", "cannot decode image")
        return self.inner.load_views(i, views)


def test_bad_samples_raise_or_are_counted(synth):
    dm = _dm(_Broken(synth), num_val_objects=0, num_test_objects=0, batch_size=9)
    with pytest.raises(DataError, match=r"obj\d+/000.png: cannot decode image"):
        next(iter(dm.train_dataloader()))
    dm = _dm(_Broken(synth), num_val_objects=0, num_test_objects=0, batch_size=9, on_bad_sample="skip")
    b = next(iter(dm.train_dataloader()))
    assert len(b) == 6 and len(b.skipped) == 3
    assert all("cannot decode image" in why for _, why in b.skipped)


def test_bad_config_values():
    with pytest.raises(ConfigError, match="num_input_views"):
        ReconDataModule(SyntheticDataset(num_objects=3), num_input_views=0)
    with pytest.raises(ConfigError, match="on_bad_sample"):
        ReconDataModule(SyntheticDataset(num_objects=3), on_bad_sample="ignore")
