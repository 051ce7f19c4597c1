"""The test fork server (:mod:`tests.reliability.forkserver`) against ``subprocess`` itself: a
small script run both ways gives the same exit status (also killed by a signal or by an uncaught
exception), the same stdout and stderr (separate or merged), argv, working folder, environment
and ``sys.path[0]``; a timeout, ``kill`` and a grandchild holding the output pipe behave as they
do with ``subprocess``. The server here imports nothing (the real one's imports only save time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.reliability import forkserver

SCRIPT = '''
import json, os, signal, subprocess, sys, time
mode = sys.argv[1]
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), "path0": sys.path[0],
                  "name": __name__, "file": __file__}))
print("to stderr", file=sys.stderr)
if mode == "exit":
    sys.exit(3)
if mode == "kill":
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "raise":
    raise ValueError("boom")
if mode == "sleep":
    time.sleep(60)
if mode == "grandchild":  # inherits stdout and writes to it after this process is gone
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5); print('late', flush=True)"])
'''


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("forkserver")
    script = d / "script.py"
    script.write_text(SCRIPT)
    server = forkserver.ForkServer(str(script), {"PATH": "/usr/bin:/bin"}, preimport=())
    yield server, str(script), d
    server.close()


# A request's argv is the console script's: argv[0] names the program (the server's script).


def _env(**extra):
    return {"PATH": "/usr/bin:/bin", "MASTER_PORT": "12345", **extra}


@pytest.mark.parametrize("mode", ["ok", "exit", "kill", "raise", "grandchild"])
def test_a_forked_run_is_what_subprocess_gives(served, mode, tmp_path):
    server, script, _ = served
    env = _env()
    want = subprocess.run([sys.executable, script, mode], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    got = server.run([script, mode], tmp_path, env, timeout=30)
    assert got.returncode == want.returncode == {"exit": 3, "kill": -9, "raise": 1}.get(mode, 0)
    assert got.stderr == want.stderr and got.stdout == want.stdout
    seen = json.loads(got.stdout.splitlines()[0])
    # (the interpreter may add to the environment, PEP 538's LC_CTYPE: the same in both, above)
    assert seen["argv"] == [script, mode] and seen["cwd"] == str(tmp_path) and env.items() <= seen["env"].items()
    assert seen["name"] == "__main__" and seen["file"] == script
    if mode == "grandchild":
        assert got.stdout.splitlines()[-1] == "late"
    if mode == "raise":
        assert got.stderr.splitlines()[-1] == "ValueError: boom" and "runpy" not in got.stderr


def test_merged_output_and_kill_match_popen(served, tmp_path):
    server, script, _ = served
    want = subprocess.Popen([sys.executable, script, "ok"], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    got = server.spawn([script, "ok"], tmp_path, _env(), merge_stderr=True)
    assert got.communicate(timeout=30) == want.communicate(timeout=30)
    assert got.returncode == want.returncode == 0

    p = server.spawn([script, "sleep"], tmp_path, _env(), merge_stderr=True)
    assert p.poll() is None
    t = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        p.communicate(timeout=0.3)
    assert time.monotonic() - t < 5
    p.kill()
    assert p.wait(timeout=30) == -9 and p.poll() == -9
    with pytest.raises(subprocess.TimeoutExpired):
        server.run([script, "sleep"], tmp_path, _env(), timeout=0.3)


def test_what_is_routed(monkeypatch):
    env = {"PATH": "/usr/bin:/bin"}
    assert forkserver.server_for(["export", "--ckpt", "x"], env, "recon3d") is None
    assert forkserver.server_for(["fit", "--help"], env, "recon3d") is None
    monkeypatch.setenv(forkserver.NO_FORKSERVER_ENV, "1")
    assert forkserver.server_for(["fit", "-c", "x.yaml"], env, "recon3d") is None


def test_a_closed_server_lets_its_runs_end_then_exits(served, tmp_path):
    _, script, _ = served
    server = forkserver.ForkServer(script, {"PATH": "/usr/bin:/bin"}, preimport=())
    p = server.spawn([script, "sleep"], tmp_path, _env(), merge_stderr=False)
    server.close()
    time.sleep(0.2)
    assert p.poll() is None and server._proc.poll() is None  # the run goes on, as a subprocess would
    p.kill()
    assert p.wait(timeout=30) == -9
    assert server._proc.wait(timeout=30) == 0
    assert not os.path.exists(server.path)
