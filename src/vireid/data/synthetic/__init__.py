"""Synthetic visible-infrared person re-identification datasets, rendered procedurally.

``render_dataset(SynthConfig("sysu", num_ids=200, seed=0), "data/synth_sysu")`` writes a set in the
exact on-disk layout of SYSU-MM01 (or RegDB, LLCM), which the real adapters in
:mod:`vireid.data.datasets` read unchanged.  Pedestrians have identity-specific body shape,
garments, patterns and accessories; cameras differ in viewpoint habit, pose, scale, background
and lighting; infrared cameras render thermal images (skin warmest, garment brightness from a
per-identity insulation unrelated to colour, no hue, blur and sensor noise).
See ``docs/synthetic.md``.
"""

from vireid.data.synthetic.contact_sheet import contact_sheet
from vireid.data.synthetic.layouts import LAYOUT_CODES, ImageJob, LayoutPlan, plan_layout
from vireid.data.synthetic.params import Difficulty
from vireid.data.synthetic.writer import COMPLETE_MARKER, ImageRenderer, RenderSummary, SynthConfig, render_dataset

LAYOUTS = tuple(LAYOUT_CODES)

__all__ = [
    "COMPLETE_MARKER", "Difficulty", "ImageJob", "ImageRenderer", "LAYOUTS", "LayoutPlan", "RenderSummary",
    "SynthConfig", "contact_sheet", "plan_layout", "render_dataset",
]
