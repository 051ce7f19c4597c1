"""Data layer: the camera convention, rays, the batch contract, datasets and the datamodule."""

from recon3d.data.batch import Batch, Geometry, Sample, Views, collate_samples
from recon3d.data.cameras import Cameras, intrinsics_from_fov, look_at, orbit_cameras
from recon3d.data.rays import camera_rays, pixel_grid, plucker_embedding

__all__ = [
    "Batch", "Geometry", "Sample", "Views", "collate_samples",
    "Cameras", "intrinsics_from_fov", "look_at", "orbit_cameras",
    "camera_rays", "pixel_grid", "plucker_embedding",
]
