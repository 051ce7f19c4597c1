"""Pose metrics (RRE, TE, Acc@k) against closed forms and scipy, on VGGT-style cameras, and their
wiring from a method's predicted cameras (``Reconstruction.cameras``) into the protocol."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from scipy.spatial.transform import Rotation

from recon3d.data.cameras import Cameras
from recon3d.methods.base import ReconModule
from recon3d.metrics import PRESETS, EvaluationProtocol, PoseError, relative_rotation_errors, translation_errors
from recon3d.models.vggt.cameras import cameras_to_pose_encoding, pose_encoding_to_cameras, relative_to_first
from recon3d.representations.reconstruction import Reconstruction


def _rig(V: int, seed: int) -> torch.Tensor:
    """``(V, 4, 4)`` float64 c2w: random rotations, centres on a radius-2 sphere around a random point."""
    g = torch.Generator().manual_seed(seed)
    c2w = torch.eye(4, dtype=torch.float64).repeat(V, 1, 1)
    c2w[:, :3, :3] = torch.from_numpy(Rotation.random(V, random_state=seed).as_matrix())
    d = torch.randn(V, 3, generator=g, dtype=torch.float64)
    c2w[:, :3, 3] = 2 * d / d.norm(dim=-1, keepdim=True) + torch.randn(3, generator=g, dtype=torch.float64)
    return c2w


def _similarity(seed: int, scale: float) -> torch.Tensor:
    s = torch.eye(4, dtype=torch.float64)
    s[:3, :3] = scale * torch.from_numpy(Rotation.random(random_state=seed).as_matrix())
    s[:3, 3] = torch.tensor([0.3, -1.2, 2.5], dtype=torch.float64)
    return s


def _apply_similarity(sim: torch.Tensor, c2w: torch.Tensor) -> torch.Tensor:
    """A global similarity of a rig: rotate + translate + scale the world (cameras stay rigid)."""
    scale = sim[:3, :3].norm(dim=0)[0]
    rigid = sim.clone()
    rigid[:3, :3] = sim[:3, :3] / scale
    out = rigid @ c2w
    out[:, :3, 3] = scale * (out[:, :3, 3] - rigid[:3, 3]) + rigid[:3, 3]
    return out


def _scipy_rre(pred: torch.Tensor, gt: torch.Tensor) -> list[float]:
    """Independent RRE: scipy rotation magnitude of (R_j^T R_i)_pred^-1 (R_j^T R_i)_gt."""
    out = []
    V = pred.shape[0]
    for i in range(V):
        for j in range(i + 1, V):
            rp = Rotation.from_matrix(pred[j, :3, :3].T.numpy() @ pred[i, :3, :3].numpy())
            rg = Rotation.from_matrix(gt[j, :3, :3].T.numpy() @ gt[i, :3, :3].numpy())
            out.append(math.degrees((rp.inv() * rg).magnitude()))
    return out


def test_planted_30_degrees_on_one_view_closed_form():
    V, k = 5, 2
    gt = _rig(V, 0)
    pred = gt.clone()
    axis = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
    pred[k, :3, :3] = torch.from_numpy(Rotation.from_rotvec((axis / axis.norm() * math.radians(30)).numpy()).as_matrix()) @ gt[k, :3, :3]
    rre = relative_rotation_errors(pred, gt)
    i, j = torch.triu_indices(V, V, offset=1)
    involved = (i == k) | (j == k)
    # a world-frame rotation of view k by 30 deg is a 30 deg error on every pair containing k (conjugation keeps angles)
    assert torch.allclose(rre[involved], torch.full_like(rre[involved], 30.0), atol=1e-6)
    assert rre[~involved].abs().max() < 1e-5
    assert rre.tolist() == pytest.approx(_scipy_rre(pred, gt), abs=1e-5)
    m = PoseError(thresholds=(15.0, 31.0))
    m.update(pred, gt)
    out = m.compute()
    assert float(out["rre"]) == pytest.approx(60.0 / V, abs=1e-4)  # 30 * (V - 1) / (V (V - 1) / 2)
    assert float(out["acc@15"]) == pytest.approx(1 - 2 / V) and float(out["acc@31"]) == 1.0


def test_metrics_are_invariant_to_a_similarity_of_either_set():
    gt = _rig(6, 1)
    g = torch.Generator().manual_seed(3)
    pred = gt.clone()
    noise = torch.from_numpy(Rotation.from_rotvec(0.2 * torch.randn(6, 3, generator=g, dtype=torch.float64).numpy()).as_matrix())
    pred[:, :3, :3] = noise @ gt[:, :3, :3]
    pred[:, :3, 3] += 0.3 * torch.randn(6, 3, generator=g, dtype=torch.float64)
    rre, te = relative_rotation_errors(pred, gt), translation_errors(pred, gt)
    assert rre.min() > 1 and te.min() > 1e-3  # the noise is visible, so invariance is not trivially 0 == 0
    for seed, scale in ((4, 0.1), (5, 7.5)):
        moved = _apply_similarity(_similarity(seed, scale), pred)
        assert torch.allclose(relative_rotation_errors(moved, gt), rre, atol=1e-6)
        assert torch.allclose(translation_errors(moved, gt), te, atol=1e-9)
        moved_gt = _apply_similarity(_similarity(seed + 10, scale), gt)
        assert torch.allclose(relative_rotation_errors(pred, moved_gt), rre, atol=1e-6)
        assert torch.allclose(translation_errors(pred, moved_gt), te, atol=1e-9)


def test_te_two_views_is_the_chord_of_the_translation_direction_angle():
    # V = 2: the normalised centre of view 1 in view 0's frame is a unit vector, so TE = |u_p - u_g| = 2 sin(phi / 2)
    gt = _rig(2, 2)
    rel = torch.linalg.inv(gt[0]) @ gt[1]
    t = rel[:3, 3]
    axis = torch.linalg.cross(t, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    axis = axis / axis.norm()  # perpendicular to t, so turning by phi about it moves the direction by exactly phi
    for phi in (5.0, 40.0, 120.0):
        turn = torch.from_numpy(Rotation.from_rotvec((math.radians(phi) * axis).numpy()).as_matrix())
        moved = rel.clone()
        moved[:3, 3] = 3.0 * (turn @ t)  # another direction, another length: the length is normalised away
        pred = torch.stack([gt[0], gt[0] @ moved])
        pred[1, :3, :3] = gt[1, :3, :3]
        assert float(translation_errors(pred, gt)[0]) == pytest.approx(2 * math.sin(math.radians(phi) / 2), abs=1e-9)


def test_acc_thresholds_are_strict_and_follow_the_argument():
    gt = _rig(3, 4)
    pred = gt.clone()
    pred[1, :3, :3] = torch.from_numpy(Rotation.from_rotvec([math.radians(20.0), 0.0, 0.0]).as_matrix()) @ gt[1, :3, :3]
    # pairs (0,1), (1,2) at 20 deg, (0,2) at 0 deg
    m = PoseError()
    m.update(pred[None], gt[None])
    out = m.compute()
    assert set(out) == {"rre", "te", "acc@15", "acc@30"}
    assert float(out["acc@15"]) == pytest.approx(1 / 3) and float(out["acc@30"]) == 1.0
    m = PoseError(thresholds=(10.0, 20.5, 45.0))
    m.update(pred, gt)
    out = m.compute()
    assert [float(out[k]) for k in ("acc@10", "acc@20.5", "acc@45")] == pytest.approx([1 / 3, 1.0, 1.0])


def test_vggt_encoding_at_scene_scale_scores_zero_against_the_world_rig():
    # VGGT predicts cameras in frame 0's frame at a scene-normalised scale; the metrics must not care
    gt = _rig(4, 5)
    K = torch.tensor([[60.0, 0, 32], [0, 60.0, 32], [0, 0, 1]], dtype=torch.float64).expand(1, 4, 3, 3)
    true = Cameras(gt[None], K, 64, 64)
    rel = relative_to_first(true)
    c2w = rel.c2w.clone()
    c2w[..., :3, 3] *= 0.37  # the network's scene normalisation
    enc = cameras_to_pose_encoding(Cameras(c2w, K, 64, 64)).float()  # what the camera head emits
    pred = pose_encoding_to_cameras(enc, 64, 64)
    assert torch.allclose(pred.c2w[0, 0], torch.eye(4), atol=1e-5)
    m = PoseError()
    m.update(pred.c2w, true.c2w)
    out = m.compute()
    assert float(out["rre"]) < 1e-2 and float(out["te"]) < 1e-5 and float(out["acc@15"]) == 1.0


def _proto() -> EvaluationProtocol:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EvaluationProtocol(geometry_preset=replace(PRESETS["gtr"], rotation_search=False), lpips_net="vgg",
                                  lpips_pretrained=False, num_points=100)


def test_predicted_cameras_reach_the_protocol_through_the_method_eval_path():
    gt = torch.stack([_rig(4, 6), _rig(4, 7)])
    pred = gt.clone()
    pred[0, 3, :3, :3] = torch.from_numpy(Rotation.from_rotvec([0.0, 0.0, math.radians(30.0)]).as_matrix()) @ gt[0, 3, :3, :3]
    K = torch.tensor([[60.0, 0, 32], [0, 60.0, 32], [0, 0, 1]], dtype=torch.float64).expand(2, 4, 3, 3)
    ids = ["a", "b"]
    batch = SimpleNamespace(object_ids=ids, inputs=SimpleNamespace(cameras=Cameras(gt, K, 64, 64)))
    host = SimpleNamespace(evaluation=_proto())
    rec = Reconstruction(ids, representation=None, cameras=Cameras(pred, K, 64, 64))
    ReconModule._eval_poses(host, rec, batch)
    out = host.evaluation.compute()
    # object a: 3 of 6 pairs at 30 deg -> 15 deg; object b: 0; reported = mean over objects
    assert out["rre"] == pytest.approx(7.5, abs=1e-4)
    assert out["acc@15"] == pytest.approx((0.5 + 1.0) / 2)
    rows = {r["object_id"]: r for r in host.evaluation.per_object()}
    assert rows["a"]["rre"] == pytest.approx(15.0, abs=1e-4) and rows["b"]["rre"] < 1e-4
    # a method without predicted cameras (or one input view) adds nothing
    host2 = SimpleNamespace(evaluation=_proto())
    ReconModule._eval_poses(host2, Reconstruction(ids, representation=None), batch)
    assert "rre" not in host2.evaluation.compute()
