"""Pose metrics of an untrained camera head are reported flagged, never as plain numbers: the
protocol's ``flag`` (values kept, named in metrics.json), VGGTModule's / ReconViaGenModule's
``pose_caveat`` (no pretrained weights, too few steps; carried through checkpoints), and
``recon3d compare``'s results.md (‡, the reason in the notes, never bold)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recon3d.commands.compare import Entry, Suite
from recon3d.commands.compare_report import collect, results_markdown
from recon3d.data.cameras import look_at
from recon3d.methods.vggt import MIN_POSE_TRAIN_STEPS, VGGTModule, _camera_record
from recon3d.metrics.pose import relative_rotation_errors
from recon3d.metrics.protocol import POSE_METRICS, EvaluationProtocol, describe_protocol
from recon3d.models.vggt import VGGTNetwork


def _rig(n: int, seed: int) -> torch.Tensor:
    """``(n, 4, 4)`` c2w cameras on a sphere looking at the origin."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1) * 2.0
    return look_at(eye, torch.zeros(n, 3, dtype=torch.float64))


def _protocol() -> EvaluationProtocol:
    return EvaluationProtocol(image_metrics=["psnr"], geometry_preset="gtr")


def test_flagged_pose_values_are_kept_and_named_in_metrics_json(tmp_path):
    ids = ["a", "b"]
    pred = torch.stack([_rig(3, 0), _rig(3, 1)])
    true = torch.stack([_rig(3, 2), _rig(3, 3)])
    plain, flagged = _protocol(), _protocol()
    for ev in (plain, flagged):
        ev.update_poses(ids, pred, true)
    flagged.flag(ids, POSE_METRICS, "camera head not pretrained")
    doc_plain = json.loads((plain.write(tmp_path / "plain") / "metrics.json").read_text())
    doc = json.loads((flagged.write(tmp_path / "flagged") / "metrics.json").read_text())
    assert doc["metrics"] == doc_plain["metrics"]  # the values are not hidden or changed
    ref = sum(float(relative_rotation_errors(p, t).double().mean()) for p, t in zip(pred, true)) / 2
    assert doc["metrics"]["rre"] == pytest.approx(ref, rel=1e-6)
    assert doc_plain["flagged_metrics"] == {} and doc_plain["flags"] == []
    assert doc["flagged_metrics"] == {m: "camera head not pretrained (2 objects)" for m in POSE_METRICS}
    assert doc["flags"] == [{"reason": "camera head not pretrained", "metrics": list(POSE_METRICS), "num_objects": 2, "objects": ids}]
    assert "- `rre` reported but flagged (not a measurement of the method): camera head not pretrained (2 objects)" in describe_protocol(doc)
    with pytest.raises(ValueError, match="unknown"):
        flagged.flag(ids, ["rre_typo"], "x")
    flagged.reset()
    assert flagged.flags_summary({}) == ([], {})


def _vggt(**kw) -> VGGTModule:
    torch.manual_seed(0)
    return VGGTModule(network=VGGTNetwork("tiny"), rank=4, alpha=8.0, adapter_file=None, **kw)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    from recon3d.data.datamodule import ReconDataModule
    from recon3d.data.synthetic import SyntheticDataset

    ds = SyntheticDataset(num_objects=1, views_per_object=3, resolution=28, num_surface_points=64, num_sdf_points=64,
                          mesh_resolution=0, cache_dir=str(tmp_path_factory.mktemp("pose_flags")))
    dm = ReconDataModule(ds, num_val_objects=0, num_test_objects=0, num_input_views=2, num_target_views=1, batch_size=1,
                         with_geometry=False, input_resolution=28, target_resolution=28)
    return next(iter(dm.train_dataloader()))


def test_vggt_without_pretrained_weights_flags_its_pose_metrics(batch, tmp_path):
    model = _vggt().eval()
    model.evaluation = _protocol()
    with torch.no_grad():
        rec = model.reconstruct(batch)
    assert rec.extras["pretrained_camera_head"] is False and rec.extras["camera_train_steps"] == 0
    assert "without pretrained weights" in rec.extras["pose_caveat"]
    model._eval_poses(rec, batch)
    _, flagged = model.evaluation.flags_summary()
    assert set(flagged) == set(POSE_METRICS) and "0 training steps" in flagged["rre"]
    # the released weights (a tiny stand-in saved in upstream's layout): nothing flagged
    torch.manual_seed(7)
    torch.save(VGGTNetwork("tiny").state_dict(), tmp_path / "model.pt")
    pre = _vggt(official_weights=str(tmp_path / "model.pt")).eval()
    pre.evaluation = _protocol()
    with torch.no_grad():
        rec = pre.reconstruct(batch)
    assert rec.extras["pretrained_camera_head"] is True and rec.extras["pose_caveat"] is None
    pre._eval_poses(rec, batch)
    assert pre.evaluation.flags_summary() == ([], {})
    assert "rre" in pre.evaluation.compute()


def test_camera_head_status_travels_with_checkpoints(tmp_path):
    m = _vggt()
    ck = {"state_dict": m.state_dict(), "global_step": 40}
    m.on_save_checkpoint(ck)
    assert ck["recon3d_camera_head"] == {"weights": None, "train_steps": 0}
    # a checkpoint recorded as trained long enough: unflagged after loading it
    late = _vggt()
    late.on_load_checkpoint({"state_dict": {}, "recon3d_camera_head": {"weights": None, "train_steps": MIN_POSE_TRAIN_STEPS}})
    assert late.camera_head_status()["pose_caveat"] is None
    # a checkpoint from before the record: its global_step counts
    old = _vggt()
    old.on_load_checkpoint({"state_dict": {}, "global_step": 12})
    st = old.camera_head_status()
    assert st["camera_train_steps"] == 12 and "12 training steps" in st["pose_caveat"]
    # one whose camera head came from released weights stays pretrained
    rel = _vggt()
    rel.on_load_checkpoint({"state_dict": {}, "recon3d_camera_head": {"weights": "/w/model.pt", "train_steps": 3}})
    assert rel.camera_head_status()["pretrained_camera_head"] is True and rel.camera_head_status()["pose_caveat"] is None
    # init_weights: what the file records, an older Lightning checkpoint's hparams, else the file itself
    torch.save({"state_dict": {}, "recon3d_camera_head": {"weights": None, "train_steps": 5}}, tmp_path / "a.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"official_weights": None}, "global_step": 9}, tmp_path / "b.ckpt")
    torch.save({"aggregator.camera_token": torch.zeros(1)}, tmp_path / "c.pt")
    assert _camera_record(str(tmp_path / "a.ckpt")) == (None, 5)
    assert _camera_record(str(tmp_path / "b.ckpt")) == (None, 9)
    assert _camera_record(str(tmp_path / "c.pt")) == (str(tmp_path / "c.pt"), 0)


def _run_folder(out: Path, name: str, metrics: dict, flagged: dict) -> None:
    d = out / "runs" / name
    (d / "test").mkdir(parents=True)
    (d / "done.json").write_text(json.dumps({"steps": 10, "fit_seconds": 1.0}))
    doc = {"metrics": metrics, "missing_metrics": {}, "notes": [], "flagged_metrics": flagged, "flags": [],
           "per_object": [{"object_id": "o1", **metrics}], "geometry_protocol": {}, "image_metrics": ["psnr"], "lpips": "not requested"}
    (d / "test" / "metrics.json").write_text(json.dumps(doc))


def test_compare_report_marks_flagged_values(tmp_path):
    why = "camera head without pretrained weights (no model.official_weights), 10 training steps (< 10000) (1 object)"
    _run_folder(tmp_path, "vggt_cpu", {"psnr": 12.0, "rre": 5.0, "te": 0.1}, {"rre": why, "te": why})
    _run_folder(tmp_path, "other", {"psnr": 11.0, "rre": 20.0, "te": 0.5}, {})
    suite = Suite(entries=[Entry("vggt_cpu", Path("a.yaml")), Entry("other", Path("b.yaml"))], metrics=["psnr", "rre", "te"])
    doc = collect(tmp_path, suite, {})
    assert doc["entries"]["vggt_cpu"]["flagged_metrics"] == {"rre": why, "te": why}
    # the flagged (lower) rre is not the column's best; the unflagged psnr still is
    assert doc["best"]["rre"] == ["other"] and doc["best"]["psnr"] == ["vggt_cpu"]
    md = results_markdown(doc)
    row = next(line for line in md.splitlines() if line.startswith("| vggt_cpu "))
    assert "| 5 ‡ |" in row and "| 0.1 ‡ |" in row and "**12**" in row
    other = next(line for line in md.splitlines() if line.startswith("| other "))
    assert "‡" not in other and "**20**" in other
    assert f"- vggt_cpu ‡: `rre`, `te` reported but not a measurement of the method: {why}" in md
    assert "‡: computed as every other value but flagged" in md
    # nothing flagged: no mark, no legend line
    clean = results_markdown({**doc, "entries": {"other": doc["entries"]["other"]}})
    assert "‡" not in clean
