"""``RenderedMeshesDataset``: the evaluation sets ``recon3d data render-meshes`` writes, with their
view sets as the input / target split.

Each object folder is a Blender folder (:class:`~recon3d.data.formats.blender.BlenderDataset`,
read through its ``transforms.json``, which lists every view: input, orbit, random) whose
``transforms.json`` also holds ``view_sets`` (``{"input": [start, stop], "orbit": [...], ...}``,
index ranges into its frames) and whose ``mesh.ply`` is the ground-truth mesh. The datamodule
asks this dataset which views to use (``choose_views``), so the protocol's inputs are the input
set and its targets the target set, not an even spread over all views:

- inputs: ``num_input_views`` evenly spaced views of ``input_set`` (all of them, in order, when the
  counts match: LGM's / ReconViaGen's four views at azimuths 0/90/180/270);
- targets: ``fixed``: ``num_target_views`` evenly spaced views of ``target_sets``; ``random`` /
  ``fixed_inputs``: a fresh seeded draw among them per epoch; ``supervise_inputs`` prepends the
  inputs. ``num_target_views`` larger than the target set repeats none: all of them are used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from recon3d.data.formats._common import read_json
from recon3d.data.formats.blender import BlenderDataset
from recon3d.errors import DataError

__all__ = ["RenderedMeshesDataset"]


class RenderedMeshesDataset(BlenderDataset):
    """Objects from ``recon3d data render-meshes`` (module docstring).

    Args:
        root: the ``--out`` folder (or one object folder).
        input_set: the view set the input views come from.
        target_sets: the view sets the supervision / evaluation views come from.
        num_surface_points: ground-truth surface samples from ``mesh.ply`` (see ``BlenderDataset``).
        seed: seed of those samples.
    """

    name = "render-meshes evaluation set"

    def __init__(
        self,
        root: str,
        input_set: str = "input",
        target_sets: Sequence[str] = ("orbit",),
        num_surface_points: int = 0,
        seed: int = 0,
        missing_frames: Literal["error", "skip"] = "error",
    ) -> None:
        # split "all": no transforms_all.json exists, so every object reads its transforms.json
        super().__init__(root, split="all", missing_frames=missing_frames, num_surface_points=num_surface_points, seed=seed)
        # complete objects only: a folder being written (.<id>.partial) has no render_meshes.json yet
        keep = [i for i, d in enumerate(self._dirs) if (d / "render_meshes.json").is_file()]
        self._set_objects([self._dirs[i] for i in keep], [self._ids[i] for i in keep],
                          "object folders written by recon3d data render-meshes (with render_meshes.json)")
        self.input_set = str(input_set)
        self.target_sets = [str(s) for s in ([target_sets] if isinstance(target_sets, str) else target_sets)]
        self._sets: dict[int, dict[str, list[int]]] = {}

    def view_sets(self, index: int) -> dict[str, list[int]]:
        """``{set name: view indices}`` of object ``index``."""
        self._check_index(index)
        if index not in self._sets:
            path = self._meta(index).json_path
            data = read_json(path, "a render-meshes transforms.json")
            ranges = data.get("view_sets") if isinstance(data, dict) else None
            if not isinstance(ranges, dict) or not all(
                isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r) for r in ranges.values()
            ):
                raise DataError(path, "expected 'view_sets': {name: [start, stop]} (a folder written by recon3d data render-meshes)")
            self._sets[index] = {k: list(range(a, b)) for k, (a, b) in ranges.items()}
        return self._sets[index]

    def _pick(self, index: int, names: Sequence[str], what: str) -> list[int]:
        sets = self.view_sets(index)
        missing = [n for n in names if n not in sets]
        if missing:
            raise DataError(self._meta(index).json_path, f"{what}: no view set {missing[0]!r}; this object has {sorted(sets)}")
        return [v for n in names for v in sets[n]]

    def choose_views(self, index: int, epoch: int, num_input_views: int, num_target_views: int, view_sampling: str,
                     supervise_inputs: bool, generator: torch.Generator) -> tuple[list[int], list[int]]:
        """``(input view indices, target view indices)`` (module docstring); called by the datamodule."""
        pool_in = self._pick(index, [self.input_set], "input_set")
        if len(pool_in) < num_input_views:
            raise DataError(self._meta(index).json_path,
                            f"view set {self.input_set!r} has {len(pool_in)} views; expected at least num_input_views={num_input_views}")
        inputs = [pool_in[round(k * len(pool_in) / num_input_views)] for k in range(num_input_views)]
        pool = [v for v in self._pick(index, self.target_sets, "target_sets") if v not in inputs]
        n = min(num_target_views, len(pool))
        if view_sampling == "fixed":
            targets = [pool[(k * len(pool)) // n] for k in range(n)] if n else []
        else:
            perm = torch.randperm(len(pool), generator=generator).tolist()
            targets = [pool[i] for i in perm[:n]]
        return inputs, (inputs + targets if supervise_inputs else targets)
