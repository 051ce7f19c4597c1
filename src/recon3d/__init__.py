"""recon3d: train, evaluate and compare 3D reconstruction models on one Lightning stack.

Layers (arrows point down only; see DESIGN.md in the project notes):

- ``recon3d.methods``  one LightningModule per method (GTR, M3D, ...), thin: stages, losses.
- ``recon3d.models``   plain ``nn.Module`` networks and official-weight import.
- ``recon3d.render``   volume / Gaussian / mesh rendering and iso-surfaces, torch reference + CUDA backends.
- ``recon3d.metrics``  torchmetrics ``Metric`` classes and the evaluation protocol.
- ``recon3d.data``     cameras, rays, the ``Batch`` contract, datasets and the datamodule.
"""

import os as _os

# OpenMP's default spin-wait makes every torch op 10-25x slower when the cores are shared
# (CI runners, data-loader workers, several jobs on one node); passive waiting costs nothing on
# an idle machine. It only takes effect if set before torch starts its thread pool, so it is set
# here (the CLI imports recon3d before torch) and can be overridden from the environment.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
