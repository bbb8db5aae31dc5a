"""usnet_wsi.tissue: finds the tissue, not the glass, on synthetic thumbnails."""

from __future__ import annotations

import numpy as np
import pytest
from synth import GLASS_RGB, TISSUE_RGB, SynthNucleus, make_slide

from usnet_wsi.slide import open_slide
from usnet_wsi.tissue import tissue_mask


def _box_mask(shape, boxes, scale):
    m = np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        m[round(y0 * scale):round(y1 * scale), round(x0 * scale):round(x1 * scale)] = True
    return m


def _glass(h=120, w=160, seed=0):
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = GLASS_RGB
    return np.clip(img + rng.integers(-4, 5, size=(h, w, 1)), 0, 255).astype(np.uint8)


def test_mask_matches_tissue_on_a_slide_thumbnail(tmp_path):
    boxes = [(150, 120, 700, 560), (800, 300, 1150, 700)]
    nuclei = [SynthNucleus(300 + 40 * i, 300, 8, 6, 10 * i) for i in range(8)]
    s = make_slide(tmp_path / "t.svs", 1200, 800, nuclei=nuclei, tissue=boxes, levels=(1, 4))
    with open_slide(s.path) as slide:
        thumb, scale = slide.thumbnail(max_side=300)
    mask = tissue_mask(thumb, min_area_px=16)
    truth = _box_mask(mask.shape, boxes, scale)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert mask.shape == thumb.shape[:2] and mask.dtype == bool
    assert iou > 0.95
    from scipy import ndimage
    far_glass = ~ndimage.binary_dilation(truth, iterations=2)
    assert not mask[far_glass].any()
    _, n_pieces = ndimage.label(mask)
    assert n_pieces == 2


@pytest.mark.parametrize("img", [np.full((64, 80, 3), 255, np.uint8), _glass(),
                                 np.full((64, 80, 3), 240, np.uint8)])
def test_white_or_blank_gives_nothing(img):
    assert not tissue_mask(img).any()


def test_all_tissue_stays_whole():
    rng = np.random.default_rng(1)
    img = np.clip(np.array(TISSUE_RGB) + rng.integers(-30, 31, size=(100, 100, 3)), 0, 255)
    img[::7, ::5] = (90, 50, 140)   # scattered nuclei
    assert tissue_mask(img.astype(np.uint8)).all()


def test_pale_and_dark_tissue_found():
    img = _glass()
    img[10:60, 10:70] = (236, 214, 226)     # pale eosin (saturation ~0.09)
    img[70:110, 90:150] = (95, 95, 95)      # grey, dark (optical density ~0.43)
    mask = tissue_mask(img)
    assert mask[12:58, 12:68].all() and mask[72:108, 92:148].all()
    assert not mask[:, 75:85].any()


def test_specks_dropped_and_holes_filled():
    img = _glass()
    img[20:100, 20:100] = TISSUE_RGB
    img[55:60, 55:60] = GLASS_RGB            # 25-px hole inside tissue
    img[10:14, 130:134] = TISSUE_RGB         # 16-px speck on glass
    mask = tissue_mask(img, min_area_px=64)
    assert mask[55:60, 55:60].all()
    assert not mask[5:20, 120:150].any()
    assert mask[20:100, 20:100].all()
    assert tissue_mask(img, min_area_px=0)[10:14, 130:134].any()   # kept without a minimum


def test_tissue_touching_the_border_is_kept():
    img = _glass()
    img[:, :30] = TISSUE_RGB
    assert tissue_mask(img)[:, :30].all()


def test_rgba_accepted_and_bad_shapes_rejected():
    img = _glass()
    img[20:100, 20:100] = TISSUE_RGB
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    np.testing.assert_array_equal(tissue_mask(rgba), tissue_mask(img))
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((0, 10, 3), np.uint8))
