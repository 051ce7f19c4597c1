"""One evaluation protocol for every method: same metric names, same conventions, per-object rows.

A LightningModule owns one :class:`EvaluationProtocol` (it is an ``nn.Module``, so Lightning moves
its state and the LPIPS network to the right device), feeds it from ``validation_step`` /
``test_step``, and logs ``compute()`` at epoch end::

    self.evaluator = EvaluationProtocol(geometry_preset="gtr", lpips_weights_dir=cfg.lpips_dir)

    def test_step(self, batch, idx):
        out = self(batch)
        self.evaluator.update_views(batch.ids, out.rgb, batch.target_rgb, batch.target_mask)
        self.evaluator.update_meshes(batch.ids, out.meshes, batch.gt_meshes)

    def on_test_epoch_end(self):
        self.log_dict({f"test/{k}": v for k, v in self.evaluator.compute().items()}, sync_dist=False)
        self.evaluator.write(self.trainer.log_dir)  # writes on global rank 0 only
        self.evaluator.reset()

``compute()`` already reduces across processes (every rank must call it), so log with
``sync_dist=False``.

**Names** (only those that were fed appear): ``psnr``, ``ssim``, ``lpips`` (full images), plus
``psnr_masked``, ``ssim_masked``, ``lpips_masked`` when masks are given, ``mask_iou`` (rendered
opacity vs the true mask, binarised at 0.5) when asked for and both are given; ``cd``, ``fscore``,
``precision``, ``recall``, ``nc`` (when normals are given), ``iou`` (meshes or occupancies);
``rre``, ``te``, ``acc@15``, ``acc@30`` (poses).

**Missing values.** A metric that could not be computed for some objects (e.g. an untrained model
with no surface yet) is recorded with :meth:`EvaluationProtocol.note`; ``metrics.json`` then lists
each reason with its object count (``notes``) and, for every metric with no value at all, why
(``missing_metrics``), so an absent ``cd`` is never a silent gap.

**Flagged values.** A metric that was computed but does not measure the method (e.g. the pose
errors of a camera head that holds its random initialisation) is recorded with
:meth:`EvaluationProtocol.flag`: its values stay in the means and the per-object rows, and
``metrics.json`` names it in ``flagged_metrics`` (metric -> reason and object count) and lists
each reason in ``flags`` -- never hidden, never passed off as a measurement.

**Aggregation.** Each object's value is the mean over its views (images), view pairs (poses) or its
one surface (geometry). The reported number is the mean over *distinct object ids* — an object fed
twice (e.g. a ``DistributedSampler`` padding the last batch) is merged, not counted twice.

**Geometry pipeline** (per object, conventions from :data:`recon3d.metrics.geometry.PRESETS`):
normalise into ``[-1, 1]^3`` (bounding box), either both with the ground truth's transform
(``normalize_frame="gt"``, SSR/M3D) or each by its own box (``"each"``, GTR/MVBoost/ReconViaGen,
then with a similarity ICP); subsample ``num_points`` points (seeded; clouds with fewer points are
used whole); align the prediction to the ground truth (rotation search + ICP); CD / F-score /
precision / recall / NC. Either way the scores do not depend on where the prediction was put or how
it was turned (a rigid motion of the prediction scores as the prediction itself).
Meshes (:meth:`EvaluationProtocol.update_meshes`) are sampled area-weighted with face normals, and
IoU is measured on a ``iou_resolution^3`` grid over ``[-1, 1]^3`` after the same alignment
(:func:`~recon3d.metrics.geometry.mesh_occupancy_grid`: generalised winding numbers from
axis-aligned ray counts, ``O(R^3 + F)`` for a closed mesh).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from recon3d.errors import ConfigError
from recon3d.metrics.alignment import align_points, apply_transform, normalize_to_cube
from recon3d.metrics.geometry import (
    PRESETS,
    GeometryProtocol,
    chamfer_fscore,
    get_preset,
    mesh_occupancy_grid,
    occupancy_iou,
    point_sets,
    sample_surface,
)
from recon3d.metrics.image import mask_iou, psnr, ssim
from recon3d.metrics.lpips import LPIPSNet, LPIPSWeightsNotFoundError
from recon3d.metrics.pose import relative_rotation_errors, translation_errors
from recon3d.utils.checks import check_shape
from recon3d.utils.io import atomic_path

__all__ = ["EvaluationProtocol", "PerObjectTable", "METRIC_NAMES", "HIGHER_IS_BETTER", "POSE_METRICS", "describe_protocol"]

#: Every name the protocol can report, in column order.
METRIC_NAMES: tuple[str, ...] = (
    "psnr", "ssim", "lpips", "psnr_masked", "ssim_masked", "lpips_masked", "mask_iou",
    "cd", "fscore", "precision", "recall", "nc", "iou",
    "rre", "te", "acc@15", "acc@30",
)  # fmt: skip
_INDEX = {n: i for i, n in enumerate(METRIC_NAMES)}
#: The pose metrics (:meth:`EvaluationProtocol.update_poses`).
POSE_METRICS: tuple[str, ...] = ("rre", "te", "acc@15", "acc@30")
#: The image metrics a protocol can be asked for.
IMAGE_METRICS: tuple[str, ...] = ("psnr", "ssim", "lpips", "mask_iou")
_ID_BYTES = 128


def _encode_ids(ids: Sequence[str], width: int = _ID_BYTES, truncate: bool = False) -> Tensor:
    # Fixed-width UTF-8 bytes, so strings travel through the ``cat`` sync of Metric states; with
    # ``truncate`` a longer string is cut at a character boundary instead of rejected.
    out = torch.zeros(len(ids), width, dtype=torch.int64)
    for k, s in enumerate(ids):
        b = str(s).encode("utf-8")
        if truncate:
            b = b[:width].decode("utf-8", errors="ignore").encode("utf-8")
        elif len(b) > width:
            raise ValueError(f"object_ids: id {s!r} is longer than {width} bytes in UTF-8")
        if len(b):
            out[k, : len(b)] = torch.tensor(list(b), dtype=torch.int64)
    return out.reshape(-1)


def _decode_ids(flat: Tensor, width: int = _ID_BYTES) -> list[str]:
    rows = flat.to("cpu", torch.int64).reshape(-1, width).tolist()
    return [bytes(c for c in r if c).decode("utf-8") for r in rows]


class PerObjectTable(Metric):
    """Rows ``(object id, metric, value, weight)`` kept as ``cat`` states, gathered across ranks.

    ``update(ids, name, values (n,), weights (n,))``; ``compute()`` returns
    ``{object_id: {metric: weighted mean}}`` over all ranks.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("ids", "metric", "value", "weight"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, ids: Sequence[str], name: str, values: Tensor, weights: Tensor | None = None) -> None:
        values = values.detach().reshape(-1).to(self.device, torch.float64)
        if len(ids) != values.numel():
            raise ValueError(f"object_ids: got {len(ids)} ids for {values.numel()} values of {name!r}")
        weights = torch.ones_like(values) if weights is None else weights.detach().reshape(-1).to(values)
        keep = torch.isfinite(values) & (weights > 0)
        if not bool(keep.any()):
            return
        sel = keep.nonzero().flatten().tolist()
        self.ids.append(_encode_ids([ids[i] for i in sel]).to(self.device))
        self.metric.append(torch.full((len(sel),), _INDEX[name], dtype=torch.int64, device=self.device))
        self.value.append(values[keep])
        self.weight.append(weights[keep])

    def compute(self) -> dict[str, dict[str, float]]:
        if isinstance(self.value, list) and not self.value:
            return {}
        ids = _decode_ids(dim_zero_cat(self.ids).round())
        metric = dim_zero_cat(self.metric).to("cpu").long().tolist()
        value = dim_zero_cat(self.value).to("cpu", torch.float64).tolist()
        weight = dim_zero_cat(self.weight).to("cpu", torch.float64).tolist()
        acc: dict[str, dict[str, list[float]]] = {}
        seen: set[tuple] = set()
        for oid, m, v, w in zip(ids, metric, value, weight):
            key = (oid, m, v, w)
            if key in seen:  # exact duplicate row, e.g. a padded DistributedSampler batch
                continue
            seen.add(key)
            s = acc.setdefault(oid, {}).setdefault(METRIC_NAMES[m], [0.0, 0.0])
            s[0] += v * w
            s[1] += w
        return {oid: {m: s[0] / s[1] for m, s in d.items()} for oid, d in acc.items()}


_REASON_BYTES = 128


def _encode_reason(reason: str) -> Tensor:
    # Reasons travel like ids (:func:`_encode_ids`); a longer one is cut at a character boundary.
    return _encode_ids([reason], _REASON_BYTES, truncate=True)


class NoteTable(Metric):
    """Rows ``(object id, metric, reason)`` gathered across ranks: why a metric has no value (or
    a special value) for an object. ``compute()`` returns ``{(metric, reason): sorted object ids}``."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("ids", "metric", "reason"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, ids: Sequence[str], metrics: Sequence[str], reason: str) -> None:
        if not ids or not metrics:
            return
        n = len(ids) * len(metrics)
        self.ids.append(_encode_ids([i for i in ids for _ in metrics]).to(self.device))
        self.metric.append(torch.tensor([_INDEX[m] for _ in ids for m in metrics], dtype=torch.int64, device=self.device))
        self.reason.append(_encode_reason(reason).repeat(n).to(self.device))

    def compute(self) -> dict[tuple[str, str], list[str]]:
        if isinstance(self.ids, list) and not self.ids:
            return {}
        ids = _decode_ids(dim_zero_cat(self.ids))
        metric = dim_zero_cat(self.metric).to("cpu").long().tolist()
        reasons = _decode_ids(dim_zero_cat(self.reason), _REASON_BYTES)
        out: dict[tuple[str, str], set[str]] = {}
        for oid, m, r in zip(ids, metric, reasons):
            out.setdefault((METRIC_NAMES[m], r), set()).add(oid)
        return {k: sorted(v) for k, v in out.items()}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class EvaluationProtocol(nn.Module):
    """The shared evaluation protocol (see the module docstring for names and aggregation).

    Args:
        image_metrics: subset of ``("psnr", "ssim", "lpips", "mask_iou")``; ``mask_iou`` is the
            silhouette IoU of the rendered opacity against the true mask (needs both).
        geometry_preset: a preset name (``gtr``, ``ssr``, ``m3d``, ``mvboost``, ``reconviagen``,
            ``raw``) or a :class:`~recon3d.metrics.geometry.GeometryProtocol`.
        lpips_net: ``"vgg"`` or ``"alex"``.
        lpips_weights_dir: extra folder holding the LPIPS backbone/head files (see
            :mod:`recon3d.metrics.lpips`). When they cannot be found, ``lpips`` is dropped with one
            warning naming the files; it never silently runs on random weights.
        lpips_pretrained: ``False`` uses random LPIPS weights on purpose (tests, timing); the
            values are then reported but are not comparable with anything.
        num_points: overrides the preset's number of surface points.
        seed: seed of the point subsampling / surface sampling (results are reproducible).
        backend: nearest-neighbour backend (``"auto"``, ``"kdtree"``, ``"torch"``).
        lpips_chunk: images per LPIPS forward pass.
    """

    def __init__(
        self,
        image_metrics: Sequence[str] = ("psnr", "ssim", "lpips"),
        geometry_preset: str | GeometryProtocol = "gtr",
        lpips_net: str = "vgg",
        lpips_weights_dir: str | os.PathLike | None = None,
        lpips_pretrained: bool = True,
        num_points: int | None = None,
        seed: int = 0,
        backend: str = "auto",
        lpips_chunk: int = 8,
    ) -> None:
        super().__init__()
        if isinstance(image_metrics, str):
            raise ConfigError(f"evaluation.image_metrics: expected a list of names from {IMAGE_METRICS}, got the string {image_metrics!r}")
        bad = set(image_metrics) - set(IMAGE_METRICS)
        if bad:
            raise ConfigError(f"evaluation.image_metrics: unknown {sorted(bad)}; expected a subset of {IMAGE_METRICS}")
        if num_points is not None and (isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1):
            raise ConfigError(f"evaluation.num_points: expected an integer >= 1, got {num_points!r}")
        if isinstance(lpips_chunk, bool) or not isinstance(lpips_chunk, int) or lpips_chunk < 1:
            raise ConfigError(f"evaluation.lpips_chunk: expected an integer >= 1, got {lpips_chunk!r}")
        if isinstance(geometry_preset, str) and geometry_preset.lower() not in PRESETS:
            raise ConfigError(f"evaluation.geometry_preset: expected one of {sorted(PRESETS)}, got {geometry_preset!r}")
        self.geometry = get_preset(geometry_preset)
        self.num_points = int(num_points) if num_points is not None else self.geometry.num_points
        self.seed = int(seed)
        self.backend = backend
        self.lpips_chunk = int(lpips_chunk)
        self.table = PerObjectTable()
        self.notes = NoteTable()
        self.flags = NoteTable()  # same rows: (object, metric, reason), for values that are reported but flagged
        self.lpips: LPIPSNet | None = None
        self.lpips_status = "not requested"
        metrics = list(image_metrics)
        if "lpips" in metrics:
            try:
                self.lpips = LPIPSNet(lpips_net, pretrained=lpips_pretrained, weights_dir=lpips_weights_dir)  # type: ignore[arg-type]
                self.lpips_status = f"{lpips_net}, " + ("pretrained" if lpips_pretrained else "RANDOM weights (not comparable)")
                if not lpips_pretrained:
                    warnings.warn("EvaluationProtocol: LPIPS uses random weights (lpips_pretrained=False); its values are not comparable", stacklevel=2)
            except LPIPSWeightsNotFoundError as err:
                metrics.remove("lpips")
                self.lpips_status = f"dropped: {err}"
                warnings.warn(f"EvaluationProtocol: 'lpips' dropped from the metrics. {err}", stacklevel=2)
        self.image_metrics = tuple(metrics)

    # ------------------------------------------------------------------ feeding

    def _gen(self, object_id: str) -> torch.Generator:
        # a per-object seed, so results do not depend on batch composition or rank
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + sum(ord(c) * 31**i for i, c in enumerate(object_id[:64]))) % (2**63))
        return g

    @torch.no_grad()
    def update_views(self, object_ids: Sequence[str], pred: Tensor, target: Tensor, mask: Tensor | None = None,
                     pred_alpha: Tensor | None = None) -> None:
        """Rendered views vs targets: ``pred``, ``target`` ``(B, V, 3, H, W)`` in ``[0, 1]``;
        optional ``mask`` ``(B, V, 1, H, W)`` adds the ``*_masked`` (object-only) metrics, and with
        the rendered opacity ``pred_alpha`` ``(B, V, 1, H, W)`` the silhouette ``mask_iou``."""
        dims: dict = {}
        check_shape(pred, "B V 3 H W", "pred", dims)
        check_shape(target, "B V 3 H W", "target", dims)
        if mask is not None:
            check_shape(mask, "B V 1 H W", "mask", dims)
        if pred_alpha is not None:
            check_shape(pred_alpha, "B V 1 H W", "pred_alpha", dims)
        ids = self._check_ids(object_ids, dims["B"])
        if "mask_iou" in self.image_metrics:
            if mask is not None and pred_alpha is not None:
                self._add_view_rows(ids, "mask_iou", mask_iou(pred_alpha.float(), mask))
            else:  # asked for but not computable: say why in metrics.json, never a silent gap
                self.note(ids, ["mask_iou"], "no true mask in the batch" if mask is None else "the method renders no opacity")
        pred, target = pred.float(), target.to(pred.device).float()
        masks = [None] if mask is None else [None, mask.to(pred.device).float()]
        for m in masks:
            sfx = "" if m is None else "_masked"
            if "psnr" in self.image_metrics:
                self._add_view_rows(ids, "psnr" + sfx, psnr(pred, target, m))
            if "ssim" in self.image_metrics:
                self._add_view_rows(ids, "ssim" + sfx, ssim(pred, target, m))
            if "lpips" in self.image_metrics and self.lpips is not None:
                self._add_view_rows(ids, "lpips" + sfx, self._lpips(pred, target, m))

    def _lpips(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
        assert self.lpips is not None
        b, v = pred.shape[:2]
        p, t = pred.flatten(0, 1), target.flatten(0, 1)
        mm = None if mask is None else mask.flatten(0, 1)
        outs = []
        for i in range(0, p.shape[0], self.lpips_chunk):
            sl = slice(i, i + self.lpips_chunk)
            outs.append(self.lpips(p[sl], t[sl], None if mm is None else mm[sl]))
        return torch.cat(outs).reshape(b, v)

    def _add_view_rows(self, ids: list[str], name: str, vals: Tensor) -> None:
        vals = vals.double()
        ok = torch.isfinite(vals)
        n = ok.sum(1).double()
        mean = torch.where(ok, vals, torch.zeros_like(vals)).sum(1) / n.clamp_min(1)
        self.table.update(ids, name, torch.where(n > 0, mean, torch.full_like(mean, float("nan"))), n)

    def update_geometry(
        self,
        object_ids: Sequence[str],
        pred_points: Tensor | Sequence[Tensor],
        gt_points: Tensor | Sequence[Tensor],
        pred_normals: Tensor | Sequence[Tensor] | None = None,
        gt_normals: Tensor | Sequence[Tensor] | None = None,
    ) -> None:
        """Predicted vs ground-truth surface points: ``(B, P, 3)`` / ``(B, Q, 3)`` (or lists of
        ``(P_i, 3)``), optional unit normals of the same shapes (then ``nc`` is reported)."""
        preds, gts = point_sets(pred_points, "pred_points"), point_sets(gt_points, "gt_points")
        ids = self._check_ids(object_ids, len(preds))
        if len(gts) != len(preds):
            raise ValueError(f"gt_points: expected {len(preds)} clouds, got {len(gts)}")
        pns = point_sets(pred_normals, "pred_normals") if pred_normals is not None else [None] * len(preds)
        gns = point_sets(gt_normals, "gt_normals") if gt_normals is not None else [None] * len(preds)
        for oid, p, g, pn, gn in zip(ids, preds, gts, pns, gns):
            p, g = self._normalize(p.detach().double(), g.detach().double())
            self._eval_clouds(oid, p, g, pn, gn)

    def _normalize(self, pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
        """The preset's normalisation of prediction ``(N, 3)`` and ground truth ``(M, 3)`` points
        (or mesh vertices): the ground truth's transform for both (``normalize_frame="gt"``), or
        each its own (``"each"``; the similarity ICP then fits the remaining scale)."""
        g, center, scale = normalize_to_cube(gt, self.geometry.normalize)
        if self.geometry.normalize_frame == "gt":
            return (pred - center.to(pred)) * scale.to(pred), g
        p, _, _ = normalize_to_cube(pred, self.geometry.normalize)
        return p, g

    def _subsample(self, x: Tensor, n: Tensor | None, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
        if x.shape[0] <= self.num_points:
            return x, n
        sel = torch.randperm(x.shape[0], generator=gen)[: self.num_points].to(x.device)
        return x[sel], None if n is None else n[sel]

    def _eval_clouds(self, oid: str, p: Tensor, g: Tensor, pn: Tensor | None, gn: Tensor | None) -> Tensor:
        gen = self._gen(oid)
        p, pn = self._subsample(p, pn, gen)
        g, gn = self._subsample(g, gn, gen)
        proto = self.geometry
        p_al, t = align_points(p, g, mode=proto.align, rotation_search=proto.rotation_search, generator=gen, backend=self.backend)
        if pn is not None:
            pn = pn.to(t) @ t[:3, :3].T  # scale is removed by the normalisation inside chamfer_fscore
        res = chamfer_fscore(p_al, g, pred_normals=pn, gt_normals=gn, backend=self.backend, **proto.metric_kwargs())
        for name, v in res.items():
            self.table.update([oid], name, v.reshape(1))
        return t

    def update_meshes(
        self,
        object_ids: Sequence[str],
        pred_meshes: Sequence[tuple[Tensor, Tensor]],
        gt_meshes: Sequence[tuple[Tensor, Tensor]],
        iou: bool = True,
    ) -> None:
        """Predicted vs ground-truth meshes, each ``(verts (V, 3), faces (F, 3) long)``.

        Samples ``num_points`` area-weighted surface points with face normals from each (after the
        preset's normalisation), then as :meth:`update_geometry` (so ``nc`` is reported); with
        ``iou`` also the volumetric IoU (generalised winding-number occupancy, no watertightness
        needed; :func:`~recon3d.metrics.geometry.mesh_occupancy_grid`) on a ``iou_resolution^3``
        grid over ``[-1, 1]^3``, the prediction moved by the same alignment.
        """
        ids = self._check_ids(object_ids, len(pred_meshes))
        if len(gt_meshes) != len(pred_meshes):
            raise ValueError(f"gt_meshes: expected {len(pred_meshes)} meshes, got {len(gt_meshes)}")
        for oid, (pv, pf), (gv, gf) in zip(ids, pred_meshes, gt_meshes):
            pv, gv = self._normalize(pv.detach().double(), gv.detach().double())
            gen = self._gen(oid)
            p, pn = sample_surface(pv, pf, self.num_points, generator=gen)
            g, gn = sample_surface(gv, gf, self.num_points, generator=gen)
            t = self._eval_clouds(oid, p, g, pn, gn)
            if iou:
                res = self.geometry.iou_resolution
                occ_p = mesh_occupancy_grid(apply_transform(pv, t.to(pv)), pf, res)
                occ_g = mesh_occupancy_grid(gv, gf, res)
                self.table.update([oid], "iou", occupancy_iou(occ_p, occ_g).reshape(1))

    def update_occupancy(self, object_ids: Sequence[str], pred_occ: Tensor, gt_occ: Tensor) -> None:
        """Volumetric IoU from occupancies at shared query points: ``(B, Q)`` booleans."""
        dims: dict = {}
        check_shape(pred_occ, "B Q", "pred_occ", dims)
        check_shape(gt_occ, "B Q", "gt_occ", dims)
        ids = self._check_ids(object_ids, dims["B"])
        self.table.update(ids, "iou", occupancy_iou(pred_occ, gt_occ.to(pred_occ.device)))

    @torch.no_grad()
    def update_poses(self, object_ids: Sequence[str], pred_c2w: Tensor, gt_c2w: Tensor) -> None:
        """Predicted vs true cameras ``(B, V, 4, 4)`` c2w (``V >= 2``): ``rre``, ``te``, ``acc@15``, ``acc@30``."""
        dims: dict = {}
        check_shape(pred_c2w, "B V 4 4", "pred_c2w", dims)
        check_shape(gt_c2w, "B V 4 4", "gt_c2w", dims)
        if dims["V"] < 2:
            raise ValueError(f"pred_c2w: pose metrics need at least 2 views per object, got V={dims['V']}")
        ids = self._check_ids(object_ids, dims["B"])
        for oid, p, g in zip(ids, pred_c2w, gt_c2w.to(pred_c2w.device)):
            rre = relative_rotation_errors(p, g)
            te = translation_errors(p, g)
            n = torch.tensor([float(rre.numel())])
            self.table.update([oid], "rre", rre.mean().reshape(1), n)
            self.table.update([oid], "te", te.mean().reshape(1), torch.tensor([float(te.numel())]))
            self.table.update([oid], "acc@15", (rre < 15).double().mean().reshape(1), n)
            self.table.update([oid], "acc@30", (rre < 30).double().mean().reshape(1), n)

    def note(self, object_ids: Sequence[str], metrics: Sequence[str], reason: str) -> None:
        """Record why ``metrics`` have no value (or a stand-in value) for ``object_ids``, e.g.
        ``note(ids, ["cd", "fscore"], "empty surface: no iso-surface at density level 10")``.
        :meth:`write` reports it in ``metrics.json`` (module docstring, "Missing values")."""
        unknown = [m for m in metrics if m not in _INDEX]
        if unknown:
            raise ValueError(f"metrics: unknown {unknown}; expected names from {METRIC_NAMES}")
        self.notes.update([str(i) for i in object_ids], list(metrics), reason)

    def flag(self, object_ids: Sequence[str], metrics: Sequence[str], reason: str) -> None:
        """Mark the values of ``metrics`` for ``object_ids`` as reported but not a measurement of the
        method, because of ``reason`` (e.g. ``flag(ids, POSE_METRICS, "camera head not pretrained")``);
        :meth:`write` names them in ``metrics.json`` (module docstring, "Flagged values")."""
        unknown = [m for m in metrics if m not in _INDEX]
        if unknown:
            raise ValueError(f"metrics: unknown {unknown}; expected names from {METRIC_NAMES}")
        self.flags.update([str(i) for i in object_ids], list(metrics), reason)

    def flags_summary(self, metrics: dict[str, float] | None = None) -> tuple[list[dict], dict[str, str]]:
        """``(flags, flagged_metrics)`` for ``metrics.json``: one entry per reason (as
        :meth:`notes_summary`'s), and for every flagged metric that has a value in ``metrics``
        (default: :meth:`compute`) its reasons with object counts. Collective under DDP."""
        metrics = self.compute() if metrics is None else metrics
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            rows = self.flags.compute()
        by_reason: dict[str, dict] = {}
        for (m, reason), ids in sorted(rows.items()):
            e = by_reason.setdefault(reason, {"metrics": [], "ids": set()})
            e["metrics"].append(m)
            e["ids"].update(ids)
        flags = [{"reason": r, "metrics": [m for m in METRIC_NAMES if m in e["metrics"]], "num_objects": len(e["ids"]),
                  "objects": sorted(e["ids"])[:5]} for r, e in by_reason.items()]
        flagged: dict[str, str] = {}
        for f in flags:
            for m in f["metrics"]:
                if m in metrics:
                    text = f"{f['reason']} ({f['num_objects']} object{'s' if f['num_objects'] != 1 else ''})"
                    flagged[m] = f"{flagged[m]}; {text}" if m in flagged else text
        return flags, flagged

    def notes_summary(self, metrics: dict[str, float] | None = None) -> tuple[list[dict], dict[str, str]]:
        """``(notes, missing_metrics)`` for ``metrics.json``: one entry per reason
        (``{"reason", "metrics", "num_objects", "objects"}``, first 5 ids), and for every noted metric
        absent from ``metrics`` (default: :meth:`compute`) the reasons why. Collective under DDP."""
        metrics = self.compute() if metrics is None else metrics
        by_reason: dict[str, dict] = {}
        for (m, reason), ids in sorted(self._note_rows().items()):
            e = by_reason.setdefault(reason, {"reason": reason, "metrics": [], "ids": set()})
            e["metrics"].append(m)
            e["ids"].update(ids)
        notes = [{"reason": e["reason"], "metrics": [m for m in METRIC_NAMES if m in e["metrics"]],
                  "num_objects": len(e["ids"]), "objects": sorted(e["ids"])[:5]} for e in by_reason.values()]
        missing: dict[str, str] = {}
        for n in notes:
            for m in n["metrics"]:
                if m not in metrics:
                    text = f"{n['reason']} ({n['num_objects']} object{'s' if n['num_objects'] != 1 else ''})"
                    missing[m] = f"{missing[m]}; {text}" if m in missing else text
        return notes, missing

    def _note_rows(self) -> dict[tuple[str, str], list[str]]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            return self.notes.compute()

    # ------------------------------------------------------------------ results

    def per_object(self) -> list[dict]:
        """One row per object id (all ranks): ``{"object_id": ..., metric: value, ...}``, sorted by id.
        Collective under DDP: every rank must call it."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            table = self.table.compute()
        rows = []
        for oid in sorted(table):
            row: dict = {"object_id": oid}
            row.update({m: table[oid][m] for m in METRIC_NAMES if m in table[oid]})
            rows.append(row)
        return rows

    def compute(self) -> dict[str, float]:
        """Mean over objects of every metric that was fed (see the module docstring for names).
        Collective under DDP: every rank must call it."""
        rows = self.per_object()
        self._note_rows()  # every rank syncs the notes here, so that write() on rank 0 alone has them
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            self.flags.compute()  # the flags likewise
        out = {}
        for m in METRIC_NAMES:
            vals = [r[m] for r in rows if m in r and math.isfinite(r[m])]
            if vals:
                out[m] = float(sum(vals) / len(vals))
        return out

    def reset(self) -> None:
        """Forget everything fed so far."""
        self.table.reset()
        self.notes.reset()
        self.flags.reset()

    def write(self, out_dir: str | os.PathLike) -> Path | None:
        """Write ``metrics.csv`` (one row), ``per_object.csv`` and ``metrics.json`` (with
        ``missing_metrics`` and ``notes``: why a metric lacks values, see :meth:`note`) atomically to
        ``out_dir``. Collective under DDP (all ranks call it); only global rank 0 writes and gets
        the folder back, other ranks get ``None``."""
        rows = self.per_object()
        metrics = self.compute()
        if _rank() != 0:
            return None
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cols = [m for m in METRIC_NAMES if m in metrics]
        self._write_csv(out / "metrics.csv", cols, [metrics])
        obj_cols = ["object_id"] + [m for m in METRIC_NAMES if any(m in r for r in rows)]
        self._write_csv(out / "per_object.csv", obj_cols, rows)
        notes, missing = self.notes_summary(metrics)
        flags, flagged = self.flags_summary(metrics)
        doc = {
            "metrics": metrics,
            "missing_metrics": missing,
            "notes": notes,
            "flagged_metrics": flagged,
            "flags": flags,
            "num_objects": len(rows),
            "geometry_protocol": {**self.geometry.__dict__, "num_points": self.num_points},
            "image_metrics": list(self.image_metrics),
            "lpips": self.lpips_status,
            "per_object": rows,
        }
        with atomic_path(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(doc, indent=2, allow_nan=True) + "\n", encoding="utf-8")
        return out

    @staticmethod
    def _write_csv(path: Path, cols: list[str], rows: list[dict]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        with atomic_path(path) as tmp:
            tmp.write_text(buf.getvalue(), encoding="utf-8")

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _check_ids(object_ids: Sequence[str], n: int) -> list[str]:
        ids = [str(i) for i in object_ids]
        if len(ids) != n:
            raise ValueError(f"object_ids: expected {n} ids (one per batch item), got {len(ids)}")
        return ids



#: Direction of every name in :data:`METRIC_NAMES`: ``True`` when a larger value is better (the
#: ``higher_is_better`` of the torchmetrics class that computes it; ``acc@k`` is a fraction of
#: view pairs within k degrees, the pose errors ``rre``/``te`` are errors).
HIGHER_IS_BETTER: dict[str, bool] = {
    "psnr": True, "ssim": True, "lpips": False, "psnr_masked": True, "ssim_masked": True, "lpips_masked": False,
    "mask_iou": True, "cd": False, "fscore": True, "precision": True, "recall": True, "nc": True, "iou": True,
    "rre": False, "te": False, "acc@15": True, "acc@30": True,
}  # fmt: skip


def _docstring_paragraph(title: str) -> str:
    """The module docstring's paragraph that starts with ``**<title>.**``, on one line."""
    for para in (__doc__ or "").split("\n\n"):
        if para.startswith(f"**{title}.**"):
            return " ".join(para.replace(f"**{title}.**", "").split())
    return ""


def describe_protocol(doc: dict, with_missing: bool = True) -> list[str]:
    """The protocol a ``metrics.json`` (:meth:`EvaluationProtocol.write`) was measured under, as
    Markdown bullet lines: image metrics and LPIPS, the geometry conventions (points, CD distance,
    scale and reduction, F-score threshold, normalisation and alignment) and the aggregation rule,
    in the words of this module's docstring. ``doc``: the parsed ``metrics.json`` (the geometry lines
    only when it measured, or names as missing, a geometry metric); ``with_missing``: also a line per
    metric with no value and why."""
    geo = doc.get("geometry_protocol") or {}
    lines = [f"- Image metrics: {', '.join(doc.get('image_metrics') or []) or 'none'} "
             f"(masked variants on the object's pixels where masks exist); LPIPS: {doc.get('lpips', 'not requested')}."]
    geometry = {"cd", "fscore", "precision", "recall", "nc", "iou"}
    measured = set(doc.get("metrics") or {}) | set(doc.get("missing_metrics") or {})
    if geo and measured & geometry:
        dist_ = "squared L2" if geo.get("squared") else "L2"
        on = "squared distance" if geo.get("threshold_on_squared") else "distance"
        frame = ("each surface by its own bounding box" if geo.get("normalize_frame") == "each"
                 else "both surfaces by the ground truth's transform")
        align = {"none": "no alignment", "icp": "rigid ICP", "icp_scale": "similarity ICP (rotation, translation, scale)"}.get(
            str(geo.get("align")), str(geo.get("align")))
        lines += [
            f"- Geometry preset `{geo.get('name')}`: {geo.get('num_points')} surface points per object (seeded); "
            f"Chamfer distance = {geo.get('reduction')} of the two directions of the {dist_} nearest-neighbour distance "
            f"x {geo.get('cd_scale'):g}; F-score, precision, recall at {geo.get('fscore_threshold'):g} on the {on}"
            f" (x {geo.get('fscore_scale', 1.0):g}); NC {'oriented' if geo.get('nc_oriented') else 'unoriented'}; "
            f"mesh IoU on a {geo.get('iou_resolution')}^3 grid over [-1, 1]^3.",
            f"- Normalisation into [-1, 1]^3 ({geo.get('normalize')}): {frame}; then {align}"
            f"{' after a rotation search' if geo.get('rotation_search') else ''}.",
        ]
    agg = _docstring_paragraph("Aggregation")
    if agg:
        lines.append(f"- Aggregation: {agg}")
    missing = (doc.get("missing_metrics") or {}) if with_missing else {}
    for name, why in sorted(missing.items()):
        lines.append(f"- `{name}` not measured: {why}")
    flagged = (doc.get("flagged_metrics") or {}) if with_missing else {}
    for name, why in sorted(flagged.items()):
        lines.append(f"- `{name}` reported but flagged (not a measurement of the method): {why}")
    return lines
