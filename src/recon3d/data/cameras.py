"""The one camera convention of recon3d.

Convention (every dataset converts to it at load time; every backend converts from it at its edge):

- ``c2w``: camera-to-world, float32, shape ``(*B, 4, 4)``, **OpenCV** axes: x right, y down,
  z forward (the camera looks along +z). The rotation block is orthonormal with det +1.
- ``K``: intrinsics in **pixels**, shape ``(*B, 3, 3)``, with ``fx, fy, cx, cy``; the pixel
  ``(u, v)`` has its centre at ``(u + 0.5, v + 0.5)``.
- ``width``, ``height``: image size in pixels (one size for the whole batch).
- World: right-handed; scenes normalised to the cube ``[-1, 1]^3``. The up axis is a property of
  the dataset (the synthetic set is +Z up, as Blender/Objaverse renders; GTR's official renders
  are +Y up), never of the camera convention.

OpenGL / Blender cameras (x right, y up, z backward) are converted by flipping the y and z axes
of the camera frame: ``c2w_cv = c2w_gl @ diag(1, -1, -1, 1)``.

Projection (``Cameras.projection``, one per batch):

- ``"perspective"`` (default, pinhole): a camera-frame point ``(x, y, z)`` lands on pixel
  ``(fx x / z + cx, fy y / z + cy)``; ``fx, fy`` are focal lengths in pixels. LGM's and most
  renders' views.
- ``"orthographic"``: it lands on ``(fx x + cx, fy y + cy)``; ``fx, fy`` are **pixels per world
  unit** (an image ``W`` pixels wide spans ``W / fx`` world units). Rays are parallel to the
  camera's +z axis, with origins on the camera's ``z = 0`` plane through its centre, so the
  camera must sit in front of the scene as a perspective one would. Era3D's six generated views.

In both, depth is the camera-frame ``z`` (distance along the view axis).

Validation: constructing ``Cameras(...)`` (and ``from_w2c`` / ``from_opengl`` /
``from_normalized_intrinsics``) checks shapes, finiteness, positive focal lengths and that the
rotation is one; this costs a few hundred microseconds and, on CUDA, a device sync. Cameras made
from already-checked cameras (indexing, slicing, ``.to``, ``reshape``, ``stack``, ``cat``,
``resized``, ``cropped``) skip it through the private :meth:`Cameras._trusted` path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from recon3d.errors import ShapeError
from recon3d.utils.checks import check_finite, check_shape

__all__ = ["Cameras", "Projection", "look_at", "orbit_cameras", "intrinsics_from_fov", "orthographic_intrinsics", "OPENGL_TO_OPENCV"]

Projection = Literal["perspective", "orthographic"]
_PROJECTIONS = ("perspective", "orthographic")

#: Right-multiply an OpenGL/Blender c2w by this to get an OpenCV c2w (and vice versa).
OPENGL_TO_OPENCV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


def _validate_rotation(c2w: torch.Tensor, name: str, atol: float = 1e-3) -> None:
    R = c2w[..., :3, :3].double()
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    err = (R.transpose(-1, -2) @ R - eye).abs().amax(dim=(-1, -2))
    det = torch.linalg.det(R) if R.numel() else R.new_zeros(0)
    if R.numel() and (err.max() > atol or (det - 1).abs().max() > atol):
        i = int(torch.argmax(torch.maximum(err, (det - 1).abs()).flatten()))
        raise ShapeError(
            f"{name}: expected a rotation (orthonormal, det=+1) in [..., :3, :3], camera {i} has "
            f"|R^T R - I|={float(err.flatten()[i]):.3g}, det={float(det.flatten()[i]):.3g}"
        )
    bottom = c2w[..., 3, :]
    want = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=c2w.dtype, device=c2w.device)
    if bottom.numel() and not torch.allclose(bottom, want.expand_as(bottom), atol=1e-5):
        raise ShapeError(f"{name}: expected last row [0, 0, 0, 1] in a 4x4 pose")


def intrinsics_from_fov(fov_y_deg: float | torch.Tensor, width: int, height: int, fov_x_deg: float | None = None) -> torch.Tensor:
    """Pixel intrinsics ``(3, 3)`` (or ``(*B, 3, 3)``) from a vertical field of view in degrees.

    The principal point is the image centre. ``fov_x_deg`` defaults to square pixels.
    """
    fov_y = torch.as_tensor(fov_y_deg, dtype=torch.float32)
    fy = 0.5 * height / torch.tan(torch.deg2rad(fov_y) / 2)
    fx = fy if fov_x_deg is None else 0.5 * width / torch.tan(torch.deg2rad(torch.as_tensor(fov_x_deg, dtype=torch.float32)) / 2)
    K = torch.zeros(*fov_y.shape, 3, 3)
    K[..., 0, 0] = fx
    K[..., 1, 1] = fy
    K[..., 0, 2] = width / 2
    K[..., 1, 2] = height / 2
    K[..., 2, 2] = 1
    return K


def orthographic_intrinsics(extent: float | torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Orthographic intrinsics ``(3, 3)`` (or ``(*B, 3, 3)``) for an image spanning ``extent`` world
    units vertically (square pixels, principal point at the image centre): ``fx = fy = height / extent``.
    """
    extent = torch.as_tensor(extent, dtype=torch.float32)
    K = torch.zeros(*extent.shape, 3, 3)
    K[..., 0, 0] = K[..., 1, 1] = height / extent
    K[..., 0, 2] = width / 2
    K[..., 1, 2] = height / 2
    K[..., 2, 2] = 1
    return K


@dataclass
class Cameras:
    """A batch of cameras in recon3d's convention (see module docstring).

    Attributes:
        c2w: ``(*B, 4, 4)`` OpenCV camera-to-world.
        K: ``(*B, 3, 3)`` intrinsics in pixels (perspective: focal lengths in pixels;
            orthographic: ``fx, fy`` in pixels per world unit).
        width: image width in pixels.
        height: image height in pixels.
        projection: ``"perspective"`` (default) or ``"orthographic"``, for the whole batch.
    """

    c2w: torch.Tensor
    K: torch.Tensor
    width: int
    height: int
    projection: Projection = "perspective"

    def __post_init__(self) -> None:
        self._validate()

    @classmethod
    def _trusted(cls, c2w: torch.Tensor, K: torch.Tensor, width: int, height: int, projection: Projection) -> Cameras:
        """Cameras from tensors derived from already-validated cameras, without re-validating.

        Only for this module's own derivations (slices, ``.to``, stacks, resizes): the user-facing
        constructor validates once, and repeating it on every slice cost 20x the slice itself.
        """
        self = object.__new__(cls)
        self.c2w, self.K, self.width, self.height, self.projection = c2w, K, int(width), int(height), projection
        return self

    def _validate(self) -> None:
        """Check shapes, finiteness, image size, focal lengths and rotations; raise :class:`ShapeError`."""
        if self.projection not in _PROJECTIONS:
            raise ShapeError(f"projection: expected 'perspective' or 'orthographic', got {self.projection!r}")
        dims: dict = {}
        check_shape(self.c2w, "*B 4 4", "c2w", dims)
        check_shape(self.K, "*B 3 3", "K", dims)
        check_finite(self.c2w, "c2w")
        check_finite(self.K, "K")
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise ShapeError(f"width/height: expected positive image size, got {self.width}x{self.height}")
        self.width, self.height = int(self.width), int(self.height)
        fx, fy = self.K[..., 0, 0], self.K[..., 1, 1]
        if fx.numel() and (fx <= 0).any() or fy.numel() and (fy <= 0).any():
            raise ShapeError("K: expected positive focal lengths fx, fy")
        _validate_rotation(self.c2w, "c2w")

    # ------------------------------------------------------------------ basic views
    @property
    def batch_shape(self) -> torch.Size:
        """The leading batch shape ``*B``."""
        return self.c2w.shape[:-2]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    def __len__(self) -> int:
        return self.batch_shape[0] if len(self.batch_shape) else 1

    @property
    def is_orthographic(self) -> bool:
        return self.projection == "orthographic"

    def _derived(self, c2w: torch.Tensor, K: torch.Tensor, width: int | None = None, height: int | None = None) -> Cameras:
        return Cameras._trusted(c2w, K, self.width if width is None else width, self.height if height is None else height,
                                self.projection)

    def __getitem__(self, idx) -> Cameras:
        c2w, K = self.c2w[idx], self.K[idx]
        if c2w.shape[-2:] != (4, 4) or K.shape[-2:] != (3, 3):
            raise ShapeError(f"cameras[{idx!r}]: index only the batch dimensions {list(self.batch_shape)}, not the matrices")
        return self._derived(c2w, K)

    def to(self, *args, **kwargs) -> Cameras:
        return self._derived(self.c2w.to(*args, **kwargs), self.K.to(*args, **kwargs))

    def reshape(self, *shape: int) -> Cameras:
        return self._derived(self.c2w.reshape(*shape, 4, 4), self.K.reshape(*shape, 3, 3))

    def flatten(self) -> Cameras:
        """Cameras with a single batch dimension ``(N,)``."""
        return self.reshape(-1)

    @staticmethod
    def _common(cams: list[Cameras], what: str) -> tuple[int, int, Projection]:
        if not cams:
            raise ShapeError(f"cameras: nothing to {what}")
        sizes = {(c.width, c.height) for c in cams}
        if len(sizes) != 1:
            raise ShapeError(f"cameras: expected one image size to {what}, got {sorted(sizes)}")
        kinds = {c.projection for c in cams}
        if len(kinds) != 1:
            raise ShapeError(f"cameras: expected one projection to {what}, got {sorted(kinds)}")
        (w, h), = sizes
        return w, h, kinds.pop()

    @staticmethod
    def stack(cams: list[Cameras], dim: int = 0) -> Cameras:
        """Stack cameras of equal image size and projection along a new batch dimension."""
        w, h, proj = Cameras._common(cams, "stack")
        return Cameras._trusted(torch.stack([c.c2w for c in cams], dim), torch.stack([c.K for c in cams], dim), w, h, proj)

    @staticmethod
    def cat(cams: list[Cameras], dim: int = 0) -> Cameras:
        """Concatenate cameras of equal image size and projection along batch dimension ``dim``."""
        w, h, proj = Cameras._common(cams, "concatenate")
        if dim < 0:
            dim -= 2  # count from the end of the batch dims, not of the matrix dims
        return Cameras._trusted(torch.cat([c.c2w for c in cams], dim), torch.cat([c.K for c in cams], dim), w, h, proj)

    # ------------------------------------------------------------------ conversions
    @property
    def w2c(self) -> torch.Tensor:
        """``(*B, 4, 4)`` OpenCV world-to-camera (exact rigid inverse of ``c2w``)."""
        R = self.c2w[..., :3, :3]
        t = self.c2w[..., :3, 3:]
        out = torch.zeros_like(self.c2w)
        out[..., :3, :3] = R.transpose(-1, -2)
        out[..., :3, 3:] = -R.transpose(-1, -2) @ t
        out[..., 3, 3] = 1
        return out

    @property
    def centers(self) -> torch.Tensor:
        """``(*B, 3)`` camera centres in world coordinates."""
        return self.c2w[..., :3, 3]

    @classmethod
    def from_w2c(cls, w2c: torch.Tensor, K: torch.Tensor, width: int, height: int, projection: Projection = "perspective") -> Cameras:
        """Build from an OpenCV world-to-camera ``(*B, 4, 4)`` or ``(*B, 3, 4)``."""
        w2c = _to_4x4(w2c, "w2c")
        check_finite(w2c, "w2c")
        R = w2c[..., :3, :3]
        _validate_rotation(w2c, "w2c")
        c2w = torch.zeros_like(w2c)
        c2w[..., :3, :3] = R.transpose(-1, -2)
        c2w[..., :3, 3:] = -R.transpose(-1, -2) @ w2c[..., :3, 3:]
        c2w[..., 3, 3] = 1
        return cls(c2w, K, width, height, projection)

    @classmethod
    def from_opengl(cls, c2w_gl: torch.Tensor, K: torch.Tensor, width: int, height: int,
                    projection: Projection = "perspective") -> Cameras:
        """Build from an OpenGL/Blender camera-to-world ``(*B, 4, 4)`` or ``(*B, 3, 4)``."""
        c2w_gl = _to_4x4(c2w_gl, "c2w_gl")
        return cls(c2w_gl @ OPENGL_TO_OPENCV.to(c2w_gl), K, width, height, projection)

    def to_opengl(self) -> torch.Tensor:
        """``(*B, 4, 4)`` OpenGL/Blender camera-to-world (x right, y up, z backward)."""
        return self.c2w @ OPENGL_TO_OPENCV.to(self.c2w)

    @classmethod
    def from_normalized_intrinsics(cls, c2w: torch.Tensor, fxfycxcy: torch.Tensor, width: int, height: int,
                                   projection: Projection = "perspective") -> Cameras:
        """Build from intrinsics normalised by image size: ``(*B, 4)`` = fx/W, fy/H, cx/W, cy/H."""
        check_shape(fxfycxcy, "*B 4", "fxfycxcy")
        K = torch.zeros(*fxfycxcy.shape[:-1], 3, 3, dtype=fxfycxcy.dtype, device=fxfycxcy.device)
        K[..., 0, 0] = fxfycxcy[..., 0] * width
        K[..., 1, 1] = fxfycxcy[..., 1] * height
        K[..., 0, 2] = fxfycxcy[..., 2] * width
        K[..., 1, 2] = fxfycxcy[..., 3] * height
        K[..., 2, 2] = 1
        return cls(_to_4x4(c2w, "c2w"), K, width, height, projection)

    def normalized_intrinsics(self) -> torch.Tensor:
        """``(*B, 4)``: fx/W, fy/H, cx/W, cy/H (OpenLRM / TRELLIS / VGGT style)."""
        K = self.K
        return torch.stack(
            [K[..., 0, 0] / self.width, K[..., 1, 1] / self.height, K[..., 0, 2] / self.width, K[..., 1, 2] / self.height], -1
        )

    def _perspective_only(self, what: str) -> None:
        if self.is_orthographic:
            raise ShapeError(f"{what}: undefined for orthographic cameras (K holds pixels per world unit, not a focal length)")

    @property
    def fov_x(self) -> torch.Tensor:
        """``(*B,)`` horizontal field of view in radians (perspective cameras only)."""
        self._perspective_only("fov_x")
        return 2 * torch.atan(self.width / (2 * self.K[..., 0, 0]))

    @property
    def fov_y(self) -> torch.Tensor:
        """``(*B,)`` vertical field of view in radians (perspective cameras only)."""
        self._perspective_only("fov_y")
        return 2 * torch.atan(self.height / (2 * self.K[..., 1, 1]))

    def resized(self, width: int, height: int) -> Cameras:
        """The same cameras for an image resized to ``width x height`` (K scaled about pixel edges)."""
        _check_size(width, height)
        sx, sy = width / self.width, height / self.height
        K = self.K.clone()
        K[..., 0, :] *= sx
        K[..., 1, :] *= sy
        K[..., 2, :] = self.K[..., 2, :]
        return self._derived(self.c2w, K, width, height)

    def cropped(self, left: int, top: int, width: int, height: int) -> Cameras:
        """The same cameras for the crop ``[top:top+height, left:left+width]`` of the image."""
        _check_size(width, height)
        K = self.K.clone()
        K[..., 0, 2] -= left
        K[..., 1, 2] -= top
        return self._derived(self.c2w, K, width, height)

    def world_to_camera(self, points: torch.Tensor) -> torch.Tensor:
        """World points ``(*B, N, 3)`` in each camera's OpenCV frame ``(*B, N, 3)``."""
        check_shape(points, "*B N 3", "points")
        w2c = self.w2c
        return points @ w2c[..., :3, :3].transpose(-1, -2) + w2c[..., None, :3, 3]

    def project(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project world points ``(*B, N, 3)`` to pixels ``(*B, N, 2)`` and z-depth ``(*B, N)``.

        Pixel coordinates are continuous, with pixel ``(u, v)`` covering ``[u, u+1) x [v, v+1)``.
        Perspective divides by ``z`` (clamped to 1e-8, so points behind the camera land on the
        wrong side: check ``z > 0``); orthographic does not (module docstring).
        """
        cam = self.world_to_camera(points)
        z = cam[..., 2]
        xy = cam[..., :2] if self.is_orthographic else cam[..., :2] / z.clamp_min(1e-8)[..., None]
        fx, fy = self.K[..., 0, 0, None], self.K[..., 1, 1, None]
        cx, cy = self.K[..., 0, 2, None], self.K[..., 1, 2, None]
        return torch.stack([xy[..., 0] * fx + cx, xy[..., 1] * fy + cy], -1), z

    def unproject(self, pixels: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """World points ``(*B, N, 3)`` at z-depth ``depth`` ``(*B, N)`` under pixels ``(*B, N, 2)``.

        The inverse of :meth:`project` for both projections: ``project(unproject(p, z)) == (p, z)``.
        """
        check_shape(pixels, "*B N 2", "pixels")
        if tuple(depth.shape) != tuple(pixels.shape[:-1]):
            raise ShapeError(f"depth: expected shape {list(pixels.shape[:-1])} to match pixels, got {list(depth.shape)}")
        fx, fy = self.K[..., 0, 0, None], self.K[..., 1, 1, None]
        cx, cy = self.K[..., 0, 2, None], self.K[..., 1, 2, None]
        x, y = (pixels[..., 0] - cx) / fx, (pixels[..., 1] - cy) / fy
        if not self.is_orthographic:
            x, y = x * depth, y * depth
        cam = torch.stack([x, y, depth], -1)
        return cam @ self.c2w[..., :3, :3].transpose(-1, -2) + self.c2w[..., None, :3, 3]


def _check_size(width: int, height: int) -> None:
    if int(width) <= 0 or int(height) <= 0:
        raise ShapeError(f"width/height: expected positive image size, got {width}x{height}")


def _to_4x4(m: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(m, torch.Tensor) or m.ndim < 2 or m.shape[-1] != 4 or m.shape[-2] not in (3, 4):
        shape = list(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise ShapeError(f"{name}: expected shape (*B, 4, 4) or (*B, 3, 4), got {shape}")
    m = m.float()
    if m.shape[-2] == 4:
        return m
    bottom = torch.zeros(*m.shape[:-2], 1, 4, dtype=m.dtype, device=m.device)
    bottom[..., 0, 3] = 1
    return torch.cat([m, bottom], -2)


def look_at(eye: torch.Tensor, target: torch.Tensor | None = None, up: torch.Tensor | None = None) -> torch.Tensor:
    """OpenCV c2w ``(*B, 4, 4)`` for cameras at ``eye`` ``(*B, 3)`` looking at ``target``.

    ``up`` (default +Z) is the world's up direction; the image's y axis (down) points against it.
    """
    eye = torch.as_tensor(eye, dtype=torch.float32)
    target = torch.zeros_like(eye) if target is None else torch.as_tensor(target, dtype=torch.float32).expand_as(eye)
    up = torch.tensor([0.0, 0.0, 1.0]) if up is None else torch.as_tensor(up, dtype=torch.float32)
    up = up.to(eye).expand_as(eye)
    z = torch.nn.functional.normalize(target - eye, dim=-1)
    x = torch.linalg.cross(z, up)
    # Cameras looking straight along `up` have no defined roll: pick any perpendicular x.
    degenerate = x.norm(dim=-1, keepdim=True) < 1e-6
    alt = torch.linalg.cross(z, torch.tensor([1.0, 0.0, 0.0]).to(eye).expand_as(eye))
    x = torch.nn.functional.normalize(torch.where(degenerate, alt, x), dim=-1)
    y = torch.linalg.cross(z, x)
    c2w = torch.zeros(*eye.shape[:-1], 4, 4)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2], c2w[..., :3, 3] = x, y, z, eye
    c2w[..., 3, 3] = 1
    return c2w


def orbit_cameras(
    azimuth_deg: torch.Tensor,
    elevation_deg: torch.Tensor,
    radius: torch.Tensor | float,
    fov_y_deg: float,
    width: int,
    height: int,
    up_axis: str = "z",
) -> Cameras:
    """Cameras on a sphere around the origin looking at it.

    Args:
        azimuth_deg: ``(N,)`` azimuth about the up axis, degrees.
        elevation_deg: ``(N,)`` elevation above the horizontal plane, degrees.
        radius: ``(N,)`` or scalar distance to the origin.
        fov_y_deg: vertical field of view, degrees.
        up_axis: ``"z"`` (Blender/Objaverse, default) or ``"y"`` (GTR official renders).
    """
    az = torch.deg2rad(torch.as_tensor(azimuth_deg, dtype=torch.float32))
    el = torch.deg2rad(torch.as_tensor(elevation_deg, dtype=torch.float32))
    r = torch.as_tensor(radius, dtype=torch.float32).expand_as(az)
    a, b, c = r * torch.cos(el) * torch.cos(az), r * torch.cos(el) * torch.sin(az), r * torch.sin(el)
    if up_axis == "z":
        eye, up = torch.stack([a, b, c], -1), torch.tensor([0.0, 0.0, 1.0])
    elif up_axis == "y":
        eye, up = torch.stack([b, c, a], -1), torch.tensor([0.0, 1.0, 0.0])
    else:
        raise ShapeError(f"up_axis: expected 'z' or 'y', got {up_axis!r}")
    c2w = look_at(eye, None, up)
    K = intrinsics_from_fov(fov_y_deg, width, height).expand(*az.shape, 3, 3).clone()
    return Cameras(c2w, K, width, height)


def fov_to_focal(fov_rad: float, size: int) -> float:
    """Focal length in pixels for a field of view (radians) across ``size`` pixels."""
    return 0.5 * size / math.tan(fov_rad / 2)
