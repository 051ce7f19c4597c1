"""``ReconDataModule``: the one LightningDataModule every method trains and evaluates on.

It takes any :class:`~recon3d.data.base.ObjectDataset` by ``class_path``, splits its objects
into train/val/test (unless separate datasets are given), samples ``num_input_views`` input
views and ``num_target_views`` supervision views per object, resizes, composites on the
background, and batches into a :class:`~recon3d.data.batch.Batch`.

View sampling per split:

- ``"random"``: a fresh random choice per object and epoch (seeded; see :mod:`.sampling`);
- ``"fixed"``: inputs evenly spaced around the view list, targets the next evenly spaced
  views among the rest — identical every epoch, for comparable evaluation;
- ``"fixed_inputs"``: inputs as ``"fixed"``, targets random among the other views (training
  with a fixed input-camera layout, e.g. ``SyntheticDataset(camera_layout="fixed")``).

Non-square views (photos): ``square="error"`` (default) refuses to resize them to a square
resolution (it would distort them); ``"center_crop"`` keeps the central ``min(H, W)`` square,
``"pad"`` pads to ``max(H, W)`` with the background colour (alpha 0, depth 0). Both shift the
principal point by the integer offset, so every 3D point projects onto the same image content;
then the resize scales ``K`` about pixel edges. Padding suits masked captures (the band is
background); for full-frame photos without masks it would be supervised as background colour,
so prefer ``center_crop`` there.

Bad items: with ``on_bad_sample="raise"`` (default) a :class:`~recon3d.errors.DataError` stops
the run with its one-line message; with ``"skip"`` the object is dropped from its batch, counted,
and reported at the end of the epoch (``Batch.skipped``; ``ReconModule`` logs it).
"""

from __future__ import annotations

import logging
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from recon3d.data.base import ObjectDataset, RawViews
from recon3d.data.batch import Batch, Geometry, Sample, Views, collate_samples
from recon3d.data.sampling import ObjectSampler, ResumableDataLoader, item_generator
from recon3d.errors import ConfigError, DataError, Recon3DError

__all__ = ["ReconDataModule", "ViewSamplingDataset", "Background"]

log = logging.getLogger(__name__)

Background = Literal["white", "black", "random"] | tuple[float, float, float]
Split = Literal["train", "val", "test", "predict"]
Square = Literal["error", "center_crop", "pad"]


def _background_color(background, g: torch.Generator) -> tuple[float, float, float]:
    if background == "white":
        return (1.0, 1.0, 1.0)
    if background == "black":
        return (0.0, 0.0, 0.0)
    if background == "random":
        return tuple(torch.rand(3, generator=g).tolist())
    if isinstance(background, (tuple, list)) and len(background) == 3:
        return tuple(float(x) for x in background)
    raise ConfigError(f"background: expected 'white', 'black', 'random' or [r, g, b], got {background!r}")


def _resize(x: torch.Tensor | None, size: int | None, mode: str) -> torch.Tensor | None:
    if x is None or size is None or x.shape[-2:] == (size, size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _square_offsets(width: int, height: int, mode: str) -> tuple[int, int, int]:
    """``(left, top, side)`` of the square window in image coordinates (negative: padding)."""
    side = min(width, height) if mode == "center_crop" else max(width, height)
    return (width - side) // 2, (height - side) // 2, side


def _to_square(x: torch.Tensor | None, left: int, top: int, side: int, fill: tuple[float, ...] | float = 0.0) -> torch.Tensor | None:
    """Window ``x (V, C, H, W)`` to ``[top:top+side, left:left+side]``, filling outside with ``fill`` per channel."""
    if x is None:
        return None
    V, C, H, W = x.shape
    out = torch.as_tensor(fill, dtype=x.dtype).reshape(1, -1, 1, 1).expand(V, C, side, side).clone()
    # Overlap of the source rows/cols [0, H) x [0, W) with the window, in both frames.
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(H, top + side), min(W, left + side)
    out[:, :, y0 - top : y1 - top, x0 - left : x1 - left] = x[:, :, y0:y1, x0:x1]
    return out


class ViewSamplingDataset(Dataset):
    """Map-style dataset of ``(object_index, epoch)`` → :class:`Sample` (``None`` if skipped)."""

    def __init__(
        self,
        source: ObjectDataset,
        num_input_views: int,
        num_target_views: int,
        view_sampling: Literal["random", "fixed", "fixed_inputs"],
        supervise_inputs: bool,
        input_resolution: int | None,
        target_resolution: int | None,
        background: Background,
        with_geometry: bool,
        seed: int,
        on_bad_sample: Literal["raise", "skip"],
        square: Square = "error",
    ):
        self.source = source
        self.square = square
        self.n_in, self.n_tgt = num_input_views, num_target_views
        self.view_sampling = view_sampling
        self.supervise_inputs = supervise_inputs
        self.input_resolution, self.target_resolution = input_resolution, target_resolution
        self.background = background
        self.with_geometry = with_geometry
        self.seed = seed
        self.on_bad_sample = on_bad_sample

    def __len__(self) -> int:
        return len(self.source)

    def choose_views(self, index: int, epoch: int) -> tuple[list[int], list[int]]:
        """Input and target view indices of object ``index`` in ``epoch``.

        A source whose inputs and supervision are different images at the same cameras (the
        pseudo-ground-truth set: generated views in, refined views as targets) chooses them
        itself through its own ``choose_views(index, epoch, num_input_views, num_target_views,
        view_sampling, supervise_inputs, generator)``."""
        own = getattr(self.source, "choose_views", None)
        if own is not None:
            return own(index, epoch, self.n_in, self.n_tgt, self.view_sampling, self.supervise_inputs,
                       item_generator(self.seed, epoch, index))
        V = self.source.num_views(index)
        need = self.n_in + self.n_tgt
        if V < self.n_in + (0 if self.supervise_inputs else 1) or (not self.supervise_inputs and V < need and self.view_sampling == "fixed"):
            raise DataError(
                f"{self.source.name} object {self.source.object_ids()[index]}",
                f"has {V} views; expected at least {need} ({self.n_in} input + {self.n_tgt} target)",
            )
        if self.view_sampling in ("fixed", "fixed_inputs"):
            inputs = sorted({round(k * V / self.n_in) % V for k in range(self.n_in)})
            rest = [v for v in range(V) if v not in inputs]
            if self.view_sampling == "fixed":
                step = max(1, len(rest) // max(1, self.n_tgt))
                targets = rest[::step][: self.n_tgt]
            else:  # targets drawn afresh each epoch from the other views
                perm = torch.randperm(len(rest), generator=item_generator(self.seed, epoch, index)).tolist()
                targets = [rest[perm[i % len(rest)]] for i in range(self.n_tgt)] if rest else []
        else:
            perm = torch.randperm(V, generator=item_generator(self.seed, epoch, index)).tolist()
            inputs = perm[: self.n_in]
            rest = perm[self.n_in :]
            targets = [rest[i % len(rest)] for i in range(self.n_tgt)] if rest else []
        if self.supervise_inputs:
            targets = inputs + targets
        return inputs, targets

    def _views(self, raw: RawViews, size: int | None, bg: tuple[float, float, float]) -> Views:
        rgb, alpha = raw.rgb, raw.alpha
        if alpha is not None:
            if alpha.shape[-2:] != rgb.shape[-2:]:
                raise DataError(self.source.name, f"mask size {tuple(alpha.shape[-2:])} differs from image size {tuple(rgb.shape[-2:])}")
            rgb = rgb * alpha + torch.tensor(bg).view(1, 3, 1, 1) * (1 - alpha)
        cams = raw.cameras  # None for unposed views: only the images are windowed and resized
        depths, normals = raw.depths, raw.normals
        height, width = rgb.shape[-2:]
        if cams is not None and (cams.width, cams.height) != (width, height):
            raise DataError(self.source.name, f"cameras of image size {cams.width}x{cams.height} for images of {width}x{height}")
        if width != height and self.square != "error":
            # Integer window: K shifts by whole pixels, so the content under every projected
            # point is unchanged (no resampling here; the resize below is the only one).
            left, top, side = _square_offsets(width, height, self.square)
            rgb = _to_square(rgb, left, top, side, bg)
            alpha = _to_square(alpha, left, top, side, 0.0)
            depths = _to_square(depths, left, top, side, 0.0)
            normals = _to_square(normals, left, top, side, 0.0)
            cams = None if cams is None else cams.cropped(left, top, side, side)
            width = height = side
        if size is not None and (width, height) != (size, size):
            if width != height:
                raise ConfigError(
                    f"resolution: resizing non-square images ({width}x{height}) to {size}x{size} would distort "
                    "them; set data.square: center_crop or pad"
                )
            cams = None if cams is None else cams.resized(size, size)
        return Views(
            images=_resize(rgb, size, "bilinear").clamp(0, 1),
            cameras=cams,
            masks=None if alpha is None else _resize(alpha, size, "bilinear").clamp(0, 1),
            depths=_resize(depths, size, "nearest"),
            normals=_resize(normals, size, "nearest"),
        )

    def __getitem__(self, item: tuple[int, int] | int) -> Sample | tuple[str, str]:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        try:
            inputs, targets = self.choose_views(index, epoch)
            g = item_generator(self.seed + 1, epoch, index)
            bg = _background_color(self.background, g)
            raw_in = self.source.load_views(index, inputs)
            raw_tgt = self.source.load_views(index, targets) if targets else raw_in
            sample = Sample(
                object_id=self.source.object_ids()[index],
                inputs=self._views(raw_in, self.input_resolution, bg),
                targets=self._views(raw_tgt, self.target_resolution, bg),
                geometry=self.source.load_geometry(index) if self.with_geometry else Geometry(),
                background=bg,
                extras=self.source.load_extras(index),
            )
            return sample.validate()
        except Recon3DError as e:
            if self.on_bad_sample == "skip" and not isinstance(e, ConfigError):
                return (self.source.object_ids()[index] if index < len(self.source) else str(index), str(e))
            raise


def collate_or_skip(items: list) -> Batch | None:
    """Collate samples, recording skipped ``(object_id, reason)`` items in ``Batch.skipped``."""
    samples = [x for x in items if isinstance(x, Sample)]
    skipped = [x for x in items if isinstance(x, tuple)]
    if not samples:
        return Batch.empty(skipped)
    batch = collate_samples(samples)
    batch.skipped = skipped
    return batch


class ReconDataModule(L.LightningDataModule):
    """The shared datamodule (see module docstring).

    Args:
        dataset: the object dataset (``class_path`` in YAML). Split by object unless
            ``val_dataset`` / ``test_dataset`` are given.
        val_dataset: optional separate validation dataset.
        test_dataset: optional separate test dataset (also used by ``predict``).
        num_val_objects: objects held out from ``dataset`` for validation.
        num_test_objects: objects held out from ``dataset`` for testing.
        num_input_views: input views per object.
        num_target_views: supervision views per object (besides the inputs).
        supervise_inputs: also supervise on the input views (targets = inputs + others).
        train_view_sampling: ``"random"``, ``"fixed"`` or ``"fixed_inputs"`` for training.
        eval_view_sampling: ``"random"``, ``"fixed"`` or ``"fixed_inputs"`` for val/test/predict.
        input_resolution: resize input views to this square size (None: keep).
        target_resolution: resize supervision views to this square size (None: keep).
        square: non-square views: ``"error"`` (refuse a resize that would distort them; kept
            as they are when no resize is asked), ``"center_crop"`` or ``"pad"`` (to a square
            first, ``K`` shifted exactly; see the module docstring).
        background: ``"white"``, ``"black"``, ``"random"`` or ``[r, g, b]``.
        with_geometry: load ground-truth geometry (surface points, SDF samples, mesh path).
        batch_size: objects per batch (per process).
        eval_batch_size: objects per batch for val/test/predict (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        seed: seed of splits, view choices and shuffling (identical on every rank).
        on_bad_sample: ``"raise"`` or ``"skip"`` (counted and reported at epoch end).
    """

    def __init__(
        self,
        dataset: ObjectDataset,
        val_dataset: ObjectDataset | None = None,
        test_dataset: ObjectDataset | None = None,
        num_val_objects: int = 2,
        num_test_objects: int = 2,
        num_input_views: int = 4,
        num_target_views: int = 4,
        supervise_inputs: bool = True,
        train_view_sampling: Literal["random", "fixed", "fixed_inputs"] = "random",
        eval_view_sampling: Literal["random", "fixed", "fixed_inputs"] = "fixed",
        input_resolution: int | None = None,
        target_resolution: int | None = None,
        background: Background = "white",
        with_geometry: bool = True,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        on_bad_sample: Literal["raise", "skip"] = "raise",
        square: Square = "error",
    ):
        super().__init__()
        if num_input_views < 1 or num_target_views < 0 or batch_size < 1:
            raise ConfigError(
                f"data: expected num_input_views >= 1, num_target_views >= 0, batch_size >= 1; got "
                f"{num_input_views}, {num_target_views}, {batch_size}"
            )
        if on_bad_sample not in ("raise", "skip"):
            raise ConfigError(f"data.on_bad_sample: expected 'raise' or 'skip', got {on_bad_sample!r}")
        if square not in ("error", "center_crop", "pad"):
            raise ConfigError(f"data.square: expected 'error', 'center_crop' or 'pad', got {square!r}")
        self.square = square
        self.dataset, self.val_dataset, self.test_dataset = dataset, val_dataset, test_dataset
        self.num_val_objects, self.num_test_objects = num_val_objects, num_test_objects
        self.num_input_views, self.num_target_views = num_input_views, num_target_views
        self.supervise_inputs = supervise_inputs
        self.train_view_sampling, self.eval_view_sampling = train_view_sampling, eval_view_sampling
        self.input_resolution, self.target_resolution = input_resolution, target_resolution
        self.background = background
        self.with_geometry = with_geometry
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.on_bad_sample = on_bad_sample
        self._loaders: dict[str, ResumableDataLoader] = {}

    # ------------------------------------------------------------------ splits
    def split_indices(self) -> dict[str, tuple[ObjectDataset, list[int]]]:
        """``split -> (dataset, object indices)``: a seeded permutation of ``dataset``'s objects."""
        n = len(self.dataset)
        held = (0 if self.val_dataset else self.num_val_objects) + (0 if self.test_dataset else self.num_test_objects)
        if n - held < 1:
            raise ConfigError(
                f"data: {self.dataset.name} has {n} objects, too few to hold out {held} for val/test and keep one for training"
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        out: dict[str, tuple[ObjectDataset, list[int]]] = {}
        k = 0
        if self.val_dataset is None:
            out["val"] = (self.dataset, sorted(perm[k : k + self.num_val_objects]))
            k += self.num_val_objects
        else:
            out["val"] = (self.val_dataset, list(range(len(self.val_dataset))))
        if self.test_dataset is None:
            out["test"] = (self.dataset, sorted(perm[k : k + self.num_test_objects]))
            k += self.num_test_objects
        else:
            out["test"] = (self.test_dataset, list(range(len(self.test_dataset))))
        out["train"] = (self.dataset, sorted(perm[k:]))
        out["predict"] = out["test"]
        return out

    def prepare_data(self) -> None:
        # Rank 0 only (Lightning): generate/cache synthetic objects once before workers start.
        for ds in {id(d): d for d in (self.dataset, self.val_dataset, self.test_dataset) if d is not None}.values():
            if hasattr(ds, "prepare"):
                ds.prepare()

    def _item_dataset(self, split: str, source: ObjectDataset) -> ViewSamplingDataset:
        return ViewSamplingDataset(
            source,
            self.num_input_views,
            self.num_target_views,
            self.train_view_sampling if split == "train" else self.eval_view_sampling,
            self.supervise_inputs,
            self.input_resolution,
            self.target_resolution,
            self.background if split == "train" else ("white" if self.background == "random" else self.background),
            self.with_geometry,
            self.seed,
            self.on_bad_sample,
            self.square,
        )

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def loader(self, split: Split) -> ResumableDataLoader:
        """The (cached) DataLoader of ``split``; one object per rank shard, seeded order."""
        if split in self._loaders:
            return self._loaders[split]
        source, indices = self.split_indices()[split]
        world, rank = self._world()
        train = split == "train"
        sampler = ObjectSampler(indices, num_replicas=world, rank=rank, shuffle=train, seed=self.seed, pad=train)
        dl = ResumableDataLoader(
            self._item_dataset(split, source),
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_or_skip,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )
        self._loaders[split] = dl
        return dl

    def train_dataloader(self):
        return self.loader("train")

    def val_dataloader(self):
        return self.loader("val")

    def test_dataloader(self):
        return self.loader("test")

    def predict_dataloader(self):
        return self.loader("predict")

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device) if isinstance(batch, Batch) else super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        # The loaders' own state travels through Lightning's stateful-loader protocol; here only
        # what identifies the split, so a resume with different data is caught.
        return {"seed": self.seed, "num_objects": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_objects") not in (None, len(self.dataset)) or state.get("seed") not in (None, self.seed):
            raise ConfigError(
                f"data: the checkpoint was trained with seed={state.get('seed')} on {state.get('num_objects')} objects; "
                f"this run has seed={self.seed} on {len(self.dataset)} objects (splits would differ)"
            )
