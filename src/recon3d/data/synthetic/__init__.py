"""The embedded default dataset: procedural objects with analytic SDFs, rendered in torch.

No download: objects are drawn from a seed (:mod:`.shapes`, :mod:`.textures`), rendered by
sphere tracing (:mod:`.raycast`), and cached on disk by :class:`.dataset.SyntheticDataset`.
"""

from recon3d.data.synthetic.dataset import SyntheticDataset
from recon3d.data.synthetic.raycast import RenderedViews, render_sdf_views
from recon3d.data.synthetic.shapes import Primitive, SyntheticObject, sample_object

__all__ = ["SyntheticDataset", "RenderedViews", "render_sdf_views", "Primitive", "SyntheticObject", "sample_object"]
