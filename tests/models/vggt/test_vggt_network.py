"""VGGTNetwork pieces against hand-built references: RoPE positions and rotations, the frame /
global alternation on a 2-frame input (float64 loops over frames and tokens), the camera
encoding round trip through Cameras, head shapes, frame chunking, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from recon3d.data.cameras import Cameras
from recon3d.errors import ConfigError, ShapeError
from recon3d.models.vggt import VGGTNetwork, vggt_config
from recon3d.models.vggt.cameras import (
    cameras_to_pose_encoding,
    matrix_to_quat,
    pose_encoding_to_cameras,
    quat_to_matrix,
    relative_to_first,
)
from recon3d.models.vggt.layers import Rope2D, patch_positions


def test_patch_positions_are_grid_plus_one_with_specials_at_zero():
    pos = patch_positions(2, 2, 3, 5)
    assert pos.shape == (2, 11, 2)
    want = [[0, 0]] * 5 + [[r + 1, c + 1] for r in range(2) for c in range(3)]
    assert pos[0].tolist() == want and pos[1].tolist() == want


def test_rope_scores_depend_only_on_position_differences():
    # <R(p) q, R(p') k> = <q, R(p' - p) k> holds for a rotary code and for no absolute one.
    g = torch.Generator().manual_seed(0)
    rope = Rope2D(100.0)
    q, k = torch.randn(1, 1, 2, 16, generator=g, dtype=torch.float64).unbind(2)
    q, k = q[:, :, None], k[:, :, None]
    def score(pq, pk):
        return float((rope(q, torch.tensor([[pq]])) * rope(k, torch.tensor([[pk]]))).sum())
    s = score((2, 5), (7, 1))
    # angles are formed in float32 (as upstream's frequency table), hence 1e-6, not float64 precision
    assert s == pytest.approx(score((3, 9), (8, 5)), abs=1e-6)
    assert s == pytest.approx(score((0, 0), (5, -4)), abs=1e-6)
    assert abs(s - score((2, 5), (7, 2))) > 1e-3  # x matters
    assert abs(s - score((2, 5), (6, 1))) > 1e-3  # y matters
    # position (0, 0) (the special tokens) is the identity
    torch.testing.assert_close(rope(q, torch.zeros(1, 1, 2, dtype=torch.long)), q)


def _ln(x, mod, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y * mod.weight + mod.bias if mod.weight is not None else y


def _rope_ref(x, pos, base=100.0):
    """x (N, d), pos (N, 2): channel pairs (j, j + d/4) of the first half rotate by y·ω_j, of the second by x·ω_j."""
    N, d = x.shape
    half, quarter = d // 2, d // 4
    out = x.clone()
    for n in range(N):
        for axis in range(2):
            off = axis * half
            for j in range(quarter):
                a = float(pos[n, axis]) * base ** (-2 * j / half)
                u, v = x[n, off + j], x[n, off + j + quarter]
                out[n, off + j] = u * math.cos(a) - v * math.sin(a)
                out[n, off + j + quarter] = v * math.cos(a) + u * math.sin(a)
    return out


def _block_ref(blk, x, pos):
    """One aggregator block on a single sequence x (N, C), float64, attention by explicit softmax."""
    H = blk.attn.num_heads
    N, C = x.shape
    d = C // H
    h = _ln(x, blk.norm1, 1e-5)
    qkv = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).view(N, 3, H, d)
    heads = []
    for i in range(H):
        q = _rope_ref(_ln(qkv[:, 0, i], blk.attn.q_norm, 1e-5), pos)
        k = _rope_ref(_ln(qkv[:, 1, i], blk.attn.k_norm, 1e-5), pos)
        w = torch.softmax(q @ k.T / math.sqrt(d), -1)
        heads.append(w @ qkv[:, 2, i])
    a = torch.cat(heads, -1) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    x = x + blk.ls1.gamma * a
    h = _ln(x, blk.norm2, 1e-5)
    m = torch.nn.functional.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    return x + blk.ls2.gamma * m


def _tiny(**kw):
    torch.manual_seed(0)
    net = VGGTNetwork("tiny", depth=2, dpt_layers=(0, 1, 1, 1), **kw).double().eval()
    with torch.no_grad():  # layer scale 1 and O(1) special tokens so attention visibly matters
        for name, p in net.aggregator.named_parameters():
            if name.endswith("gamma") and "patch_embed" not in name:
                p.fill_(1.0)
        net.aggregator.camera_token.normal_()
        net.aggregator.register_token.normal_()
    return net


def test_frame_and_global_alternation_match_a_hand_built_reference():
    net = _tiny()
    agg = net.aggregator
    images = torch.rand(1, 2, 3, 28, 42, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        out = agg(images)
        mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(3, 1, 1)
        patches = agg.patch_embed((images[0] - mean) / std)  # (2, 6, C)
        frames = [torch.cat([agg.camera_token[0, min(s, 1)], agg.register_token[0, min(s, 1)], patches[s]], 0) for s in range(2)]
        pos = [[0, 0]] * 5 + [[r + 1, c + 1] for r in range(2) for c in range(3)]
        pos = torch.tensor(pos)
        P = len(pos)
        for layer in range(2):
            frames = [_block_ref(agg.frame_blocks[layer], f, pos) for f in frames]  # each frame alone
            frame_out = torch.stack(frames)
            joint = _block_ref(agg.global_blocks[layer], torch.cat(frames, 0), torch.cat([pos, pos], 0))  # all frames
            frames = list(joint.split(P, 0))
            want = torch.cat([frame_out, joint.view(2, P, -1)], -1)
            # RoPE angles are float32 in the network (as upstream): 1e-6, while attention terms are O(1) here
            torch.testing.assert_close(out[layer][0], want, atol=1e-6, rtol=1e-6)


def test_frame_blocks_do_not_mix_frames_and_global_blocks_do():
    net = _tiny()
    g = torch.Generator().manual_seed(5)
    a = torch.rand(1, 2, 3, 28, 28, generator=g, dtype=torch.float64)
    b = a.clone()
    b[:, 1] = torch.rand(3, 28, 28, generator=g, dtype=torch.float64)
    with torch.no_grad():
        oa, ob = net.aggregator(a)[0], net.aggregator(b)[0]
    C = oa.shape[-1] // 2
    torch.testing.assert_close(oa[0, 0, :, :C], ob[0, 0, :, :C], atol=0, rtol=0)  # layer 0 frame part of frame 0
    assert (oa[0, 0, :, C:] - ob[0, 0, :, C:]).abs().max() > 1e-3  # its global part sees frame 1


def _random_cameras(n: int, seed: int, height=56, width=70) -> Cameras:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.linalg.det(q))[:, None, None]
    c2w = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    c2w[:, :3, :3], c2w[:, :3, 3] = q, torch.randn(n, 3, generator=g, dtype=torch.float64) * 2
    K = torch.zeros(n, 3, 3, dtype=torch.float64)
    K[:, 0, 0], K[:, 1, 1] = 40 + 30 * torch.rand(n, generator=g), 45 + 30 * torch.rand(n, generator=g)
    K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = width / 2, height / 2, 1
    return Cameras(c2w.float(), K.float(), width, height)


def test_camera_encoding_round_trips_through_cameras():
    cams = _random_cameras(12, 0).reshape(3, 4)
    enc = cameras_to_pose_encoding(cams)
    assert enc.shape == (3, 4, 9) and (enc[..., 6] >= 0).all()
    back = pose_encoding_to_cameras(enc, cams.height, cams.width)
    torch.testing.assert_close(back.c2w, cams.c2w, atol=1e-5, rtol=0)
    torch.testing.assert_close(back.K, cams.K, atol=1e-5, rtol=1e-6)
    # the encoding is VGGT's: t and quaternion of the world-to-camera, FoVs from the focal lengths
    torch.testing.assert_close(quat_to_matrix(enc[..., 3:7]), cams.w2c[..., :3, :3], atol=1e-6, rtol=0)
    torch.testing.assert_close(enc[..., :3], cams.w2c[..., :3, 3])
    torch.testing.assert_close(enc[..., 7], 2 * torch.atan(28 / cams.K[..., 1, 1]))


def test_quaternion_convention_is_xyzw_against_closed_form():
    # 90 degrees about z: q = (0, 0, sin 45, cos 45) in xyzw; R maps x to y.
    s = math.sqrt(0.5)
    R = quat_to_matrix(torch.tensor([0.0, 0.0, s, s], dtype=torch.float64))
    torch.testing.assert_close(R, torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64))
    # near-180-degree rotations (w ~ 0) take another branch of matrix_to_quat
    for axis in torch.eye(3, dtype=torch.float64):
        q = torch.cat([axis * math.sin(3.1 / 2), torch.tensor([math.cos(3.1 / 2)], dtype=torch.float64)])
        torch.testing.assert_close(matrix_to_quat(quat_to_matrix(q)), q, atol=1e-12, rtol=0)


def test_relative_to_first_makes_frame_zero_identity_and_keeps_relative_poses():
    cams = _random_cameras(6, 1).reshape(2, 3)
    rel = relative_to_first(cams)
    torch.testing.assert_close(rel.c2w[:, 0], torch.eye(4).expand(2, 4, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(rel.w2c[:, 1] @ rel.c2w[:, 2], cams.w2c[:, 1] @ cams.c2w[:, 2], atol=1e-5, rtol=0)
    enc = cameras_to_pose_encoding(rel)
    torch.testing.assert_close(enc[:, 0, :7], torch.tensor([0, 0, 0, 0, 0, 0, 1.0]).expand(2, 7), atol=1e-5, rtol=0)


def test_head_output_shapes_and_frame_chunking():
    net = VGGTNetwork("tiny").eval()
    images = torch.rand(2, 3, 3, 28, 42, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = net(images)
        net.cfg = vggt_config(net.cfg, frames_chunk_size=None)
        whole = net(images)
    assert len(out["tokens"]) == 4 and all(t.shape == (2, 3, 5 + 6, 64) for t in out["tokens"])
    assert out["patch_start_idx"] == 5
    assert out["pose_enc"].shape == (2, 3, 9) and len(out["pose_enc_list"]) == 4
    assert (out["pose_enc"][..., 7:] >= 0).all()
    assert out["depth"].shape == (2, 3, 28, 42, 1) and out["depth_conf"].shape == (2, 3, 28, 42)
    assert out["world_points"].shape == (2, 3, 28, 42, 3) and out["world_points_conf"].shape == (2, 3, 28, 42)
    assert (out["depth"] > 0).all() and (out["depth_conf"] > 1).all() and (out["world_points_conf"] > 1).all()
    for k in ("depth", "depth_conf", "world_points", "world_points_conf"):  # chunks of 2 frames == all 3 at once
        torch.testing.assert_close(out[k], whole[k], atol=1e-6, rtol=1e-5)


def test_camera_head_detaches_between_iterations():
    net = VGGTNetwork("tiny", heads=("camera",))
    out = net(torch.rand(1, 2, 3, 28, 28))
    assert set(out) == {"tokens", "patch_start_idx", "pose_enc_list", "pose_enc"}
    # each iteration refines a detached copy of the previous one: the learned empty pose (the first
    # iteration's input) reaches the first output and no later one
    p = net.camera_head.empty_pose_tokens
    g_first, = torch.autograd.grad(out["pose_enc_list"][0].sum(), p, retain_graph=True)
    g_last, = torch.autograd.grad(out["pose_enc"].sum(), p, allow_unused=True)
    assert g_first.abs().sum() > 0 and g_last is None


def test_bad_sizes_and_too_many_views_are_one_line():
    net = VGGTNetwork("tiny")
    with pytest.raises(ShapeError, match=r"images: .*multiples of the patch size 14, got 30x40 \(nearest valid size 28x42"):
        net(torch.rand(1, 2, 3, 30, 40))
    with pytest.raises(ShapeError, match=r"images: expected a \[B, S, 3, H, W\]"):
        net(torch.rand(2, 3, 28, 28))
    # tiny budget 4096 tokens: 10 tokens per 28x28 frame (5 special + 4 patches) -> at most 455 views... use big frames
    with pytest.raises(ConfigError, match=r"images: 3 views x 1013 tokens = 3039 tokens exceed .*max_tokens=2048 \(at most 2 views"):
        VGGTNetwork("tiny", max_tokens=2048).aggregator.check_budget(3, 14 * 36, 14 * 28)
    with pytest.raises(ConfigError, match="img_size"):
        vggt_config("tiny", img_size=30)
    with pytest.raises(ConfigError, match="unknown field"):
        vggt_config("tiny", widht=3)
    with pytest.raises(ShapeError, match="fov_h and fov_w"):
        pose_encoding_to_cameras(torch.zeros(1, 2, 9), 28, 28)
