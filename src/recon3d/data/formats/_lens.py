"""Lens distortion written in capture manifests (nerfstudio / instant-ngp ``transforms.json``).

Keys read (top level, each may be overridden per frame):

- ``k1, k2, k3, p1, p2``: OpenCV's Brown–Conrady model (radial ``k1 r^2 + k2 r^4 + k3 r^6``,
  tangential ``p1, p2``). ``k4`` is nerfstudio's ``r^8`` radial term in this model, which
  OpenCV's model does not have (its ``k4`` is a rational-model denominator): a non-zero ``k4``
  on a perspective camera is refused, as nerfstudio's own undistortion refuses it.
- ``camera_model: OPENCV_FISHEYE`` (nerfstudio) or ``is_fisheye: true`` (instant-ngp): OpenCV's
  fisheye model, ``theta_d = theta (1 + k1 theta^2 + k2 theta^4 + k3 theta^6 + k4 theta^8)``;
  ``p1, p2`` must then be zero.
- ``camera_model`` ``PINHOLE``, ``SIMPLE_PINHOLE``, ``SIMPLE_RADIAL``, ``RADIAL``, ``OPENCV``:
  the perspective model above. Other camera models (``EQUIRECTANGULAR``, ``FISHEYE624``, VR180,
  ...) are refused: treating them as pinholes would be silently wrong.
- ``k5``, ``k6`` (no transforms.json tool writes them; they would belong to OpenCV's rational
  model, whose ``k4`` conflicts with nerfstudio's) are refused when non-zero.

Undistortion (:func:`undistort`) resamples each image onto the **same** pinhole intrinsics and
size, so ``K`` is unchanged and the undistorted view is the ideal pinhole image wherever the
lens saw it. Pixels the lens did not see (the corners, for barrel distortion) are 0, and
transparent where the views carry alpha. nerfstudio instead crops to the valid rectangle
(``getOptimalNewCameraMatrix(alpha=0)``), which changes ``K`` and the image size per camera.

Pixel convention: recon3d's (and nerfstudio's) ``cx, cy`` put pixel centres at ``+0.5``;
OpenCV's put them at integers, so ``K`` is shifted by ``-0.5`` at this edge only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from recon3d.errors import DataError

__all__ = ["LENS_KEYS", "Lens", "parse_lens", "undistort"]

#: Manifest keys that describe the lens (besides the pinhole intrinsics).
LENS_KEYS = ("camera_model", "is_fisheye", "k1", "k2", "k3", "k4", "k5", "k6", "p1", "p2")

_PERSPECTIVE_MODELS = ("PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV")
_FISHEYE_MODELS = ("OPENCV_FISHEYE",)


@dataclass(frozen=True)
class Lens:
    """A distorting lens in OpenCV's terms.

    Attributes:
        model: ``"perspective"`` (``cv2.initUndistortRectifyMap``) or ``"fisheye"`` (``cv2.fisheye``).
        coeffs: OpenCV's coefficient order: perspective ``(k1, k2, p1, p2, k3)``, fisheye ``(k1, k2, k3, k4)``.
        keys: the manifest keys that were non-zero (for messages).
    """

    model: str
    coeffs: tuple[float, ...]
    keys: tuple[str, ...] = field(default=(), compare=False)

    def describe(self) -> str:
        return ", ".join(self.keys) + f" ({self.model} model)"


def parse_lens(intr: dict, where: Path, frame: int) -> Lens | None:
    """The lens of one frame from its merged manifest keys, or None for a distortion-free pinhole.

    ``intr`` holds the frame's keys (top level overridden per frame); bad or unsupported values
    raise :class:`DataError` naming ``where`` and the key.
    """
    model_name = intr.get("camera_model")
    fisheye_flag = intr.get("is_fisheye", False)
    if model_name is not None and (not isinstance(model_name, str) or model_name.upper() not in _PERSPECTIVE_MODELS + _FISHEYE_MODELS):
        raise DataError(
            where,
            f"frame {frame}: camera_model {model_name!r} is not supported; expected one of "
            f"{', '.join(_PERSPECTIVE_MODELS + _FISHEYE_MODELS)} (other models are not pinhole cameras)",
        )
    if not isinstance(fisheye_flag, bool):
        raise DataError(where, f"frame {frame}: is_fisheye: expected true or false, got {fisheye_flag!r}")
    fisheye = fisheye_flag or (model_name is not None and model_name.upper() in _FISHEYE_MODELS)
    if fisheye_flag and model_name is not None and model_name.upper() not in _FISHEYE_MODELS:
        raise DataError(where, f"frame {frame}: is_fisheye is true but camera_model is {model_name!r}")
    vals = {}
    for k in ("k1", "k2", "k3", "k4", "k5", "k6", "p1", "p2"):
        v = intr.get(k, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DataError(where, f"{k} (frame {frame}): expected a finite number, got {v!r}")
        vals[k] = float(v)
    nonzero = tuple(k for k, v in vals.items() if v != 0.0)
    unsupported = [k for k in ("k5", "k6") if vals[k] != 0.0]
    if fisheye:
        unsupported += [k for k in ("p1", "p2") if vals[k] != 0.0]
    elif vals["k4"] != 0.0:
        unsupported.insert(0, "k4")
    if unsupported:
        model = "fisheye (k1..k4 only)" if fisheye else "perspective (k1, k2, k3, p1, p2 only; k4 is nerfstudio's r^8 term)"
        raise DataError(
            where,
            f"frame {frame}: lens distortion {', '.join(f'{k}={vals[k]:g}' for k in unsupported)} is not supported "
            f"by OpenCV's {model} model; undistort the images first and remove the key",
        )
    if fisheye:  # an equidistant fisheye bends rays even with every k zero (theta, not tan theta)
        keys = nonzero or ("camera_model" if model_name is not None else "is_fisheye",)
        return Lens("fisheye", (vals["k1"], vals["k2"], vals["k3"], vals["k4"]), keys)
    if not nonzero:
        return None
    return Lens("perspective", (vals["k1"], vals["k2"], vals["p1"], vals["p2"], vals["k3"]), nonzero)


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - opencv-python-headless is a dependency
        raise DataError("cv2", f"undistorting images needs OpenCV ({e}); pip install opencv-python-headless") from None
    return cv2


@lru_cache(maxsize=8)
def _maps(K: tuple[float, ...], lens: Lens, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """``(map_x, map_y)``, each ``(H, W)`` float32: where each pinhole pixel samples the distorted image.

    Cached per (K, lens, size): a capture's frames usually share one camera, and building a map
    costs far more than applying it.
    """
    cv2 = _cv2()
    Kcv = np.array(K, dtype=np.float64).reshape(3, 3).copy()
    Kcv[0, 2] -= 0.5  # pixel centres at +0.5 (recon3d) -> at integers (OpenCV)
    Kcv[1, 2] -= 0.5
    D = np.array(lens.coeffs, dtype=np.float64)
    if lens.model == "fisheye":
        mx, my = cv2.fisheye.initUndistortRectifyMap(Kcv, D, np.eye(3), Kcv, (width, height), cv2.CV_32FC1)
    else:
        mx, my = cv2.initUndistortRectifyMap(Kcv, D, None, Kcv, (width, height), cv2.CV_32FC1)
    mx.setflags(write=False)
    my.setflags(write=False)
    return mx, my


def undistort(images: torch.Tensor, K: np.ndarray, lens: Lens) -> torch.Tensor:
    """Resample distorted views onto the pinhole camera ``K`` (same size).

    Args:
        images: ``(C, H, W)`` float in [0, 1], C <= 4 (rgb, or rgb + alpha, or a mask).
        K: ``(3, 3)`` pixel intrinsics in recon3d's convention (pixel centres at +0.5).
        lens: the lens that took ``images``.

    Returns ``(C, H, W)`` float32: bilinear samples; 0 where the lens saw nothing.
    """
    cv2 = _cv2()
    C, H, W = images.shape
    mx, my = _maps(tuple(float(x) for x in np.asarray(K, dtype=np.float64).reshape(-1)), lens, int(W), int(H))
    src = np.ascontiguousarray(images.detach().float().cpu().permute(1, 2, 0).numpy())
    out = cv2.remap(src, mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    out = out.reshape(H, W, C)  # remap drops a channel axis of size 1
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).clamp(0, 1).contiguous()
