"""Gaussians ↔ .ply in the layout of the original 3DGS code (read by common splat viewers).

One binary little-endian ``vertex`` element of float32 properties, in this order:
``x y z nx ny nz f_dc_0..2 f_rest_0..M-1 opacity scale_0..2 rot_0..3`` where

- ``f_dc_*`` is the DC SH coefficient per channel (RGB colours are converted with
  ``(rgb - 0.5) / C0``);
- ``f_rest_*`` are the higher SH coefficients, channel-major (all of R's, then G's, then B's),
  ``M = 3 * ((d+1)^2 - 1)``;
- ``opacity`` is the logit of the opacity, ``scale_*`` the log of the scales;
- ``rot_*`` is the quaternion ``(w, x, y, z)``, unnormalised as stored.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import torch

from recon3d.errors import DataError, ShapeError
from recon3d.render.gaussians.model import Gaussians, rgb_to_sh_dc
from recon3d.utils.io import atomic_path

__all__ = ["save_ply", "load_ply", "write_vertex_ply"]


def _attributes(gaussians: Gaussians, index: int) -> tuple[list[str], np.ndarray]:
    g = gaussians[index].packed()  # (n, ...) tensors of object `index`, n may be 0 in a ragged batch
    n = g.num_gaussians
    if g.sh_degree is None:
        dc, rest = rgb_to_sh_dc(g.colors), g.colors.new_zeros(n, 3, 0)
    else:
        k = (g.sh_degree + 1) ** 2
        sh = g.colors[:, :k]  # N K 3
        dc, rest = sh[:, 0], sh[:, 1:].transpose(1, 2)  # N 3 (K-1), channel-major once flattened
    eps = 1e-6
    opac = g.opacities.clamp(eps, 1 - eps)
    cols = [
        g.means,
        torch.zeros_like(g.means),
        dc,
        rest.reshape(n, rest.shape[1] * rest.shape[2]),
        torch.log(opac / (1 - opac))[:, None],
        torch.log(g.scales.clamp_min(1e-12)),
        g.quats,
    ]
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(rest.shape[1] * rest.shape[2])]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    data = torch.cat([c.detach().float().cpu() for c in cols], 1).numpy()
    return names, np.ascontiguousarray(data, dtype="<f4")


def save_ply(path: str | os.PathLike, gaussians: Gaussians, index: int = 0) -> None:
    """Write object ``index`` of ``gaussians`` (dense or packed; an empty object writes 0 vertices) to ``path`` (atomically)."""
    if not 0 <= index < gaussians.batch_size:
        raise ShapeError(f"index: expected 0 <= index < {gaussians.batch_size}, got {index}")
    names, data = _attributes(gaussians, index)
    write_vertex_ply(path, names, data)


def write_vertex_ply(path: str | os.PathLike, names: list[str], data: np.ndarray) -> None:
    """Write one binary little-endian ``vertex`` element of float32 properties ``names`` (one
    column of ``data (N, len(names))`` each) to ``path``, atomically."""
    if data.ndim != 2 or data.shape[1] != len(names):
        raise ShapeError(f"data: expected shape (N, {len(names)}) for properties {names[:4]}..., got {list(data.shape)}")
    data = np.ascontiguousarray(data, dtype="<f4")
    header = "ply\nformat binary_little_endian 1.0\n" + f"element vertex {data.shape[0]}\n"
    header += "".join(f"property float {n}\n" for n in names) + "end_header\n"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(data.tobytes())


def load_ply(path: str | os.PathLike, device=None) -> Gaussians:
    """Read a 3DGS .ply into a batch of one :class:`Gaussians` (SH colours when ``f_rest_*`` exist, else RGB).

    Dense ``(1, N, ...)``; a file of 0 vertices gives a packed batch with ``counts [0]``.
    """
    with open(path, "rb") as f:
        raw = f.read()
    end = raw.find(b"end_header\n")
    if not raw.startswith(b"ply") or end < 0:
        raise DataError(path, "not a PLY file (no 'ply' magic or 'end_header')")
    header = raw[:end].decode("ascii", errors="replace").splitlines()
    if "format binary_little_endian 1.0" not in header:
        raise DataError(path, "expected a binary_little_endian PLY (the 3DGS layout)")
    m = [re.match(r"element vertex (\d+)", h) for h in header]
    counts = [int(x.group(1)) for x in m if x]
    if not counts:
        raise DataError(path, "no 'element vertex' in the header")
    n = counts[0]
    props = [h.split() for h in header if h.startswith("property")]
    if any(p[1] not in ("float", "float32") for p in props):
        raise DataError(path, "expected only float32 vertex properties (the 3DGS layout)")
    names = [p[-1] for p in props]
    need = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    missing = [k for k in need if k not in names]
    if missing:
        raise DataError(path, f"missing 3DGS properties {missing}")
    body = raw[end + len(b"end_header\n") :]
    if len(body) < n * len(names) * 4:
        raise DataError(path, f"truncated: expected {n} vertices of {len(names)} floats")
    arr = torch.from_numpy(np.frombuffer(body, dtype="<f4", count=n * len(names)).reshape(n, len(names)).copy())
    col = lambda *ks: arr[:, [names.index(k) for k in ks]]
    rest_names = sorted((k for k in names if k.startswith("f_rest_")), key=lambda k: int(k.split("_")[-1]))
    dc = col("f_dc_0", "f_dc_1", "f_dc_2")
    if rest_names:
        k = len(rest_names) // 3 + 1
        degree = int(round(math.sqrt(k))) - 1
        rest = col(*rest_names).reshape(n, 3, k - 1).transpose(1, 2)
        colors, sh_degree = torch.cat([dc[:, None], rest], 1), degree
    else:
        colors, sh_degree = (dc * 0.28209479177387814 + 0.5), None
    raw = (col("x", "y", "z"), col("rot_0", "rot_1", "rot_2", "rot_3"), col("scale_0", "scale_1", "scale_2"), col("opacity")[:, 0], colors)
    if n == 0:
        g = Gaussians.from_raw(*raw, sh_degree, counts=[0])
    else:
        g = Gaussians.from_raw(*(x[None] for x in raw), sh_degree)
    return g.to(device) if device is not None else g
