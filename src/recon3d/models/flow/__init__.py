"""Rectified flow in TRELLIS's convention (t = 1 noise): the training objective and an Euler
sampler with every guidance convention TRELLIS and ReconViaGen use.

* :class:`RectifiedFlowObjective` (``objective.py``): ``x_t``, the velocity target, t schedules,
  condition dropout, ``x0_from_velocity``; dense, packed or :class:`SparseVoxels` states.
* :class:`FlowEulerSampler` (``sampler.py``): time grid (optionally diffusers'
  ``FlowMatchEulerDiscreteScheduler``), CFG in both spellings, guidance interval and rescale,
  TRELLIS-S / TRELLIS-M multi-condition modes, a per-step hook.
* ``layout.py``: how per-object scalars reach the elements of a state.
"""

from .layout import FlowLayout, layout_of, randn_per_object
from .objective import FlowLoss, FlowTrainingBatch, RectifiedFlowObjective
from .sampler import FlowEulerSampler, FlowSample, FlowStep, StepUpdate, time_grid

__all__ = [
    "FlowEulerSampler", "FlowLayout", "FlowLoss", "FlowSample", "FlowStep", "FlowTrainingBatch",
    "RectifiedFlowObjective", "StepUpdate", "layout_of", "randn_per_object", "time_grid",
]
