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


def _directions(cams) -> torch.Tensor:
    centre = cams.c2w[:, :3, 3].double()
    return centre / centre.norm(dim=-1, keepdim=True)


def test_fixed_elevations_cycle_and_spread_the_inputs(tmp_path):
    tet = [35.26439, 20.0, 0.0, -20.0, -35.26439, -20.0, 0.0, 20.0]
    ds = SyntheticDataset(num_objects=2, views_per_object=16, resolution=16, camera_layout="fixed",
                          fixed_elevations=tet, cache_dir=str(tmp_path))
    d = _directions(ds.cameras(1))
    el = torch.rad2deg(torch.asin(d[:, 2]))
    torch.testing.assert_close(el, torch.tensor(tet * 2, dtype=torch.float64), rtol=0, atol=1e-4)
    # inputs 0, 4, 8, 12 at azimuths 0/90/180/270 and +-35.26 deg: the vertices of a regular
    # tetrahedron, every pair arccos(-1/3) = 109.47 deg apart (closed form)
    inputs = d[[0, 4, 8, 12]]
    angles = torch.rad2deg(torch.acos((inputs @ inputs.T).clamp(-1, 1)))[torch.triu_indices(4, 4, 1).unbind()]
    torch.testing.assert_close(angles, torch.full((6,), 109.4712, dtype=torch.float64), rtol=0, atol=1e-3)
    # the default cycle puts inputs 1 and 3 (4 and 12) nearly opposite: what the option is for
    dflt = _directions(SyntheticDataset(num_objects=2, views_per_object=16, resolution=16, camera_layout="fixed",
                                        cache_dir=str(tmp_path)).cameras(0))
    assert torch.rad2deg(torch.acos(dflt[4] @ dflt[12])) > 170
    # a separate cache: the renders differ
    assert ds.cache_dir != SyntheticDataset(num_objects=2, views_per_object=16, resolution=16, camera_layout="fixed",
                                            cache_dir=str(tmp_path)).cache_dir


@pytest.mark.parametrize("kwargs, match", [
    (dict(fixed_elevations=[10.0]), "only used with camera_layout 'fixed'"),
    (dict(camera_layout="fixed", fixed_elevations=[]), "non-empty list"),
    (dict(camera_layout="fixed", fixed_elevations=[10.0, 95.0]), r"\(-90, 90\)"),
])
def test_fixed_elevations_refused_naming_the_option(kwargs, match):
    with pytest.raises(ConfigError, match=match) as e:
        SyntheticDataset(num_objects=1, **kwargs)
    assert "fixed_elevations" in str(e.value)
