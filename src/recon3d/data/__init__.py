"""Data layer: the camera convention, rays, the batch contract, datasets and the datamodule."""

from recon3d.data.batch import Batch, Geometry, Sample, Views, collate_samples, stacked
from recon3d.data.cameras import Cameras, intrinsics_from_fov, look_at, orbit_cameras, orthographic_intrinsics
from recon3d.data.rays import camera_rays, pixel_grid, plucker_embedding

__all__ = [
    "Batch", "Geometry", "Sample", "Views", "collate_samples", "stacked",
    "Cameras", "intrinsics_from_fov", "look_at", "orbit_cameras", "orthographic_intrinsics",
    "camera_rays", "pixel_grid", "plucker_embedding",
]
