"""The one backend registry (renderers, iso-surface and the selective scan choose through it)."""

from __future__ import annotations

import warnings

import pytest
import torch

from recon3d.errors import BackendUnavailableError, ConfigError
from recon3d.render import backends


@pytest.fixture
def fake_backends():
    """Two throw-away libraries for a made-up capability; removed again afterwards."""
    calls = {"ok": 0, "broken": 0}

    def ok():
        calls["ok"] += 1
        return None

    def broken():
        calls["broken"] += 1
        return "planted: cannot load"

    backends.register_backend("fake_ok_cpu", ("cpu",), ok)
    backends.register_backend("fake_broken_cpu", ("cpu",), broken)
    yield calls
    for name in ("fake_ok_cpu", "fake_broken_cpu"):
        backends._REGISTRY.pop(name, None)
    backends._probe.cache_clear()
    backends._resolve.cache_clear()


def test_auto_takes_the_first_usable_library_for_the_device(fake_backends):
    libs = ("fake_broken_cpu", "fake_ok_cpu")
    assert backends.resolve_backend("auto", libs, "cpu", what="fake op") == "fake_ok_cpu"
    assert backends.resolve_backend("auto", libs, torch.device("cpu"), what="fake op") == "fake_ok_cpu"
    # each probe ran once for the process, however often the choice is made (the scan chooses per call)
    assert fake_backends == {"ok": 1, "broken": 1}
    # CUDA tensors: neither library runs there; no probe is called for a device it does not serve
    with pytest.warns(UserWarning, match="fake op: backend 'auto' falls back.*fake_ok_cpu: tensors are on cuda"):
        assert backends.resolve_backend("auto", libs, "cuda", what="fake op") == "torch"
    assert fake_backends == {"ok": 1, "broken": 1}
    assert backends.resolve_backend("torch", libs, "cpu", what="fake op") == "torch"


def test_explicit_and_unknown_names_raise(fake_backends):
    with pytest.raises(BackendUnavailableError, match="fake op backend 'fake_broken_cpu' requested but unusable here: planted"):
        backends.resolve_backend("fake_broken_cpu", ("fake_broken_cpu", "fake_ok_cpu"), "cpu", what="fake op")
    with pytest.raises(BackendUnavailableError, match="tensors are on cuda, fake_ok_cpu needs cpu"):
        backends.resolve_backend("fake_ok_cpu", ("fake_ok_cpu",), "cuda", what="fake op")
    # a name the capability does not have is a config mistake and "unusable" alike
    for err in (ConfigError, BackendUnavailableError):
        with pytest.raises(err, match=r"fake op backend: expected one of 'auto', 'torch', 'fake_ok_cpu', got 'gsplat'"):
            backends.resolve_backend("gsplat", ("fake_ok_cpu",), "cpu", what="fake op")
    with pytest.raises(ConfigError, match="reserved"):
        backends.register_backend("torch", ("cpu",), lambda: None)


def test_fallback_warns_once_per_capability(fake_backends):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            assert backends.resolve_backend("auto", ("fake_broken_cpu",), "cpu", what="fake op 2") == "torch"
    assert [str(w.message) for w in seen] == [
        "fake op 2: backend 'auto' falls back to the pure-torch reference (fake_broken_cpu: planted: cannot load)"
    ]


def test_renderers_and_the_scan_share_the_registry():
    from recon3d.models.ssm import selective_scan

    reg = backends.registered_backends()
    assert {"gsplat", "nvdiffrast", "diso", "fused_cpu", "mamba_ssm"} <= set(reg)
    assert reg["fused_cpu"].devices == ("cpu",) and reg["mamba_ssm"].devices == ("cuda",)
    assert reg["gsplat"].devices == ("cuda",)
    # the scan's "auto" on CPU tensors is what the registry resolves, and gives the torch scan's numbers
    choice = backends.resolve_backend("auto", ("fused_cpu", "mamba_ssm"), "cpu", what="selective scan")
    assert choice == ("fused_cpu" if backends.backend_unusable("fused_cpu") is None else "torch")
    g = torch.Generator().manual_seed(0)
    b, d, n, L = 1, 4, 3, 9
    u, delta = torch.randn(b, d, L, generator=g, dtype=torch.float64), torch.rand(b, d, L, generator=g, dtype=torch.float64)
    A = -torch.rand(d, n, generator=g, dtype=torch.float64)
    B, C = torch.randn(b, n, L, generator=g, dtype=torch.float64), torch.randn(b, n, L, generator=g, dtype=torch.float64)
    # closed form: the plain recurrence h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = C_t . h_t
    h = torch.zeros(b, d, n, dtype=torch.float64)
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    ref = torch.stack(ys, -1)
    for backend in ("auto", "torch", choice):
        torch.testing.assert_close(selective_scan(u, delta, A, B, C, backend=backend), ref, atol=1e-10, rtol=1e-10)


def test_a_cpu_and_cuda_library_is_refused_only_for_cuda_tensors_without_a_device():
    backends.register_backend("fake_both", ("cpu", "cuda"), lambda: None)
    try:
        assert backends.resolve_backend("fake_both", ("fake_both",), "cpu", what="fake both") == "fake_both"
        if not torch.cuda.is_available():
            assert backends.backend_unusable("fake_both", "cuda") == "no CUDA device"
            with pytest.raises(BackendUnavailableError, match="no CUDA device"):
                backends.resolve_backend("fake_both", ("fake_both",), "cuda", what="fake both")
    finally:
        backends._REGISTRY.pop("fake_both", None)
        backends._probe.cache_clear()
        backends._resolve.cache_clear()
