"""``recon3d data render-meshes``: meshes the test builds (a textured box OBJ + MTL + PNG, a UV
sphere GLB, a garbled file) rendered into the Blender layout and read back through
``BlenderDataset``.

The reference silhouette is independent of the renderer: both meshes are convex, so the true
mask is the set of pixel centres inside the convex hull of the mesh's projected vertices
(``mesh.ply`` projected by the cameras the loader returns).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from recon3d.cli import main as cli_main
from recon3d.data.formats import BlenderDataset
from recon3d.errors import DataError
from tests.render.test_textured_mesh import checker, textured_box, uv_sphere

trimesh = pytest.importorskip("trimesh")


@pytest.fixture()
def mesh_dir(tmp_path):
    root = tmp_path / "meshes"
    (root / "box" / "meshes").mkdir(parents=True)
    # off-centre and not a cube: the normalisation has work to do
    box = textured_box(checker(4, 8))
    box.apply_transform(np.diag([1.5, 1.0, 0.8, 1.0]))
    box.apply_translation([3.0, -1.0, 2.0])
    box.export(root / "box" / "meshes" / "model.obj")
    sphere = uv_sphere(0.3, 24)
    sphere.apply_translation([0.0, 5.0, 0.0])
    sphere.visual.vertex_colors = np.tile([0, 200, 0, 255], (len(sphere.vertices), 1)).astype(np.uint8)
    (root / "sphere").mkdir()
    sphere.export(root / "sphere" / "sphere.glb")
    (root / "broken").mkdir()
    (root / "broken" / "bad.glb").write_bytes(b"glTF not really")
    return root


def _run(argv, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli_main(["data", "render-meshes", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


SIZE = 48
ARGS = ["--resolution", str(SIZE), "--orbit-views", "3", "--orbit-elevations", "10,40", "--random-views", "2", "--fov", "50",
        "--radius", "3.5", "--random-radius", "3,4", "--no-progress"]


def _hull_mask(points: torch.Tensor, cams, size: int) -> torch.Tensor:
    """``(V, H, W)`` pixel centres inside the convex hull of each view's projected ``points``."""
    from scipy.spatial import Delaunay

    pix, _ = cams.project(points[None].expand(len(cams), -1, -1))
    yy, xx = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    centres = np.stack([xx.ravel(), yy.ravel()], -1)
    return torch.stack([torch.from_numpy(Delaunay(p.double().numpy()).find_simplex(centres) >= 0).reshape(size, size) for p in pix])


def test_renders_load_through_the_blender_loader_and_project_onto_their_masks(tmp_path, mesh_dir, capsys):
    out = tmp_path / "out"
    rc, stdout, err = _run([str(mesh_dir), "--out", str(out), *ARGS], capsys)
    assert rc == 0, err
    assert "2 rendered, 0 already done, 1 skipped" in stdout
    bad = [ln for ln in err.splitlines() if "skipped" in ln]
    assert len(bad) == 1 and "bad.glb" in bad[0] and "cannot read mesh" in bad[0]
    assert sorted(p.name for p in out.iterdir()) == ["box", "sphere"]  # ids: GSO-style folder names, no partial folders left
    for oid in ("box", "sphere"):
        mesh = trimesh.load(out / oid / "mesh.ply", process=False)
        v = torch.as_tensor(np.array(mesh.vertices), dtype=torch.float32)
        # the protocol's normalisation: bounding box centred, longest half-side 1
        lo, hi = v.min(0).values, v.max(0).values
        assert torch.allclose((lo + hi) / 2, torch.zeros(3), atol=1e-5) and float((hi - lo).max()) == pytest.approx(2.0, abs=1e-5)
        for split, n in (("input", 4), ("orbit", 6), ("random", 2)):
            ds = BlenderDataset(str(out / oid), split=split)
            raw = ds.load_views(0, list(range(ds.num_views(0))))
            assert raw.rgb.shape == (n, 3, SIZE, SIZE) and raw.alpha is not None
            ref = _hull_mask(v, raw.cameras, SIZE)
            mask = raw.alpha[:, 0] > 0.5
            iou = float((mask & ref).sum() / (mask | ref).sum())
            assert iou >= 0.98, (oid, split, iou)
            # depth: the surface point it unprojects to lies on the normalised mesh's surface
            assert raw.depths is not None and raw.normals is not None
            inside = raw.alpha[:, 0] == 1
            d = raw.depths[:, 0]
            assert bool((d[inside] > 0).all()) and bool((d[raw.alpha[:, 0] == 0] == 0).all())
            nn = raw.normals.norm(dim=1)
            assert torch.allclose(nn[inside], torch.ones(1), atol=1e-2) and bool((nn[raw.alpha[:, 0] == 0] == 0).all())
        ds_all = BlenderDataset(str(out / oid), split="test")  # no transforms_test.json: transforms.json, every view
        assert ds_all.num_views(0) == 12
        meta = json.loads((out / oid / "render_meshes.json").read_text())
        assert meta["view_sets"] == {"input": [0, 4], "orbit": [4, 10], "random": [10, 12]}
    # sphere: green vertex colours, its depth map is the ray-sphere distance (radius 1 after normalisation)
    ds = BlenderDataset(str(out / "sphere"), split="input")
    raw = ds.load_views(0, [0])
    inside = raw.alpha[0, 0] == 1
    assert torch.allclose(raw.rgb[0][:, inside], torch.tensor([0.0, 200 / 255, 0.0])[:, None], atol=1 / 255)
    pts = raw.cameras.unproject(_pixel_grid(SIZE)[None], raw.depths[0, 0][None])[0]
    radius = pts[inside].norm(dim=-1)
    assert float((radius - 1).abs().max()) < 0.02  # a 24-gon sphere lies within 1 - cos(pi/24) of its circumsphere
    # its ground truth: mesh.ply in the cameras' frame, sampled on request (seeded)
    ds = BlenderDataset(str(out / "sphere"), split="input", num_surface_points=500)
    geo = ds.load_geometry(0)
    assert geo.mesh_paths == [str(out / "sphere" / "mesh.ply")] and geo.surface_points.shape == (500, 3)
    assert float((geo.surface_points.norm(dim=-1) - 1).abs().max()) < 0.02
    cos = (geo.surface_normals * torch.nn.functional.normalize(geo.surface_points, dim=-1)).sum(-1)
    assert float(cos.min()) > 0.97  # outward face normals
    assert torch.equal(ds.load_geometry(0).surface_points, geo.surface_points)
    meta = json.loads((out / "box" / "render_meshes.json").read_text())
    assert meta["mesh_up"] == "z" and json.loads((out / "sphere" / "render_meshes.json").read_text())["mesh_up"] == "y"


def _pixel_grid(size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return torch.stack([xx, yy], -1)


def test_resume_skips_finished_redoes_partial_and_refuses_other_settings(tmp_path, mesh_dir, capsys):
    out = tmp_path / "out"
    args = [str(mesh_dir), "--out", str(out), *ARGS, "--random-views", "0", "--orbit-views", "0", "--resolution", "16"]
    rc, stdout, err = _run(args, capsys)
    assert rc == 0 and "2 rendered" in stdout, err
    stamp = (out / "sphere" / "input" / "r_0.png").stat().st_mtime_ns
    # a killed run: the box's finished folder gone, a half-written one left behind
    import shutil

    shutil.rmtree(out / "box")
    (out / ".box.partial" / "input").mkdir(parents=True)
    (out / ".box.partial" / "input" / "r_0.png").write_bytes(b"half")
    rc, stdout, err = _run(args, capsys)
    assert rc == 0 and "1 rendered, 1 already done, 1 skipped" in stdout, stdout + err
    assert not (out / ".box.partial").exists() and (out / "box" / "render_meshes.json").is_file()
    assert (out / "sphere" / "input" / "r_0.png").stat().st_mtime_ns == stamp  # not re-rendered
    BlenderDataset(str(out / "box"), split="input").load_views(0, [0, 1, 2, 3])
    # other settings on the same folder: one line, exit 2; --overwrite re-renders
    rc, stdout, err = _run([*args, "--fov", "30"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "other settings (fov_deg)" in err and err.startswith("recon3d: error:")
    rc, stdout, err = _run([*args, "--fov", "30", "--overwrite"], capsys)
    assert rc == 0 and "2 rendered" in stdout


def test_rank_split_renders_every_other_object(tmp_path, mesh_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    args = [str(mesh_dir), "--out", str(out), *ARGS, "--random-views", "0", "--orbit-views", "0", "--resolution", "16",
            "--input-azimuths", "0"]
    # sorted ids: box, broken, sphere -> rank 0 of 2: box, sphere; rank 1: broken (unreadable: exit 2)
    rc, stdout, _ = _run([*args, "--rank", "0", "--world-size", "2"], capsys)
    assert rc == 0 and "rank 0/2: 2 objects: 2 rendered" in stdout
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    rc, _, err = _run(args, capsys)
    assert rc == 2 and "none of the 1 meshes" in err and "bad.glb" in err
    rc, _, err = _run([*args, "--rank", "2", "--world-size", "2"], capsys)
    assert rc == 2 and "--rank/--world-size" in err


def test_views_are_the_protocol_orbits_and_seeded_random_views():
    from recon3d.commands.render_meshes import view_set_cameras

    s = {"resolution": 16, "fov_deg": 40.0, "radius": 2.5, "input_azimuths": [0.0, 90.0], "input_elevation": 0.0,
         "orbit_views": 8, "orbit_elevations": [0.0, 30.0], "random_views": 5, "random_elevations": [-10.0, 60.0],
         "random_radius": [2.0, 3.0], "seed": 0}
    sets = view_set_cameras("obj", s)
    cams, info = sets["orbit"]
    c = cams.centers
    assert len(cams) == 16 and torch.allclose(c.norm(dim=-1), torch.full((16,), 2.5), atol=1e-5)
    el = torch.rad2deg(torch.asin(c[:, 2] / 2.5))
    assert torch.allclose(el, torch.tensor([0.0] * 8 + [30.0] * 8), atol=1e-3)
    az = torch.rad2deg(torch.atan2(c[:8, 1], c[:8, 0])) % 360
    assert torch.allclose(az, torch.arange(8) * 45.0, atol=1e-3)
    # every camera looks at the origin
    fwd = cams.c2w[:, :3, 2]
    assert torch.allclose(fwd, -c / c.norm(dim=-1, keepdim=True), atol=1e-5)
    rnd, rinfo = sets["random"]
    r = rnd.centers.norm(dim=-1)
    assert bool(((r >= 2.0) & (r <= 3.0)).all()) and all(-10 <= e <= 60 for e in rinfo["elevation_deg"])
    again = view_set_cameras("obj", s)["random"][0]
    other = view_set_cameras("obj2", s)["random"][0]
    assert torch.equal(again.c2w, rnd.c2w) and not torch.allclose(other.c2w, rnd.c2w)
    assert math.isclose(info["radius"][0], 2.5)


def test_normalisation_is_the_protocols_and_y_up_meshes_turn_to_z_up():
    from recon3d.commands.render_meshes import normalise_mesh
    from recon3d.metrics.alignment import normalize_to_cube
    from tests.render.test_textured_mesh import load_textured_mesh_from

    box = textured_box(checker(2, 2))
    box.apply_transform(np.diag([4.0, 2.0, 1.0, 1.0]))
    box.apply_translation([1.0, 2.0, 3.0])
    m = load_textured_mesh_from(box)
    for mode in ("bbox", "sphere"):
        got, transform = normalise_mesh(m, "z", mode)
        want, _, _ = normalize_to_cube(m.verts.double(), mode)
        assert torch.allclose(got.verts.double(), want, atol=1e-5)
        v = torch.cat([m.verts.double(), torch.ones(len(m.verts), 1, dtype=torch.float64)], 1) @ transform.T
        assert torch.allclose(v[:, :3], got.verts.double(), atol=1e-5)
    # y-up: the long x side stays, the file's y (2 units) becomes z, the file's z becomes -y
    got, _ = normalise_mesh(m, "y", "bbox")
    ext = got.verts.amax(0) - got.verts.amin(0)
    assert torch.allclose(ext, torch.tensor([2.0, 0.5, 1.0]), atol=1e-5)
    assert torch.allclose(got.vertex_normals.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_rendered_set_feeds_the_datamodule_with_its_input_and_orbit_views(tmp_path, mesh_dir, capsys):
    from recon3d.commands.render_meshes import view_set_cameras
    from recon3d.data.datamodule import ReconDataModule
    from recon3d.data.formats import RenderedMeshesDataset

    out = tmp_path / "out"
    args = [str(mesh_dir), "--out", str(out), "--resolution", "16", "--orbit-views", "6", "--orbit-elevations", "20",
            "--random-views", "2", "--supersample", "1", "--no-progress"]
    rc, _, err = _run(args, capsys)
    assert rc == 0, err
    (out / ".late.partial").mkdir()  # a folder being written is not an object
    ds = RenderedMeshesDataset(str(out), num_surface_points=32)
    assert ds.object_ids() == ["box", "sphere"]
    assert ds.view_sets(0) == {"input": [0, 1, 2, 3], "orbit": list(range(4, 10)), "random": [10, 11]}
    dm = ReconDataModule(ds, num_val_objects=0, num_test_objects=1, num_input_views=4, num_target_views=3,
                         supervise_inputs=False, batch_size=1)
    b = next(iter(dm.test_dataloader()))
    oid = b.object_ids[0]
    settings = json.loads((out / oid / "render_meshes.json").read_text())["settings"]
    want = view_set_cameras(oid, settings)
    # inputs: the input set in order (azimuths 0/90/180/270); targets: evenly spaced orbit views
    assert torch.allclose(b.inputs.cameras.c2w[0], want["input"][0].c2w, atol=1e-5)
    assert torch.allclose(b.targets.cameras.c2w[0], want["orbit"][0].c2w[[0, 2, 4]], atol=1e-5)
    assert b.geometry.mesh_paths == [str(out / oid / "mesh.ply")]
    # random sampling draws targets among the orbit views only, and refuses a missing set
    inputs, targets = ds.choose_views(0, 0, 2, 4, "random", True, torch.Generator().manual_seed(0))
    assert inputs == [0, 2] and targets[:2] == [0, 2] and set(targets[2:]) <= set(range(4, 10)) and len(targets) == 6
    with pytest.raises(DataError, match="no view set 'turntable'"):
        RenderedMeshesDataset(str(out), target_sets=["turntable"]).choose_views(0, 0, 4, 2, "fixed", False, torch.Generator())
