"""Distributed training through Lightning on the CPU (gloo), driven by the real CLI.

- 2 processes (``strategy=ddp``, ``devices=2``) with per-process batch 1 vs one process with
  batch 2: identical weights on every rank, the same loss curve and the same final weights as
  the single process (to float tolerance);
- a simulated 2-node run on loopback: two launches with ``NODE_RANK`` / ``MASTER_ADDR`` /
  ``MASTER_PORT`` and ``--trainer.num_nodes 2`` does the same.
"""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file

from tests.reliability.harness import (
    CONFIGS,
    FULL_MATRIX_ENV,
    REPO,
    ckpt_dir,
    clean_env,
    cli_args,
    free_port,
    full_matrix,
    load_ckpt,
    loss_curve,
    popen,
    run,
    tail,
)

pytestmark = pytest.mark.ddp

WALL: dict[str, float] = {}
#: Configs whose DDP runs are in the default suite (the rest with ``RECON3D_FULL_MATRIX=1``).
DEFAULT_SUITE_DDP = {"toy"}


@pytest.fixture(scope="module", params=[c for c in CONFIGS if c.ddp], ids=lambda c: c.name)
def single(request, tmp_path_factory, synthetic_cache):
    """The 1-process reference run (batch = the DDP global batch)."""
    case = request.param
    if case.name not in DEFAULT_SUITE_DDP and not full_matrix():
        # ReconModule's DDP path (sampler sharding, metric sync, checkpoint on rank 0) is the same
        # for every method; the toy config runs it in the default suite, each method under make test-ddp.
        pytest.skip(f"{case.name}: the 2-process and multi-node runs with {FULL_MATRIX_ENV}=1 (make test-ddp)")
    d = tmp_path_factory.mktemp(f"single_{case.name}")
    t = time.perf_counter()
    p = run(cli_args(case, d, synthetic_cache, *case.single_args, "--trainer.callbacks+=recon3d.methods.toy.DumpWeights",
                     f"--trainer.callbacks.dirpath={d}"), cwd=d, lane="reference")
    WALL[f"{case.name}: 1 process, batch 2"] = time.perf_counter() - t
    assert p.returncode == 0, tail(p)
    return case, d


def _check_against_single(single_dir, ddp_dir, world: int) -> None:
    ranks = [load_file(str(ddp_dir / f"weights_rank{r}.safetensors")) for r in range(world)]
    for r in range(1, world):
        for k in ranks[0]:
            assert torch.equal(ranks[0][k], ranks[r][k]), f"rank {r} differs from rank 0 in {k}"
    ref = load_file(str(single_dir / "weights_rank0.safetensors"))
    for k in ref:
        torch.testing.assert_close(ranks[0][k], ref[k], rtol=1e-4, atol=2e-5, msg=lambda m, k=k: f"{k}: {m}")
    a, b = loss_curve(single_dir), loss_curve(ddp_dir)
    assert sorted(a) == sorted(b) and len(a) >= 4, (a, b)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-6), f"loss at step {step}: ddp {b[step]} vs single {a[step]}"
    assert load_ckpt(ckpt_dir(ddp_dir) / "last.ckpt")["global_step"] == load_ckpt(ckpt_dir(single_dir) / "last.ckpt")["global_step"]


def test_ddp_two_processes_match_single_process(single, tmp_path, synthetic_cache):
    case, single_dir = single
    t = time.perf_counter()
    p = run(cli_args(case, tmp_path, synthetic_cache, "-c", str(REPO / "configs/trainer/cpu_ddp2.yaml"), *case.ddp_args,
                     "--trainer.callbacks+=recon3d.methods.toy.DumpWeights", f"--trainer.callbacks.dirpath={tmp_path}"),
            cwd=tmp_path, env=clean_env(MASTER_PORT=str(free_port())))
    WALL[f"{case.name}: DDP 2 processes x batch 1"] = time.perf_counter() - t
    assert p.returncode == 0, tail(p)
    _check_against_single(single_dir, tmp_path, 2)
    print(f"\nwall times: {WALL}")


def test_two_nodes_on_loopback(single, tmp_path, synthetic_cache):
    case, single_dir = single
    if case.name != "toy" and not full_matrix():
        # The launcher (two node ranks over loopback) does not depend on the method; the 2-process
        # run above covers each method's DDP numerics.
        pytest.skip(f"{case.name}: multi-node launch runs on the toy config in the default suite; every config with {FULL_MATRIX_ENV}=1 (make test-ddp)")
    port = str(free_port())
    args = cli_args(case, tmp_path, synthetic_cache, "-c", str(REPO / "configs/trainer/cpu_ddp2.yaml"), *case.ddp_args,
                    "--trainer.devices", "1", "--trainer.num_nodes", "2",
                    "--trainer.callbacks+=recon3d.methods.toy.DumpWeights", f"--trainer.callbacks.dirpath={tmp_path}")
    t = time.perf_counter()
    procs = []
    for node in (0, 1):
        wd = tmp_path / f"node{node}"
        wd.mkdir()
        procs.append(popen(args, cwd=wd, env=clean_env(NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)))
    outs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=240)
        except Exception:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    WALL[f"{case.name}: 2 nodes x 1 process (loopback)"] = time.perf_counter() - t
    for node, (proc, out) in enumerate(zip(procs, outs)):
        assert proc.returncode == 0, f"node {node}:\n{tail(out)}"
    assert "world_size: 2" in outs[0] or "GLOBAL_RANK: 0" in outs[0] or "2 processes" in outs[0], tail(outs[0])
    _check_against_single(single_dir, tmp_path, 2)
    print(f"\nwall times: {WALL}")
