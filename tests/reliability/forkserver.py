"""A pre-importing fork server ("zygote") for the tests that run the ``recon3d`` console script.

Why it exists: the conformance and reliability tests start the real CLI (``recon3d fit ...``) as
a separate process some 60 times in the default suite, and each fresh interpreter spends ~9 s of
its run importing torch, Lightning (→ torchmetrics → transformers), scipy and matplotlib before
it reads its first argument. This server imports those modules once; every run is then an
``os.fork()`` of it that executes the installed console script itself (``.venv/bin/recon3d``,
through :func:`runpy.run_path`, as ``__main__``) with the run's argv, working folder, environment
and stdio. The run is still its own process, exits through the interpreter's normal shutdown
(atexit, thread joins, stdio flush) and is reaped by the server, so a SIGKILL, a resume, or
Lightning's DDP launcher (which re-executes ``sys.argv[0]`` for the other rank: a fresh
interpreter) behave as with ``subprocess``.

What a run inherits beyond a fresh interpreter is only what the imports did: the modules of
:data:`PREIMPORT` are loaded, and their changes to ``os.environ`` (recon3d's
``OMP_WAIT_POLICY``) and their output (replayed to the run's own stdout/stderr) are the same as
in a fresh process. ``random`` is reseeded by Python at fork, numpy's global generator here; the
hash seed (``PYTHONHASHSEED``) is the server's, shared by all its runs in one pytest session.
A server is started per environment (minus :data:`RUNTIME_ENV`, which nothing reads at import),
with exactly that environment, so what the imports read (``OMP_NUM_THREADS``,
``PYTHONWARNINGS``, ``PYTHONPATH``, ...) is what each run would have read. The server forks only
while it is single-threaded (checked after the imports: no OpenMP or other thread exists yet).

Only Lightning subcommands (``fit``/``validate``/``test``/``predict``) are routed here; anything
else, or ``RECON3D_TEST_NO_FORKSERVER=1`` in the pytest process's environment, or a server that
fails to start (a warning says so), runs as a plain ``subprocess`` (:func:`server_for` returns
``None``). Linux only (``fork``, ``SCM_RIGHTS``, ``/proc/self/task``).

Protocol: one ``AF_UNIX`` ``SOCK_SEQPACKET`` connection per run. The client sends a JSON request
(``argv``, ``cwd``, ``env``) with the write ends of its stdout/stderr pipes attached
(``SCM_RIGHTS``); the server forks, answers ``{"pid": N}``, and when it reaps the child
``{"returncode": R}`` (``-signal`` for a killed one, as :class:`subprocess.Popen` reports it).
"""

from __future__ import annotations

import atexit
import json
import locale
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings

NO_FORKSERVER_ENV = "RECON3D_TEST_NO_FORKSERVER"
#: Variables that differ between runs and are read only when a run starts (Lightning's cluster
#: environment, torch.distributed's rendezvous; pytest's current test id), never at import: not
#: part of a server's key.
RUNTIME_ENV = ("MASTER_PORT", "MASTER_ADDR", "NODE_RANK", "PYTEST_CURRENT_TEST")
#: Subcommands routed to the server: they import PREIMPORT anyway, first thing.
ROUTED_COMMANDS = ("fit", "validate", "test", "predict")
#: What every Lightning subcommand imports before it parses its config (recon3d.cli's
#: ``_lightning_cli_class``); method modules are left to each run (their registries must not
#: differ from a fresh process's).
PREIMPORT = ("torch", "lightning.pytorch", "lightning.pytorch.cli", "jsonargparse", "recon3d.cli", "recon3d.errors",
             "recon3d.data.datamodule", "recon3d.methods.base")
MAX_SERVERS = 3  # live at once (~0.5 GB each); a new environment or lane closes the least recently used
START_TIMEOUT = 600.0  # seconds for the imports on a loaded 2-core machine
_MSG_SIZE = 1 << 22


# ------------------------------------------------------------------------------------- client
class ForkedProcess:
    """One run forked by the server, with the parts of :class:`subprocess.Popen` the tests use:
    ``pid``, ``args``, ``returncode``, :meth:`poll`, :meth:`wait`, :meth:`communicate`,
    :meth:`send_signal`, :meth:`terminate`, :meth:`kill`. Output is read as it comes (two reader
    threads) and decoded like ``text=True``; stderr is ``None`` when merged into stdout.
    ``communicate`` returns, as with pipes, only once every holder of the pipes (the other DDP
    rank too) has closed them and the run has exited."""

    def __init__(self, args: list[str], conn: socket.socket, pid: int, pipes: list[int], merged: bool):
        self.args, self.pid, self.returncode = args, pid, None
        self._conn, self._merged = conn, merged
        self._chunks: list[list[bytes]] = [[] for _ in pipes]
        self._readers = [threading.Thread(target=self._drain, args=(fd, out), daemon=True) for fd, out in zip(pipes, self._chunks)]
        for t in self._readers:
            t.start()

    @staticmethod
    def _drain(fd: int, out: list[bytes]) -> None:
        with open(fd, "rb", buffering=0) as f:
            while chunk := f.read(1 << 16):
                out.append(chunk)

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            self._read_status()
        return self.returncode

    def _read_status(self) -> None:
        msg = self._conn.recv(_MSG_SIZE)
        self._conn.close()
        if not msg:  # never a made-up status: a test expecting -9 must not pass on this
            raise RuntimeError(f"the fork server died before run {self.pid} ended: {self.args}")
        self.returncode = json.loads(msg)["returncode"]

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._conn], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._read_status()
        return self.returncode

    def _text(self, i: int) -> str:
        data = b"".join(self._chunks[i]).decode(locale.getpreferredencoding(False))
        return data.replace("\r\n", "\n").replace("\r", "\n")

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._readers:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if end is None else max(0.0, end - time.monotonic()))
        return self._text(0), (None if self._merged else self._text(1))

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(15)

    def kill(self) -> None:
        self.send_signal(9)


class ForkServer:
    """Client of one server process that runs ``script`` and is started with ``env`` (its key)
    after importing ``preimport``."""

    def __init__(self, script: str, env: dict[str, str], preimport: tuple[str, ...] = PREIMPORT):
        self._dir = tempfile.mkdtemp(prefix="recon3d_zygote_")
        self.path = os.path.join(self._dir, "sock")
        self._log = open(os.path.join(self._dir, "server.log"), "w+b")
        self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.path, script, *preimport], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        end = time.monotonic() + START_TIMEOUT
        while self._proc.poll() is None and time.monotonic() < end:
            if select.select([self._proc.stdout], [], [], 1.0)[0]:
                break
        line = self._proc.stdout.readline() if self._proc.poll() is None else b""
        if line.strip() != b"ready":
            self.close()
            self._log.seek(0)
            raise RuntimeError(f"the fork server did not start: {line!r} {self._log.read()[-2000:].decode(errors='replace')}")

    def spawn(self, argv: list[str], cwd, env: dict[str, str], merge_stderr: bool) -> ForkedProcess:
        pipes = [os.pipe()] if merge_stderr else [os.pipe(), os.pipe()]
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                conn.connect(self.path)
                req = json.dumps({"argv": argv, "cwd": os.fspath(cwd), "env": env}).encode()
                write_ends = [w for _, w in pipes] * (2 if merge_stderr else 1)
                socket.send_fds(conn, [req], write_ends)
            finally:
                for _, w in pipes:
                    os.close(w)
            reply = conn.recv(_MSG_SIZE)
            if not reply:
                raise RuntimeError("the fork server closed the connection without starting the run")
        except BaseException:
            conn.close()
            for r, _ in pipes:
                os.close(r)
            raise
        return ForkedProcess(argv, conn, json.loads(reply)["pid"], [r for r, _ in pipes], merge_stderr)

    def run(self, argv: list[str], cwd, env: dict[str, str], timeout: float | None) -> subprocess.CompletedProcess:
        """Like ``subprocess.run(argv, capture_output=True, text=True, timeout=timeout)``."""
        p = self.spawn(argv, cwd, env, merge_stderr=False)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise subprocess.TimeoutExpired(argv, timeout, output=out, stderr=err) from None
        except BaseException:  # as subprocess.run: an interrupted wait kills the run
            p.kill()
            raise
        return subprocess.CompletedProcess(argv, p.returncode, out, err)

    def close(self) -> None:
        """No new runs; the server exits once those it started have ended (they are not killed)."""
        if not self._proc.stdin.closed:
            self._proc.stdin.close()  # the server's lifeline
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)


_SERVERS: dict[tuple, ForkServer | None] = {}


def server_for(args: list[str], env: dict[str, str], script: str, lane: str = "") -> ForkServer | None:
    """The server for a ``recon3d <args>`` run in ``env`` (started on first use), or ``None``
    for a plain subprocess (module docstring).

    ``lane``: runs of different lanes come from different servers. Forks of one server share its
    hash seed and memory layout (ids, addresses); fresh processes do not. A run whose result is
    compared bit for bit with others (a test's uninterrupted reference) takes its own lane, so an
    order that depends on ``hash()`` or ``id()`` still differs between the runs compared.
    """
    if os.environ.get(NO_FORKSERVER_ENV, "") not in ("", "0") or not args or args[0] not in ROUTED_COMMANDS:
        return None
    if any(a in ("-h", "--help", "--help-all") for a in args) or not sys.platform.startswith("linux"):
        return None
    base = {k: v for k, v in env.items() if k not in RUNTIME_ENV}
    key = (script, lane, tuple(sorted(base.items())))
    if key in _SERVERS:
        _SERVERS[key] = _SERVERS.pop(key)  # most recently used last
    else:
        live = [k for k, s in _SERVERS.items() if s is not None]
        for old in live[:max(0, len(live) - MAX_SERVERS + 1)]:
            _SERVERS.pop(old).close()
        if not _SERVERS:
            atexit.register(_close_all)  # the pytest process's exit (the servers also exit on their stdin's EOF)
        try:
            _SERVERS[key] = ForkServer(script, base)
        except Exception as e:  # a plain subprocess per run still tests the same thing, slower
            warnings.warn(f"recon3d test fork server unavailable, using subprocesses: {e}", stacklevel=2)
            _SERVERS[key] = None
    return _SERVERS[key]


def drop(server: ForkServer) -> None:
    """Stop using ``server`` (it failed a request); its environment gets plain subprocesses."""
    for k, s in _SERVERS.items():
        if s is server:
            _SERVERS[k] = None
            s.close()


def _close_all() -> None:
    for s in _SERVERS.values():
        if s is not None:
            s.close()


# ------------------------------------------------------------------------------------- server
def _capture_import_output(modules) -> tuple[bytes, bytes]:
    """Import ``modules`` with fds 1 and 2 sent to files; returns what they wrote there."""
    saved = [os.dup(1), os.dup(2)]
    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    for fd, f in zip((1, 2), files):
        os.dup2(f.fileno(), fd)
    try:
        import importlib

        for m in modules:
            importlib.import_module(m)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, s in zip((1, 2), saved):
            os.dup2(s, fd)
            os.close(s)
    out = []
    for f in files:
        f.seek(0)
        out.append(f.read())
        f.close()
    return out[0], out[1]


def _serve(path: str, preimport: list[str]) -> tuple[dict, list[int]]:
    """Import ``preimport``, then accept runs until the lifeline (stdin) closes; returns only in a
    forked child: its request and the two fds to put on 1 and 2."""
    import selectors
    import signal

    out, err = _capture_import_output(preimport)
    threads = os.listdir("/proc/self/task")
    if len(threads) != 1:
        sys.exit(f"fork server: {len(threads)} threads after the imports; forking needs one")
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        sys.exit("fork server: CUDA was initialised by the imports; a forked run could not use it")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(16)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the select below
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(0, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    runs: dict[int, socket.socket] = {}
    os.write(1, b"ready\n")
    closing = False
    while not (closing and not runs):  # the runs still going end as subprocesses would, then the server
        for key, _ in sel.select():
            if key.fileobj is listener:
                if closing:  # the lifeline closed earlier in this batch of events
                    continue
                conn, _ = listener.accept()
                try:
                    msg, fds, _, _ = socket.recv_fds(conn, _MSG_SIZE, 2)
                except OSError:  # the client went away
                    msg, fds = b"", []
                if not msg or len(fds) != 2:
                    for fd in fds:
                        os.close(fd)
                    conn.close()
                    continue
                req = json.loads(msg)
                pid = os.fork()
                if pid == 0:  # the run: drop everything of the server, keep its two fds
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    sel.close()
                    for s in (listener, conn, *runs.values()):
                        s.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    req["import_output"] = (out, err)
                    return req, fds
                for fd in fds:
                    os.close(fd)
                runs[pid] = conn
                _send(conn, {"pid": pid})
            elif key.fileobj == 0:
                if not os.read(0, 1 << 12):  # the client is done (or gone): no new runs
                    sel.unregister(0)
                    sel.unregister(listener)
                    listener.close()
                    closing = True
            else:
                try:
                    while os.read(wake_r, 1 << 12):
                        pass
                except BlockingIOError:
                    pass
                while runs:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                    if pid == 0:
                        break
                    conn = runs.pop(pid, None)
                    if conn is not None:
                        _send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
                        conn.close()
    os._exit(0)


def _send(conn: socket.socket, msg: dict) -> None:
    try:
        conn.send(json.dumps(msg).encode())
    except OSError:  # the client is gone (its test failed); the run is reaped all the same
        pass


def _become_run(req: dict, fds: list[int], script: str) -> None:
    """In the forked child: the run's stdio, folder, environment and argv, as a fresh
    ``recon3d`` process would have them."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for target, fd in zip((1, 2), fds):
        os.dup2(fd, target)
    for fd in set(fds):
        os.close(fd)
    for target, data in zip((1, 2), req["import_output"]):
        if data:
            os.write(target, data)
    os.chdir(req["cwd"])
    # The server was started with the request's environment minus RUNTIME_ENV (its key); what
    # it holds now is that plus the interpreter's and the imports' own changes (PEP 538's
    # LC_CTYPE, recon3d's OMP_WAIT_POLICY): the request's, in its order, with those applied.
    have = dict(os.environ)
    os.environ.clear()
    os.environ.update(req["env"])
    for k in [k for k in req["env"] if k not in have and k not in RUNTIME_ENV]:
        del os.environ[k]
    for k, v in have.items():
        if os.environ.get(k) != v:
            os.environ[k] = v
    sys.argv = [script, *req["argv"][1:]]
    if "numpy" in sys.modules:  # a fresh process seeds numpy's global generator from the OS
        sys.modules["numpy"].random.seed()


if __name__ == "__main__":
    _path, _script, _preimport = sys.argv[1], sys.argv[2], sys.argv[3:]
    # The console script's interpreter has its own folder first on sys.path, not this one.
    sys.path[0] = os.path.dirname(os.path.realpath(_script))
    _req, _fds = _serve(_path, _preimport)
    _become_run(_req, _fds, _script)
    del _path, _preimport, _req, _fds
    import runpy

    try:
        # Raises SystemExit with main()'s status (the script's sys.exit): the interpreter ends
        # the run as it ends the console script (atexit, thread joins, flush).
        runpy.run_path(_script, run_name="__main__")
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as _e:  # as a fresh interpreter reports it: traceback from the script's frame, status 1
        _tb = _e.__traceback__
        while _tb is not None and _tb.tb_frame.f_code.co_filename != _script:
            _tb = _tb.tb_next
        _tb = _tb or _e.__traceback__
        sys.excepthook(type(_e), _e.with_traceback(_tb), _tb)
        sys.exit(1)
