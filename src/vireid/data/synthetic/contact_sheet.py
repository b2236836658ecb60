"""Contact sheet: for several identities, one image per visible camera beside one per infrared camera."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from vireid.data.records import Modality
from vireid.data.synthetic.layouts import ImageJob
from vireid.data.synthetic.writer import ImageRenderer, SynthConfig
from vireid.errors import InputError
from vireid.io import atomic_path

LABEL_WIDTH = 44
HEADER_HEIGHT = 16
GAP = 8


def contact_sheet(config: SynthConfig, pids: Sequence[int], out_png: str | os.PathLike[str],
                  image_index: int = 1, zoom: int = 2) -> tuple[int, int]:
    """Render a PNG grid (rows: ``pids``; columns: visible cameras | infrared cameras); returns its (width, height).

    Images are rendered directly (whether or not the dataset places that person in that
    camera), with the same generators as :func:`render_dataset`, so a cell equals the file the
    dataset would hold for (pid, camera, ``image_index``).
    """
    if not pids or any(p < 1 or p > config.num_ids for p in pids):
        raise InputError(f"contact sheet: person ids must lie in 1..{config.num_ids}, got {list(pids)}")
    plan = config.plan()
    renderer = ImageRenderer(config, plan.cameras)
    visible = sorted(c for c, m in plan.cameras if m == Modality.VISIBLE)
    infrared = sorted(c for c, m in plan.cameras if m == Modality.INFRARED)
    columns = [(c, Modality.VISIBLE) for c in visible] + [(c, Modality.INFRARED) for c in infrared]
    cell_h, cell_w = config.height * zoom, config.width * zoom
    width = LABEL_WIDTH + len(columns) * cell_w + GAP
    height = HEADER_HEIGHT + len(pids) * cell_h
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for col, (cam, modality) in enumerate(columns):
        x = LABEL_WIDTH + col * cell_w + (GAP if modality == Modality.INFRARED else 0)
        draw.text((x + 3, 2), f"cam{cam} {'IR' if modality == Modality.INFRARED else 'RGB'}", fill=(0, 0, 0))
        for row, pid in enumerate(pids):
            image = renderer.render(ImageJob("", pid, cam, modality, image_index))
            tile = Image.fromarray(np.ascontiguousarray(image)).resize((cell_w, cell_h), Image.NEAREST)
            sheet.paste(tile, (x, HEADER_HEIGHT + row * cell_h))
    for row, pid in enumerate(pids):
        draw.text((4, HEADER_HEIGHT + row * cell_h + cell_h // 2 - 6), f"id {pid}", fill=(0, 0, 0))
    with atomic_path(out_png) as tmp:
        sheet.save(tmp, format="PNG")
    return width, height
