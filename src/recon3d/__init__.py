"""recon3d: train, evaluate and compare 3D reconstruction models on one Lightning stack.

Layers (arrows point down only; see DESIGN.md in the project notes):

- ``recon3d.methods``  one LightningModule per method (GTR, M3D, ...), thin: stages, losses.
- ``recon3d.models``   plain ``nn.Module`` networks and official-weight import.
- ``recon3d.render``   volume / Gaussian / mesh rendering and iso-surfaces, torch reference + CUDA backends.
- ``recon3d.metrics``  torchmetrics ``Metric`` classes and the evaluation protocol.
- ``recon3d.data``     cameras, rays, the ``Batch`` contract, datasets and the datamodule.
"""

__version__ = "0.1.0"
