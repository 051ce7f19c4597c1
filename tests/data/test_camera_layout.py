"""Fixed camera layouts (synthetic ``camera_layout="fixed"``) and ``fixed_inputs`` view sampling."""

from __future__ import annotations

import pytest
import torch

from recon3d.data.datamodule import ReconDataModule
from recon3d.data.synthetic import SyntheticDataset
from recon3d.errors import ConfigError


def test_fixed_layout_gives_every_object_the_same_cameras(tmp_path):
    ds = SyntheticDataset(num_objects=3, views_per_object=12, resolution=16, elevation_range=(-10.0, 40.0),
                          radius_range=(2.6, 3.0), camera_layout="fixed", cache_dir=str(tmp_path))
    c0, c1 = ds.cameras(0), ds.cameras(2)
    torch.testing.assert_close(c0.c2w, c1.c2w)
    centre = c0.c2w[:, :3, 3].double()
    # z-up orbit: azimuth i * 30 deg from +x, elevations cycling -10 / 15 / 40, distance 2.8
    torch.testing.assert_close(centre.norm(dim=-1), torch.full((12,), 2.8, dtype=torch.float64), rtol=0, atol=1e-5)
    el = torch.rad2deg(torch.asin(centre[:, 2] / centre.norm(dim=-1)))
    torch.testing.assert_close(el, torch.tensor([-10.0, 15.0, 40.0] * 4, dtype=torch.float64), rtol=0, atol=1e-4)
    az = torch.rad2deg(torch.atan2(centre[:, 1], centre[:, 0])) % 360
    steps = (az - az[0]) % 360
    torch.testing.assert_close(steps, torch.arange(12, dtype=torch.float64) * 30.0, rtol=0, atol=1e-3)
    # the default layout differs between objects
    r = SyntheticDataset(num_objects=3, views_per_object=12, resolution=16, cache_dir=str(tmp_path))
    assert not torch.allclose(r.cameras(0).c2w, r.cameras(2).c2w)
    assert r.cache_dir != ds.cache_dir
    with pytest.raises(ConfigError, match="camera_layout"):
        SyntheticDataset(num_objects=1, camera_layout="grid")


def test_fixed_inputs_sampling_keeps_inputs_and_varies_targets(tmp_path):
    ds = SyntheticDataset(num_objects=6, views_per_object=16, resolution=16, num_surface_points=16, num_sdf_points=16,
                          mesh_resolution=0, cache_dir=str(tmp_path))
    dm = ReconDataModule(ds, num_val_objects=1, num_test_objects=1, num_input_views=4, num_target_views=4,
                         supervise_inputs=False, train_view_sampling="fixed_inputs", batch_size=2)
    item = dm.loader("train").dataset
    seen = set()
    for epoch in range(6):
        inputs, targets = item.choose_views(0, epoch)
        assert inputs == [0, 4, 8, 12]
        assert not set(targets) & set(inputs) and len(set(targets)) == 4
        seen |= set(targets)
    assert len(seen) > 4  # targets move between epochs
