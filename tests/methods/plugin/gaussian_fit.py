"""``GaussianFitModule``: a tiny feed-forward Gaussian reconstructor, written only against the
public ``ReconModule`` contract to show that a new method is one file.

The input views are pooled by a small conv encoder into a code; a linear head turns it into
offsets of ``num_gaussians`` learned base Gaussians (positions, log-scales, colour and opacity
logits). It implements :meth:`training_losses` and :meth:`reconstruct` only: rendering
(:func:`recon3d.render.render` of the Gaussians), the evaluation loop, the view grids, export
(``gaussians.ply``, the 3DGS layout) and resume come from the base class and the shared stack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recon3d.data.batch import Batch
from recon3d.methods.base import ReconModule
from recon3d.render import render
from recon3d.representations import Gaussians
from recon3d.representations.reconstruction import Reconstruction


class GaussianFitModule(ReconModule):
    """Images ``(B, V, 3, H, W)`` -> ``num_gaussians`` isotropic RGB Gaussians per object.

    Args:
        num_gaussians: Gaussians per object.
        code_dim: size of the pooled image code.
        lr: Adam learning rate.
        evaluation, vis_views: see :class:`~recon3d.methods.base.ReconModule`.
    """

    def __init__(self, num_gaussians: int = 64, code_dim: int = 32, lr: float = 1e-2, evaluation=None, vis_views: int = 2):
        super().__init__(evaluation=evaluation, vis_views=vis_views)
        self.save_hyperparameters()
        self.lr = lr
        n = num_gaussians
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.SiLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.SiLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, code_dim))
        self.head = nn.Linear(code_dim, n * 8)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        g = torch.Generator().manual_seed(0)
        self.base = nn.Parameter(torch.cat([torch.rand(n, 3, generator=g) * 1.2 - 0.6, torch.full((n, 1), -2.0),
                                            torch.zeros(n, 3), torch.full((n, 1), 1.0)], 1))

    def reconstruct(self, batch: Batch) -> Reconstruction:
        imgs = batch.inputs.images
        B, V = imgs.shape[:2]
        code = self.encoder(imgs.flatten(0, 1)).view(B, V, -1).mean(1)
        p = self.base + self.head(code).view(B, -1, 8)
        n = p.shape[1]
        quats = torch.zeros(B, n, 4, device=p.device)
        quats[..., 0] = 1
        gs = Gaussians(means=p[..., :3], quats=quats, scales=p[..., 3:4].exp().expand(B, n, 3),
                       opacities=torch.sigmoid(p[..., 7]), colors=torch.sigmoid(p[..., 4:7]))
        return Reconstruction(list(batch.object_ids), gs)

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = render(self.reconstruct(batch).representation, batch.targets.cameras, "white")
        terms = {"rgb": F.mse_loss(out.rgb, batch.targets.images)}
        terms["loss"] = terms["rgb"]
        return terms

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)
