"""EvaluationProtocol: names, aggregation, files; and DDP (2 gloo processes) vs single process."""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import sys
import warnings
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from recon3d.errors import ShapeError
from recon3d.metrics import PRESETS, PSNR, ChamferDistance, EvaluationProtocol, PoseError, psnr

sys.path.insert(0, os.path.dirname(__file__))
from test_metrics_geometry import _cube, _rot  # noqa: E402

IDS = ["obj_a", "obj_b", "obj_c", "obj_d"]


def _data():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 2, 3, 32, 32, generator=g)
    pred = (target + 0.05 * torch.randn(4, 2, 3, 32, 32, generator=g)).clamp(0, 1)
    mask = torch.zeros(4, 2, 1, 32, 32)
    mask[..., 6:26, 4:28] = 1
    gt_pts = torch.rand(4, 400, 3, generator=g) * 2 - 1
    pred_pts = gt_pts + 0.02 * torch.randn(4, 400, 3, generator=g)
    c2w = torch.eye(4).repeat(4, 3, 1, 1)
    c2w[..., :3, 3] = torch.randn(4, 3, 3, generator=g)
    pc2w = c2w.clone()
    pc2w[:, 1, :3, :3] = _rot((0.0, 0.0, 1.0), 20.0).float()
    return pred, target, mask, pred_pts, gt_pts, pc2w, c2w


def _proto():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # rotation search off: keeps the test fast on 2 shared cores (it is tested in test_metrics_geometry)
        gtr = replace(PRESETS["gtr"], rotation_search=False)
        return EvaluationProtocol(geometry_preset=gtr, lpips_net="vgg", lpips_pretrained=False, num_points=300)


def _feed(proto, idx):
    pred, target, mask, pp, gp, pc, gc = _data()
    ids = [IDS[i] for i in idx]
    proto.update_views(ids, pred[idx], target[idx], mask[idx])
    proto.update_geometry(ids, pp[idx], gp[idx])
    proto.update_poses(ids, pc[idx], gc[idx])


def test_protocol_names_values_and_files(tmp_path):
    proto = _proto()
    _feed(proto, [0, 1])
    _feed(proto, [2, 3])
    _feed(proto, [3])  # a duplicate (e.g. DistributedSampler padding) does not count twice
    out = proto.compute()
    expected = {"psnr", "ssim", "lpips", "psnr_masked", "ssim_masked", "lpips_masked", "cd", "fscore", "precision",
                "recall", "rre", "te", "acc@15", "acc@30"}
    assert set(out) == expected
    pred, target, *_ = _data()
    assert abs(out["psnr"] - float(psnr(pred, target).mean())) < 1e-4
    assert abs(out["rre"] - 20.0 * 2 / 3) < 1e-3 and out["acc@15"] == pytest.approx(1 / 3)
    rows = proto.per_object()
    assert [r["object_id"] for r in rows] == IDS
    assert out["cd"] == pytest.approx(sum(r["cd"] for r in rows) / 4)
    assert proto.write(tmp_path) == tmp_path
    with open(tmp_path / "metrics.csv") as f:
        rec = list(csv.DictReader(f))
    assert len(rec) == 1 and float(rec[0]["psnr"]) == pytest.approx(out["psnr"], rel=1e-5)
    with open(tmp_path / "per_object.csv") as f:
        assert [r["object_id"] for r in csv.DictReader(f)] == IDS
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["num_objects"] == 4 and doc["geometry_protocol"]["cd_scale"] == 100 and "RANDOM" in doc["lpips"]
    proto.reset()
    assert proto.compute() == {}


def test_protocol_meshes_iou_nc_and_errors():
    proto = EvaluationProtocol(image_metrics=("psnr",), geometry_preset="reconviagen", num_points=800)
    v, f = _cube((-0.5, -0.5, -0.5))
    # scaled, shifted and turned by 90 degrees: normalisation + rotation search undo all of it
    rv = 3.0 * v @ _rot((0.0, 0.0, 1.0), 90.0).T + torch.tensor([5.0, 1.0, 0.0], dtype=torch.float64)
    proto.update_meshes(["cube"], [(rv, f)], [(v, f)])
    out = proto.compute()
    # 800 points on a 2x2x2 cube: NN spacing ~0.08 is the noise floor of CD / F@0.1 / NC at edges
    assert out["iou"] > 0.999 and out["nc"] > 0.9 and out["fscore"] > 0.6 and out["cd"] < 0.12, out
    with pytest.raises(ShapeError, match="pred"):
        proto.update_views(["x"], torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="object_ids"):
        proto.update_geometry(["x", "y"], torch.rand(1, 10, 3), torch.rand(1, 10, 3))
    with pytest.raises(ValueError, match="geometry_preset"):
        EvaluationProtocol(geometry_preset="nope")


# ------------------------------------------------------------------------------------------ DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _standalone(idx):
    pred, target, _, pp, gp, pc, gc = _data()
    m_psnr, m_cd, m_pose = PSNR(), ChamferDistance(), PoseError()
    m_psnr.update(pred[idx], target[idx])
    m_cd.update(pp[idx], gp[idx])
    m_pose.update(pc[idx], gc[idx])
    return m_psnr, m_cd, m_pose


def _worker(rank, world, port, out_path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        idx = [0, 2] if rank == 0 else [1, 3]
        proto = _proto()
        _feed(proto, idx)
        res = {"proto": proto.compute(), "rows": proto.per_object()}
        m_psnr, m_cd, m_pose = _standalone(idx)
        res["psnr"] = float(m_psnr.compute())
        res["cd"] = float(m_cd.compute())
        res["pose"] = {k: float(v) for k, v in m_pose.compute().items()}
        written = proto.write(os.path.join(os.path.dirname(out_path), "files"))
        res["wrote"] = written is not None
        with open(f"{out_path}.{rank}", "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_two_gloo_processes_match_single(tmp_path):
    port = _free_port()
    mp.start_processes(_worker, args=(2, port, str(tmp_path / "res")), nprocs=2, join=True, start_method="fork")
    proto = _proto()
    _feed(proto, [0, 1, 2, 3])
    single = proto.compute()
    m_psnr, m_cd, m_pose = _standalone([0, 1, 2, 3])
    for rank in range(2):
        res = json.loads((tmp_path / f"res.{rank}").read_text())
        assert res["wrote"] == (rank == 0)
        assert set(res["proto"]) == set(single)
        for k, v in single.items():
            assert math.isclose(res["proto"][k], v, rel_tol=1e-5, abs_tol=1e-6), k
        assert [r["object_id"] for r in res["rows"]] == IDS
        assert res["psnr"] == pytest.approx(float(m_psnr.compute()), rel=1e-6)
        assert res["cd"] == pytest.approx(float(m_cd.compute()), rel=1e-6)
        for k, v in m_pose.compute().items():
            assert res["pose"][k] == pytest.approx(float(v), rel=1e-6, abs=1e-7)
    assert (tmp_path / "files" / "per_object.csv").is_file()
