"""Synthetic set: deterministic, exact depth/normals/surface points, geometry consistent with renders."""

import numpy as np
import pytest
import torch

from recon3d.data.cameras import orbit_cameras
from recon3d.data.rays import camera_rays
from recon3d.data.synthetic import SyntheticDataset, render_sdf_views, sample_object
from recon3d.data.synthetic.shapes import FAMILIES, Primitive, SyntheticObject
from recon3d.data.synthetic.textures import sample_texture
from recon3d.errors import ConfigError


def _sphere(radius=0.6):
    prim = Primitive("sphere", torch.tensor([radius]), torch.eye(3), torch.zeros(3))
    return SyntheticObject([prim], sample_texture(torch.Generator().manual_seed(0)))


def test_sphere_depth_matches_closed_form():
    cams = orbit_cameras(torch.tensor([30.0]), torch.tensor([20.0]), 2.5, 40.0, 48, 48)
    r = render_sdf_views(_sphere(0.6), cams)
    o, d = camera_rays(cams)
    # Ray-sphere intersection in closed form.
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - 0.36)
    hit = disc > 0
    t = -b - disc.clamp_min(0).sqrt()
    z = t * (d * cams.c2w[:, None, None, :3, 2]).sum(-1)
    got = r.depth[:, 0]
    # Sphere tracing stops within eps of the surface in SDF units, i.e. eps / cos(incidence)
    # along the ray; away from the silhouette (cos > 0.5) that is under 1.5e-3.
    inside = hit & (disc > 0.09)
    assert torch.equal(r.alpha[:, 0].bool()[hit & (disc > 0.01)], hit[hit & (disc > 0.01)])
    assert (got[inside] - z[inside]).abs().max() < 1.5e-3
    # Normals of a sphere are the normalised hit points.
    p = o + t[..., None] * d
    n = r.normals.permute(0, 2, 3, 1)
    assert torch.allclose(n[inside], torch.nn.functional.normalize(p[inside], dim=-1), atol=2e-3)


def test_same_seed_same_bytes(tmp_path):
    a = SyntheticDataset(num_objects=3, views_per_object=4, resolution=24, seed=5, cache_dir=str(tmp_path / "a"))
    b = SyntheticDataset(num_objects=3, views_per_object=4, resolution=24, seed=5, cache_dir=str(tmp_path / "b"))
    ga, gb = a.generate(2), b.generate(2)
    assert ga.keys() == gb.keys()
    for k in ga:
        assert np.array_equal(ga[k], gb[k]), k
    c = SyntheticDataset(num_objects=3, views_per_object=4, resolution=24, seed=6, cache_dir=str(tmp_path / "c"))
    assert not np.array_equal(c.generate(2)["rgb"], ga["rgb"])


def test_cached_load_equals_fresh(tmp_path):
    ds = SyntheticDataset(num_objects=2, views_per_object=5, resolution=20, cache_dir=str(tmp_path))
    first = ds.load_views(1, [0, 3])
    again = SyntheticDataset(num_objects=2, views_per_object=5, resolution=20, cache_dir=str(tmp_path)).load_views(1, [0, 3])
    assert torch.equal(first.rgb, again.rgb) and torch.equal(first.cameras.c2w, again.cameras.c2w)
    # A corrupt cache entry is regenerated, not trusted (a fresh reader: no in-memory copy).
    ds._path(1).write_bytes(b"garbage")
    fresh = SyntheticDataset(num_objects=2, views_per_object=5, resolution=20, cache_dir=str(tmp_path), memory_cache_objects=0)
    assert torch.equal(fresh.load_views(1, [0, 3]).rgb, first.rgb)


def test_memory_cache_is_bounded_and_equal_to_disk(tmp_path):
    ds = SyntheticDataset(num_objects=3, views_per_object=4, resolution=16, cache_dir=str(tmp_path), memory_cache_objects=2)
    disk = SyntheticDataset(num_objects=3, views_per_object=4, resolution=16, cache_dir=str(tmp_path), memory_cache_objects=0)
    for i in (0, 1, 2, 0):
        a, b = ds.load_views(i, [1, 2]), disk.load_views(i, [1, 2])
        assert torch.equal(a.rgb, b.rgb) and torch.equal(a.depths, b.depths)
        assert torch.equal(ds.load_geometry(i).surface_points, disk.load_geometry(i).surface_points)
    assert list(ds._memory) == [2, 0]  # least recently used (1) dropped
    assert not disk._memory
    # The cached arrays are shared between calls, so they are read-only, and what a caller
    # receives is its own copy: editing it does not change the next load.
    got = ds.load_views(0, [1])
    got.rgb.add_(1.0)
    assert torch.equal(ds.load_views(0, [1]).rgb, disk.load_views(0, [1]).rgb)
    geo = ds.load_geometry(0)
    geo.surface_points.zero_()
    assert torch.equal(ds.load_geometry(0).surface_points, disk.load_geometry(0).surface_points)
    with pytest.raises(ConfigError, match="memory_cache_objects"):
        SyntheticDataset(num_objects=1, memory_cache_objects=-1, cache_dir=str(tmp_path))


def test_geometry_is_consistent_with_renders(tmp_path):
    ds = SyntheticDataset(num_objects=2, views_per_object=3, resolution=32, num_surface_points=512, num_sdf_points=256,
                          mesh_resolution=32, cache_dir=str(tmp_path))
    obj = ds.object(0)
    g = ds.load_geometry(0)
    assert obj.sdf(g.surface_points).abs().max() < 1e-4
    assert torch.allclose(g.surface_normals.norm(dim=-1), torch.ones(512), atol=1e-4)
    assert torch.allclose(obj.sdf(g.sdf_points), g.sdf_values, atol=1e-6)
    assert (g.sdf_values < 0).any() and (g.sdf_values > 0).any()
    assert g.surface_points.abs().max() <= 1.0
    # Depth back-projects onto the surface.
    v = ds.load_views(0, [1])
    o, d = camera_rays(v.cameras)
    fwd = v.cameras.c2w[:, None, None, :3, 2]
    depth = v.depths[:, 0]
    hit = v.alpha[:, 0] > 0.5
    t = depth / (d * fwd).sum(-1)
    p = (o + t[..., None] * d)[hit]
    assert obj.sdf(p).abs().max() < 2e-3
    import trimesh

    mesh = trimesh.load(g.mesh_paths[0])
    assert len(mesh.faces) > 100


def test_families_and_containment():
    for seed in range(30):
        obj = sample_object(seed)
        assert obj.bounding_radius() <= 0.951
        assert set(obj.families) <= set(FAMILIES)
    with pytest.raises(ConfigError, match="families"):
        sample_object(0, families=("teapot",))
    with pytest.raises(ConfigError, match="radius_range"):
        SyntheticDataset(radius_range=(0.5, 1.0))


def _legacy_texture_draws(seed_state: torch.Generator):
    """The texture draws as the sampler made them before the texture options (a reference
    written out here): kind, colour a, b ~ 1 - a, axis, frequency in [2, 6], salt."""
    from recon3d.data.synthetic.textures import TEXTURE_KINDS

    g = seed_state
    kind = TEXTURE_KINDS[int(torch.randint(4, (), generator=g))]
    a = torch.rand(3, generator=g) * 0.6 + 0.2
    b = (1.0 - a + (torch.rand(3, generator=g) - 0.5) * 0.3).clamp(0.05, 0.95)
    axis = torch.nn.functional.normalize(torch.randn(3, generator=g), dim=0)
    freq = 2.0 + 4.0 * float(torch.rand((), generator=g))
    return kind, a, b, axis, freq


def test_texture_options_change_texture_not_shape():
    for seed in range(6):
        ref = _legacy_texture_draws(torch.Generator().manual_seed(seed))
        t = sample_texture(torch.Generator().manual_seed(seed))
        assert (t.kind, t.freq) == (ref[0], ref[4])
        assert torch.equal(t.color_a, ref[1]) and torch.equal(t.color_b, ref[2]) and torch.equal(t.axis, ref[3])
    pts = torch.rand(500, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    style = {"kinds": ("gradient", "stripes"), "palette": "independent", "frequency": (1.0, 1.5)}
    seen = set()
    for seed in range(12):
        base, other = sample_object(seed), sample_object(seed, texture=style)
        assert torch.equal(base.sdf(pts), other.sdf(pts))  # same shape, same pose
        tex = other.texture
        seen.add(tex.kind)
        assert tex.kind in style["kinds"] and 1.0 <= tex.freq <= 1.5
        assert bool(((tex.color_b >= 0.2) & (tex.color_b <= 0.8)).all())
    # independent colours are not near-complements: over 12 objects b deviates from 1 - a
    diffs = [float((sample_object(s, texture=style).texture.color_b - (1 - sample_object(s, texture=style).texture.color_a)).abs().max())
             for s in range(12)]
    assert max(diffs) > 0.3 and seen == {"gradient", "stripes"}


def test_texture_options_enter_the_cache_key_and_are_checked(tmp_path):
    a = SyntheticDataset(num_objects=1, views_per_object=1, resolution=8, cache_dir=str(tmp_path))
    b = SyntheticDataset(num_objects=1, views_per_object=1, resolution=8, cache_dir=str(tmp_path), texture_palette="independent")
    c = SyntheticDataset(num_objects=1, views_per_object=1, resolution=8, cache_dir=str(tmp_path), texture_kinds=["stripes", "checker", "gradient", "noise"])
    assert a.cache_dir != b.cache_dir and a.cache_dir == c.cache_dir  # the default spelled out is the default
    for kw, key in (({"texture_palette": "pastel"}, "texture_palette"), ({"texture_kinds": ["marble"]}, "texture_kinds"),
                    ({"texture_frequency": (3.0, 1.0)}, "texture_frequency")):
        with pytest.raises(ConfigError, match=key):
            SyntheticDataset(num_objects=1, views_per_object=1, resolution=8, cache_dir=str(tmp_path), **kw)
