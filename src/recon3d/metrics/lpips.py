"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric") without torchvision or the ``lpips`` package.

Pieces:

- :class:`AlexNetFeatures` / :class:`VGG16Features`: the convolutional trunks of torchvision's
  ``alexnet`` / ``vgg16`` with the **same parameter names** (``features.0.weight``, ...), so
  torchvision's checkpoint files load directly (their ``classifier.*`` keys are ignored). Each
  returns the five ReLU activations LPIPS taps (AlexNet: relu1..relu5; VGG16: relu1_2, relu2_2,
  relu3_3, relu4_3, relu5_3).
- :class:`LPIPSNet`: input scaling, unit-normalised features, squared differences, the learned
  1x1 "linear" heads (keys ``lin{k}.model.1.weight``, the lpips package's ``weights/v0.1`` layout),
  spatial mean, sum over layers. Differentiable.
- :class:`LPIPS` (torchmetrics ``Metric``, mean over images) and :class:`LPIPSLoss` (``nn.Module``,
  for training).

Weights (no download ever happens):

============  ===========================  =====================================================
net           backbone file (torchvision)  linear heads file (lpips v0.1)
============  ===========================  =====================================================
``alex``      ``alexnet-owt-7be5be79.pth`` ``alex.pth``
``vgg``       ``vgg16-397923af.pth``       ``vgg.pth``
============  ===========================  =====================================================

Backbones are looked for in ``weights_dir`` (argument, or ``$RECON3D_LPIPS_DIR``) and then in the
torch hub cache ``$TORCH_HOME/hub/checkpoints`` (``torch.hub.get_dir()``). Heads are looked for in
``weights_dir`` (also under ``weights/v0.1/`` and ``v0.1/``) and then in the copy torchmetrics ships
(``torchmetrics/functional/image/lpips_models/``, same keys). Explicit ``backbone_path`` /
``heads_path`` override the search. When a file is missing the constructor raises
:class:`LPIPSWeightsNotFoundError` naming the file and the folders searched; random weights are used
only with ``pretrained=False`` (numbers are then not comparable with any paper).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from recon3d.errors import CheckpointError
from recon3d.utils.checkpoint import compare_state_dicts, mark_frozen
from recon3d.utils.checks import check_shape

__all__ = [
    "AlexNetFeatures",
    "VGG16Features",
    "LPIPSNet",
    "LPIPS",
    "LPIPSLoss",
    "LPIPSWeightsNotFoundError",
    "BACKBONE_FILES",
    "find_lpips_weights",
]

Net = Literal["alex", "vgg"]

#: torchvision checkpoint file names, as torch.hub stores them.
BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
#: lpips v0.1 linear-head file names.
HEAD_FILES = {"alex": "alex.pth", "vgg": "vgg.pth"}

# lpips' ScalingLayer constants: inputs in [-1, 1] are mapped by (x - shift) / scale, which
# approximates ImageNet mean/std normalisation.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class LPIPSWeightsNotFoundError(CheckpointError, FileNotFoundError):
    """A pretrained LPIPS weight file (backbone or linear heads) could not be found locally."""


# ----------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------


class _TappedTrunk(nn.Module):
    """``features`` is an ``nn.Sequential`` indexed like torchvision's; ``taps`` are the indices
    of the ReLU layers whose outputs are returned."""

    channels: tuple[int, ...]
    taps: tuple[int, ...]

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x`` ``(N, 3, H, W)`` (already normalised) -> five maps ``(N, C_k, H_k, W_k)``."""
        outs = []
        last = self.taps[-1]
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                outs.append(x)
            if i == last:
                break
        return outs


class AlexNetFeatures(_TappedTrunk):
    """torchvision ``alexnet().features`` layout; returns relu1..relu5 (64, 192, 384, 256, 256 ch).

    Shapes: ``(N, 3, H, W) -> [(N, C_k, H_k, W_k)] * 5``.
    """

    channels = (64, 192, 384, 256, 256)
    taps = (1, 4, 7, 9, 11)

    def __init__(self) -> None:
        super().__init__(
            [
                nn.Conv2d(3, 64, 11, stride=4, padding=2),
                nn.ReLU(inplace=False),
                nn.MaxPool2d(3, 2),
                nn.Conv2d(64, 192, 5, padding=2),
                nn.ReLU(inplace=False),
                nn.MaxPool2d(3, 2),
                nn.Conv2d(192, 384, 3, padding=1),
                nn.ReLU(inplace=False),
                nn.Conv2d(384, 256, 3, padding=1),
                nn.ReLU(inplace=False),
                nn.Conv2d(256, 256, 3, padding=1),
                nn.ReLU(inplace=False),
                nn.MaxPool2d(3, 2),
            ]
        )


#: VGG16 configuration "D": channel counts, "M" = 2x2 max-pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16Features(_TappedTrunk):
    """torchvision ``vgg16().features`` layout; returns relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.

    Shapes: ``(N, 3, H, W) -> [(N, C_k, H_k, W_k)] * 5`` with ``C_k = 64, 128, 256, 512, 512``.
    """

    channels = (64, 128, 256, 512, 512)
    taps = (3, 8, 15, 22, 29)

    def __init__(self) -> None:
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU(inplace=False)]
                cin = int(v)
        super().__init__(layers)


_TRUNKS = {"alex": AlexNetFeatures, "vgg": VGG16Features}


# ----------------------------------------------------------------------------------------------
# Weight lookup
# ----------------------------------------------------------------------------------------------


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _torchmetrics_heads_dir() -> Path | None:
    try:
        import torchmetrics
    except ImportError:  # pragma: no cover
        return None
    return Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models"


def _weights_dirs(weights_dir: str | os.PathLike | None) -> list[Path]:
    dirs = []
    if weights_dir is not None:
        dirs.append(Path(weights_dir).expanduser())
    env = os.environ.get("RECON3D_LPIPS_DIR")
    if env:
        dirs.append(Path(env).expanduser())
    return dirs


def _backbone_candidates(net: str, weights_dir, backbone_path) -> list[Path]:
    if backbone_path:
        return [Path(backbone_path).expanduser()]
    name = BACKBONE_FILES[net]
    return [d / name for d in _weights_dirs(weights_dir)] + [_hub_checkpoint_dir() / name]


def _heads_candidates(net: str, weights_dir, heads_path) -> list[Path]:
    if heads_path:
        return [Path(heads_path).expanduser()]
    name = HEAD_FILES[net]
    out = [p for d in _weights_dirs(weights_dir) for p in (d / name, d / "weights" / "v0.1" / name, d / "v0.1" / name)]
    tm = _torchmetrics_heads_dir()
    if tm is not None:
        out.append(tm / name)
    return out


def _first_file(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def find_lpips_weights(
    net: Net,
    weights_dir: str | os.PathLike | None = None,
    backbone_path: str | os.PathLike | None = None,
    heads_path: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Locate ``(backbone_file, heads_file)`` for ``net`` or raise :class:`LPIPSWeightsNotFoundError`.

    The error message names every missing file and the folders that were searched.
    """
    if net not in BACKBONE_FILES:
        raise ValueError(f"net: expected one of {sorted(BACKBONE_FILES)}, got {net!r}")
    bb_cand = _backbone_candidates(net, weights_dir, backbone_path)
    hd_cand = _heads_candidates(net, weights_dir, heads_path)
    bb, hd = _first_file(bb_cand), _first_file(hd_cand)
    bb_name, hd_name = BACKBONE_FILES[net], HEAD_FILES[net]
    missing = []
    if bb is None:
        missing.append(
            f"backbone '{bb_name}' (torchvision ImageNet weights, https://download.pytorch.org/models/{bb_name}); "
            f"looked for: {', '.join(str(p) for p in bb_cand)}"
        )
    if hd is None:
        missing.append(
            f"linear heads '{hd_name}' (lpips package, lpips/weights/v0.1/{hd_name}); "
            f"looked for: {', '.join(str(p) for p in hd_cand)}"
        )
    if missing:
        raise LPIPSWeightsNotFoundError(
            f"LPIPS-{net} weights not found: "
            + "; ".join(missing)
            + f". Put the files in $TORCH_HOME/hub/checkpoints ({_hub_checkpoint_dir()}) or in a folder passed as "
            "weights_dir / $RECON3D_LPIPS_DIR, or pass pretrained=False for random (non-comparable) weights."
        )
    return bb, hd  # type: ignore[return-value]


def _load_state(path: Path) -> dict[str, Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the path named
        raise CheckpointError(f"{path}: cannot read LPIPS weights ({err})") from err
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


# ----------------------------------------------------------------------------------------------
# LPIPS network
# ----------------------------------------------------------------------------------------------


class _LinHead(nn.Module):
    """1x1 conv without bias; wrapped so its key is ``lin{k}.model.1.weight`` like lpips
    (index 0 of lpips' ``model`` is a parameter-free dropout, inactive at eval)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(cin, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class LPIPSNet(nn.Module):
    """The LPIPS distance network; ``forward(x, y, mask=None) -> (N,)``.

    Args:
        net: ``"alex"`` or ``"vgg"``.
        pretrained: load backbone and heads from local files (see module docstring); with
            ``False`` the backbone is randomly initialised (seeded by the caller) and heads are
            taken from a local heads file if one is found, else set to ``1 / C_k``.
        weights_dir, backbone_path, heads_path: where to look (see :func:`find_lpips_weights`).

    ``forward`` inputs are images in ``[0, 1]``, shape ``(N, 3, H, W)`` (``H, W >= 32``); ``mask``
    ``(N, 1, H, W)`` makes the spatial average a weighted one (mask resized per layer). All
    parameters are frozen (``requires_grad=False``); gradients still flow to the inputs.
    """

    def __init__(
        self,
        net: Net = "vgg",
        pretrained: bool = True,
        weights_dir: str | os.PathLike | None = None,
        backbone_path: str | os.PathLike | None = None,
        heads_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if net not in _TRUNKS:
            raise ValueError(f"net: expected one of {sorted(_TRUNKS)}, got {net!r}")
        self.net_name = net
        self.trunk = _TRUNKS[net]()
        self.lins = nn.ModuleList(_LinHead(c) for c in self.trunk.channels)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.pretrained = pretrained
        # Weights read from local files are frozen pretrained parts: a method checkpoint leaves
        # them out and re-attaches them (recon3d.utils.checkpoint.mark_frozen).
        if pretrained:
            bb, hd = find_lpips_weights(net, weights_dir, backbone_path, heads_path)
            self.load_backbone(_load_state(bb), source=str(bb))
            self.load_heads(_load_state(hd), source=str(hd))
            mark_frozen(self.trunk, bb)
            mark_frozen(self.lins, hd)
        else:
            hd = _first_file(_heads_candidates(net, weights_dir, heads_path))
            if hd is not None:
                self.load_heads(_load_state(hd), source=str(hd))
                mark_frozen(self.lins, hd)
            else:
                for lin, c in zip(self.lins, self.trunk.channels):
                    nn.init.constant_(lin.model[1].weight, 1.0 / c)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def load_backbone(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Load torchvision-layout weights (``features.N.weight`` ...; other keys ignored), strictly."""
        feats = {k: v for k, v in state.items() if k.startswith("features.")}
        problem = compare_state_dicts(self.trunk.state_dict(), feats).line()
        if problem:
            raise CheckpointError(f"{source}: not a torchvision {self.net_name} checkpoint: {problem}")
        self.trunk.load_state_dict(feats, strict=True)

    def load_heads(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Load lpips v0.1 heads (``lin{k}.model.1.weight``), strictly."""
        heads = {k: v for k, v in state.items() if k.startswith("lin")}
        own = {f"lin{k}": v for k, v in self.lins.state_dict().items()}  # named as in the file
        problem = compare_state_dicts(own, heads).line()
        if problem:
            raise CheckpointError(f"{source}: not an lpips v0.1 '{self.net_name}' heads file: {problem}")
        self.lins.load_state_dict({k[3:]: v for k, v in heads.items()}, strict=True)

    def train(self, mode: bool = True) -> LPIPSNet:  # frozen: always eval
        return super().train(False)

    def features(self, x: Tensor) -> list[Tensor]:
        """``x`` ``(N, 3, H, W)`` in ``[0, 1]`` -> the five raw trunk activations."""
        x = (x * 2.0 - 1.0 - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        return self.trunk(x)

    def forward(self, x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        dims: dict = {}
        check_shape(x, "N 3 H W", "pred", dims)
        check_shape(y, "N 3 H W", "target", dims)
        if mask is not None:
            check_shape(mask, "N 1 H W", "mask", dims)
        n = x.shape[0]
        feats = self.features(torch.cat([x, y.to(x.dtype)], 0))
        total = x.new_zeros(n)
        for f, lin in zip(feats, self.lins):
            f = f / (f.square().sum(1, keepdim=True).sqrt() + 1e-10)
            d = lin((f[:n] - f[n:]).square())  # (N, 1, h, w)
            if mask is None:
                total = total + d.mean((1, 2, 3))
            else:
                m = F.interpolate(mask.to(d.dtype), size=d.shape[-2:], mode="area")
                total = total + (d * m).sum((1, 2, 3)) / m.sum((1, 2, 3)).clamp_min(1e-12)
        return total


def _flatten_images(pred: Tensor, target: Tensor, mask: Tensor | None):
    dims: dict = {}
    check_shape(pred, "*B 3 H W", "pred", dims)
    check_shape(target, "*B 3 H W", "target", dims)
    if mask is not None:
        check_shape(mask, "*B 1 H W", "mask", dims)
        mask = mask.reshape(-1, *mask.shape[-3:])
    return pred.reshape(-1, *pred.shape[-3:]), target.reshape(-1, *target.shape[-3:]), mask


class LPIPS(Metric):
    """Mean LPIPS distance over images (lower is better). ``update(pred, target, mask=None)``.

    Shapes: ``pred``, ``target`` ``(*B, 3, H, W)`` in ``[0, 1]``; ``mask`` ``(*B, 1, H, W)``.
    Raises :class:`LPIPSWeightsNotFoundError` at construction when pretrained weights are missing
    (``pretrained=False`` or ``allow_random=True`` opt into random weights explicitly).
    ``chunk`` images are pushed through the network at a time.
    """

    higher_is_better = False
    is_differentiable = True
    full_state_update = False

    def __init__(
        self,
        net: Net = "vgg",
        pretrained: bool = True,
        allow_random: bool = False,
        weights_dir: str | os.PathLike | None = None,
        backbone_path: str | os.PathLike | None = None,
        heads_path: str | os.PathLike | None = None,
        chunk: int = 16,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if pretrained and allow_random:
            try:
                self.net = LPIPSNet(net, True, weights_dir, backbone_path, heads_path)
            except LPIPSWeightsNotFoundError:
                self.net = LPIPSNet(net, False, weights_dir, backbone_path, heads_path)
        else:
            self.net = LPIPSNet(net, pretrained, weights_dir, backbone_path, heads_path)
        self.chunk = int(chunk)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    @property
    def pretrained(self) -> bool:
        """Whether real pretrained weights are in use (False: numbers are not comparable)."""
        return self.net.pretrained

    @torch.no_grad()
    def per_image(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """LPIPS of each image: ``(*B, 3, H, W) -> (*B,)``."""
        lead = pred.shape[:-3]
        p, t, m = _flatten_images(pred, target, mask)
        outs = [
            self.net(p[i : i + self.chunk], t[i : i + self.chunk], None if m is None else m[i : i + self.chunk])
            for i in range(0, p.shape[0], self.chunk)
        ]
        return torch.cat(outs).reshape(lead) if outs else p.new_zeros(lead)

    def update(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        vals = self.per_image(pred, target, mask).reshape(-1).double()
        self.total += vals.sum()
        self.count += vals.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count).float()


class LPIPSLoss(nn.Module):
    """Differentiable LPIPS for training: ``forward(pred, target, mask=None) -> scalar`` (mean).

    Shapes: ``pred``, ``target`` ``(*B, 3, H, W)`` in ``[0, 1]``; ``mask`` ``(*B, 1, H, W)``.
    ``resize`` (e.g. 256) bilinearly resizes inputs first, as LGM/GTR do to bound the cost.
    ``net`` and ``**weights`` (``pretrained``, ``weights_dir``, ``backbone_path``, ``heads_path``)
    are :class:`LPIPSNet`'s, with its defaults; missing pretrained weights raise.
    """

    def __init__(self, net: Net = "vgg", *, resize: int | Sequence[int] | None = None, **weights) -> None:
        super().__init__()
        self.net = LPIPSNet(net, **weights)
        self.resize = resize

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        p, t, m = _flatten_images(pred, target, mask)
        if self.resize is not None:
            size = (self.resize, self.resize) if isinstance(self.resize, int) else tuple(self.resize)
            p = F.interpolate(p, size=size, mode="bilinear", align_corners=False, antialias=True)
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
            if m is not None:
                m = F.interpolate(m, size=size, mode="area")
        return self.net(p, t, m).mean()
