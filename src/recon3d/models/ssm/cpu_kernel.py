"""The fused CPU selective-scan kernel: build, load, and the autograd function around it.

The kernel (``csrc/selective_scan_cpu.c``, plain C, forward and backward) is compiled on first
use with the system C compiler into a per-user cache (``$RECON3D_CACHE``, else
``$XDG_CACHE_HOME/recon3d``, else ``~/.cache/recon3d``; ``kernels/`` below it), keyed by a hash of
the source, compiler and flags, and loaded with :mod:`ctypes`. Plain C and ctypes rather than a
``torch.utils.cpp_extension`` build: no torch headers, so a build takes about a second instead of
a minute, and no ninja dependency. ctypes releases the GIL during a call, so the channel range is
split over a thread pool of ``torch.get_num_threads()`` workers.

On x86-64 with GCC the kernel calls glibc's vector ``exp``/``expf`` (libmvec) and, where the CPU
has them, AVX2/FMA; elsewhere it is compiled portably. No ``-ffast-math``: only the per-step
reduction over states is reordered (SIMD sums), so results match the sequential recurrence to
float rounding.

Failure to build (no compiler, a read-only cache and temp dir, ...) raises
:class:`~recon3d.errors.BackendUnavailableError` with the compiler's message; the ``auto`` backend
then falls back to the pure-torch scan.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from recon3d.errors import BackendUnavailableError
from recon3d.utils.io import atomic_path

__all__ = ["fused_scan_core", "cpu_kernel_available", "kernel_build_error", "load_cpu_kernel", "kernel_cache_dir"]

_SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.c"
_BASE_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno"]


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept (created on demand)."""
    root = os.environ.get("RECON3D_CACHE")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "recon3d" / "kernels"


def _compiler() -> list[str]:
    """``$CC`` when set (an error if it is not found), else Python's build compiler, cc, gcc, clang."""
    explicit = os.environ.get("CC")
    candidates = [explicit] if explicit else [sysconfig.get_config_var("CC") or "", "cc", "gcc", "clang"]
    for cand in candidates:
        parts = shlex.split(cand)
        if parts and shutil.which(parts[0]):
            return parts
    if explicit:
        raise BackendUnavailableError(f"selective scan 'fused_cpu' backend: CC={explicit!r} is not an executable on PATH")
    raise BackendUnavailableError("selective scan 'fused_cpu' backend: no C compiler found (install gcc, or set CC)")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _flag_sets() -> list[list[str]]:
    """Flag sets to try, fastest first."""
    sets = []
    x86 = platform.machine() in ("x86_64", "AMD64")
    if x86:
        simd = ["-mavx2", "-mfma"] if {"avx2", "fma"} <= _cpu_flags() else []
        sets.append(simd + ["-DRECON3D_LIBMVEC"])
        if simd:
            sets.append(simd)
    sets.append([])
    return [_BASE_FLAGS + s for s in sets]


def _compiler_id(cc: list[str]) -> str:
    try:
        return subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except Exception:  # noqa: BLE001 - any failure only weakens the cache key
        return cc[0]


class _CompileFailed(Exception):
    """One flag set did not compile (the message is the command and its last error line)."""


def _build() -> Path:
    cc = _compiler()
    source = _SOURCE.read_bytes()
    cache = kernel_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / "recon3d-kernels"
        cache.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in _flag_sets():
        key = hashlib.sha256(source + " ".join([*cc, _compiler_id(cc), *flags]).encode()).hexdigest()[:16]
        target = cache / f"selective_scan_cpu-{key}.so"
        if target.exists():
            return target
        # Compile onto an atomic temporary beside the target (the package's one write rule,
        # recon3d.utils.io.atomic_path): concurrent processes (DDP ranks) never load a
        # half-written library, and a failed compile leaves nothing behind.
        try:
            with atomic_path(target, suffix=".so", mode=0o777) as tmp:
                cmd = [*cc, *flags, str(_SOURCE), "-o", str(tmp), "-lm"]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                if proc.returncode != 0:
                    raise _CompileFailed(f"{' '.join(cmd)}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            return target
        except _CompileFailed as e:
            errors.append(str(e))
    raise BackendUnavailableError("selective scan 'fused_cpu' backend: the C kernel did not compile: " + " | ".join(errors))


_LOCK = threading.Lock()


@functools.cache
def load_cpu_kernel() -> ctypes.CDLL:
    """Build (once, cached on disk) and load the kernel; raises BackendUnavailableError on failure."""
    with _LOCK:
        path = _build()
        lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int64
    for suffix in ("f32", "f64"):
        fwd = getattr(lib, f"recon3d_scan_fwd_{suffix}")
        fwd.argtypes = [p] * 8 + [i] * 7
        fwd.restype = i
        bwd = getattr(lib, f"recon3d_scan_bwd_{suffix}")
        bwd.argtypes = [p] * 15 + [i] * 7
        bwd.restype = i
    return lib


@functools.cache
def kernel_build_error() -> BackendUnavailableError | None:
    """None when the kernel builds and loads here, else the error (computed once per process)."""
    try:
        load_cpu_kernel()
    except BackendUnavailableError as e:
        return e
    return None


def cpu_kernel_available() -> bool:
    """True when the fused CPU kernel builds (or is already built) and loads here."""
    return kernel_build_error() is None


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool; rebuilt after a fork (the child has none of the parent's threads)."""
    global _POOL
    if _POOL is None or _POOL[:2] != (os.getpid(), workers):
        if _POOL is not None and _POOL[0] == os.getpid():
            _POOL[2].shutdown(wait=False)
        _POOL = (os.getpid(), workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recon3d-scan"))
    return _POOL[2]


#: Below this many state updates (B*D*L*N) a call runs on the calling thread: the hand-off to the
#: pool costs more than it saves.
MIN_PARALLEL_WORK = 200_000


def _ranges(nd: int, work: int) -> list[tuple[int, int]]:
    """Split channels ``[0, nd)`` into one contiguous range per worker thread."""
    workers = max(1, min(torch.get_num_threads(), nd))
    if work < MIN_PARALLEL_WORK:
        workers = 1
    step = -(-nd // workers)
    return [(s, min(s + step, nd)) for s in range(0, nd, step)]


def _run(calls) -> None:
    if len(calls) == 1:
        calls[0]()
        return
    for f in [_pool(len(calls)).submit(c) for c in calls]:
        f.result()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _scan_fwd_cpu(u, dt, A, Bt, Ct):
    """Forward kernel call: ``u, dt (B, D, L)``, ``A (D, N)``, ``Bt, Ct (B, G, L, N)`` -> ``y (B, D, L)``, ``h_last (B, D, N)``."""
    lib = load_cpu_kernel()
    nb, nd, L = u.shape
    ng, n = Bt.shape[1], Bt.shape[3]
    fn = lib.recon3d_scan_fwd_f64 if u.dtype == torch.float64 else lib.recon3d_scan_fwd_f32
    y = torch.empty_like(u)
    hlast = u.new_empty(nb, nd, n)
    ranges = _ranges(nd, nb * nd * L * n)
    scratch = [u.new_empty(n) for _ in ranges]
    ptrs = [_ptr(t) for t in (u, dt, A, Bt, Ct, y, hlast)]
    _run([functools.partial(fn, *ptrs, _ptr(s), nb, nd, L, n, ng, d0, d1) for s, (d0, d1) in zip(scratch, ranges)])
    return y, hlast


def _scan_bwd_cpu(u, dt, A, Bt, Ct, gy, ghlast):
    """Backward kernel call: inputs as :func:`_scan_fwd_cpu` plus ``gy (B, D, L)`` and optional
    ``ghlast (B, D, N)``; returns ``gu, gdt (B, D, L)``, ``gA (D, N)``, ``gBt, gCt (B, G, L, N)``."""
    lib = load_cpu_kernel()
    nb, nd, L = u.shape
    ng, n = Bt.shape[1], Bt.shape[3]
    fn = lib.recon3d_scan_bwd_f64 if u.dtype == torch.float64 else lib.recon3d_scan_bwd_f32
    gu, gdt, gA = torch.empty_like(u), torch.empty_like(u), torch.empty_like(A)
    ranges = _ranges(nd, 2 * nb * nd * L * n)
    # gB/gC sum over channels: one buffer per worker, added up afterwards.
    gBs = [torch.zeros_like(Bt) for _ in ranges]
    gCs = [torch.zeros_like(Ct) for _ in ranges]
    calls = []
    scratch = []  # the calls hold raw pointers only: keep the tensors alive until they return
    for (d0, d1), gB, gC in zip(ranges, gBs, gCs):
        hs, carry, gAk = u.new_empty(L, n), u.new_empty(n), u.new_empty(n)
        scratch.append((hs, carry, gAk))
        ptrs = [_ptr(t) for t in (u, dt, A, Bt, Ct, gy, ghlast, gu, gdt, gA, gB, gC, hs, carry, gAk)]
        calls.append(functools.partial(fn, *ptrs, nb, nd, L, n, ng, d0, d1))
    _run(calls)
    gB, gC = gBs[0], gCs[0]
    for extra_b, extra_c in zip(gBs[1:], gCs[1:]):
        gB += extra_b
        gC += extra_c
    return gu, gdt, gA, gB, gC


# The kernel calls are dispatcher operators (``torch.ops.recon3d.selective_scan_fwd`` / ``_bwd``)
# rather than bare ctypes calls so that dispatch modes see them: FlopCounterMode counts them with
# the analytic formulas of :mod:`recon3d.models.flops` (a ctypes call is invisible to it and
# counted 0), and the profiler names them. torch.library.Library rather than
# torch.library.custom_op: ~5 us of dispatch per call instead of ~25 us. The Meta kernels give
# shapes only (fake tensors, tracing).
_LIB = torch.library.Library("recon3d", "FRAGMENT")
_LIB.define("selective_scan_fwd(Tensor u, Tensor dt, Tensor A, Tensor Bt, Tensor Ct) -> (Tensor, Tensor)")
_LIB.define("selective_scan_bwd(Tensor u, Tensor dt, Tensor A, Tensor Bt, Tensor Ct, Tensor gy, Tensor? ghlast)"
            " -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_LIB.impl("selective_scan_fwd", _scan_fwd_cpu, "CPU")
_LIB.impl("selective_scan_bwd", _scan_bwd_cpu, "CPU")
_LIB.impl("selective_scan_fwd", lambda u, dt, A, Bt, Ct: (torch.empty_like(u), u.new_empty(*u.shape[:2], A.shape[1])), "Meta")
_LIB.impl("selective_scan_bwd", lambda u, dt, A, Bt, Ct, gy, ghlast: tuple(torch.empty_like(t) for t in (u, dt, A, Bt, Ct)), "Meta")


class _FusedScan(torch.autograd.Function):
    """``y, h_last = scan(u, dt, A, Bt, Ct)`` with the C kernel; see ``csrc/selective_scan_cpu.c``."""

    @staticmethod
    def forward(ctx, u, dt, A, Bt, Ct):
        y, hlast = torch.ops.recon3d.selective_scan_fwd(u, dt, A, Bt, Ct)
        ctx.save_for_backward(u, dt, A, Bt, Ct)
        ctx.set_materialize_grads(False)
        return y, hlast

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, ghlast):
        u, dt, A, Bt, Ct = ctx.saved_tensors
        gy = torch.zeros_like(u) if gy is None else gy.contiguous().to(u.dtype)
        ghlast = None if ghlast is None else ghlast.contiguous().to(u.dtype)
        return torch.ops.recon3d.selective_scan_bwd(u, dt, A, Bt, Ct, gy, ghlast)


def fused_scan_core(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
    """The bare recurrence with the C kernel (CPU tensors, float32 or float64, same dtype).

    Args:
        u, dt: ``(B, D, L)``; ``dt`` already biased / softplus-ed.
        A: ``(D, N)``.
        B, C: ``(B, G, N, L)``.

    Returns:
        ``y (B, D, L)`` and the last state ``(B, D, N)``, both differentiable.
    """
    if u.device.type != "cpu":
        raise BackendUnavailableError(f"selective scan 'fused_cpu' backend: inputs must be on the CPU, got {u.device}")
    Bt = B.transpose(-1, -2).contiguous()  # (B, G, L, N): one time step reads N contiguous values
    Ct = C.transpose(-1, -2).contiguous()
    return _FusedScan.apply(u.contiguous(), dt.contiguous(), A.contiguous(), Bt, Ct)
