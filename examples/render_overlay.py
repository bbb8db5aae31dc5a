"""Draw segment's GeoJSON outlines over a region of the slide (the README picture).

    python examples/render_overlay.py examples/example.svs out/example.geojson \
        --box 600,500,1100,900 -o docs/example-output.png
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from usnet_wsi.slide import open_slide


def load_features(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)["features"]


def render(slide: Path, geojson: Path, box: tuple[int, int, int, int], scale: float = 1.0
           ) -> Image.Image:
    x0, y0, x1, y1 = box
    size = (round((x1 - x0) * scale), round((y1 - y0) * scale))
    with open_slide(slide) as s:
        img = Image.fromarray(s.read_region(box, size))
    draw = ImageDraw.Draw(img)
    for f in load_features(geojson):
        ring = (np.asarray(f["geometry"]["coordinates"][0]) - [x0, y0]) * scale
        if ring[:, 0].max() < 0 or ring[:, 1].max() < 0 or ring[:, 0].min() > size[0] \
                or ring[:, 1].min() > size[1]:
            continue
        draw.line([tuple(p) for p in ring], fill=(40, 255, 60), width=2)
    return img


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide", type=Path)
    ap.add_argument("geojson", type=Path)
    ap.add_argument("--box", required=True, help="X0,Y0,X1,Y1 in level-0 pixels")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args()
    box = tuple(int(v) for v in a.box.split(","))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    render(a.slide, a.geojson, box, a.scale).save(a.out)


if __name__ == "__main__":
    main()
