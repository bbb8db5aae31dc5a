"""usnet_wsi.slide on synthetic slides: resolution sources, region reads, thumbnails, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from usnet_wsi.errors import SlideError, UsageError
from usnet_wsi.slide import Slide, fingerprint, open_slide, slide_name


def _resize(img: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]):
    """Reference: the painted level-0 image cropped to `box` and resized with PIL (Lanczos)."""
    pil = Image.fromarray(img).resize(size, Image.Resampling.LANCZOS, box=box)
    return np.asarray(pil).astype(int)


# ---------------------------------------------------------------- resolution (mpp) sources

@pytest.mark.parametrize("kind, source", [("svs", "openslide"), ("tiff", "openslide"),
                                          ("tiff-inch", "openslide"), ("svs-tiffres", "tiff")])
def test_mpp_from_file(slide_factory, kind, source, reporter):
    s = slide_factory(f"a-{kind}.tif", 256, 256, mpp=0.5, kind=kind, levels=1)
    with open_slide(s.path, reporter=reporter) as slide:
        assert slide.info.mpp_source == source
        assert slide.info.mpp_x == pytest.approx(0.5)
        assert slide.info.mpp_y == pytest.approx(0.5)
    assert reporter.warnings == []


def test_mpp_from_objective_warns(slide_factory, reporter):
    s = slide_factory("obj.svs", 256, 256, mpp=0.5, kind="svs-objective", levels=1)
    with open_slide(s.path, reporter=reporter) as slide:
        assert slide.info.mpp_source == "objective"
        assert slide.info.objective_power == 20
        assert slide.info.mpp_x == pytest.approx(10 / 20)
    assert len(reporter.warnings) == 1 and "--mpp" in reporter.warnings[0]


def test_user_mpp_overrides_file(synth_svs, reporter):
    with open_slide(synth_svs.path, mpp=0.123, reporter=reporter) as slide:
        assert (slide.info.mpp_x, slide.info.mpp_y, slide.info.mpp_source) == (0.123, 0.123, "user")
    assert any("0.25" in m for m in reporter.infos)   # the override is reported, not silent


def test_unknown_mpp_names_the_option(slide_factory):
    s = slide_factory("none.tif", 256, 256, kind="no-mpp", levels=1)
    with pytest.raises(SlideError) as err:
        open_slide(s.path)
    assert "--mpp" in err.value.hint
    with open_slide(s.path, mpp=0.25) as slide:   # the fix works
        assert slide.info.mpp_source == "user"


@pytest.mark.parametrize("bad", [0, -0.25, float("nan"), float("inf"), "abc"])
def test_bad_user_mpp_is_usage_error(synth_svs, bad):
    with pytest.raises(UsageError) as err:
        open_slide(synth_svs.path, mpp=bad)
    assert "--mpp" in str(err.value)


# ---------------------------------------------------------------- SlideInfo

def test_info_describes_the_slide(synth_svs):
    with open_slide(synth_svs.path) as slide:
        info = slide.info
    assert (info.width, info.height) == (1024, 768)
    assert info.vendor == "aperio"
    assert info.level_dimensions == ((1024, 768), (256, 192))
    assert info.level_downsamples == pytest.approx((1.0, 4.0))
    assert info.name == "grid"
    assert len(info.fingerprint) == 64
    d = json.loads(json.dumps(info.to_dict()))
    assert d["level_dimensions"] == [[1024, 768], [256, 192]] and d["mpp_source"] == "openslide"


def test_fingerprint_is_stable_and_content_sensitive(slide_factory):
    a = slide_factory("a.svs", 256, 256, levels=1, seed=1)
    b = slide_factory("b.svs", 256, 256, levels=1, seed=2)
    with open_slide(a.path) as s1, open_slide(a.path) as s2, open_slide(b.path) as s3:
        assert s1.info.fingerprint == s2.info.fingerprint
        assert s1.info.fingerprint != s3.info.fingerprint
        assert fingerprint(a.path, ((256, 256),)) != fingerprint(a.path, ((256, 255),))


@pytest.mark.parametrize("path, name", [("x/a.svs", "a"), ("b.ome.tiff", "b"), ("c.OME.TIF", "c"),
                                        ("d.v2.ndpi", "d.v2"), ("e.mrxs", "e"), ("f.xyz", "f"),
                                        (".svs", ".svs")])
def test_slide_name(path, name):
    assert slide_name(path) == name


# ---------------------------------------------------------------- read_region

def test_read_region_level0_is_exact(synth_svs):
    with open_slide(synth_svs.path) as slide:
        out = slide.read_region((100, 50, 400, 300), (300, 250))
    assert out.dtype == np.uint8 and out.shape == (250, 300, 3)
    np.testing.assert_array_equal(out, synth_svs.image[50:300, 100:400])


def test_read_region_across_the_edge_is_white_outside(synth_svs):
    W = synth_svs.width
    with open_slide(synth_svs.path) as slide:
        out = slide.read_region((W - 100, -40, W + 60, 120), (160, 160))
    np.testing.assert_array_equal(out[40:, :100], synth_svs.image[:120, W - 100:])
    assert (out[:40] == 255).all() and (out[:, 100:] == 255).all()
    with open_slide(synth_svs.path) as slide:
        far = slide.read_region((-500, -500, -100, -100), (50, 50))
    assert (far == 255).all()


@pytest.mark.parametrize("alpha", ["binary", "partial"])
def test_transparent_pixels_are_composited_on_white(alpha):
    """OpenSlide's RGBA (not premultiplied) over white, rounded: out = (rgb a + 255 (255 - a)
    + 127) // 255, whether the alpha band is only 0 / 255 (slide edges) or has any value."""
    from usnet_wsi.slide import _composite_on_white
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (70, 90, 4), dtype=np.uint8)
    if alpha == "binary":
        rgba[..., 3] = np.where(rng.random((70, 90)) < 0.3, 0, 255)
    rgb, a = rgba[..., :3].astype(int), rgba[..., 3:].astype(int)
    want = (rgb * a + 255 * (255 - a) + 127) // 255
    got = _composite_on_white(Image.fromarray(rgba, "RGBA"))
    assert got.dtype == np.uint8 and got.shape == (70, 90, 3)
    np.testing.assert_array_equal(got, want)


def test_read_region_uses_the_lower_level(synth_svs):
    """A 4x reduction of the whole slide equals the stored level 1 (read there, no resampling)."""
    level1 = np.asarray(Image.fromarray(synth_svs.image).resize((256, 192), Image.Resampling.BOX))
    with open_slide(synth_svs.path) as slide:
        assert slide.best_level(4.0) == 1 and slide.best_level(3.9) == 0
        out = slide.read_region((0, 0, 1024, 768), (256, 192))
    np.testing.assert_array_equal(out, level1)


@pytest.mark.parametrize("box, size", [((36, 52, 636, 652), (300, 300)),     # 2x, level 0
                                       ((10, 6, 1010, 606), (200, 120)),     # 5x, level 1
                                       ((13, 17, 613, 617), (100, 100)),     # 6x, level 1, odd
                                       ((300, 200, 450, 350), (300, 300))])  # 0.5x (upsample)
def test_read_region_resampled_matches_the_painted_image(synth_svs, box, size):
    with open_slide(synth_svs.path) as slide:
        out = slide.read_region(box, size).astype(int)
    ref = _resize(synth_svs.image, box, size)
    assert out.shape == ref.shape
    assert np.abs(out - ref).mean() < 2.0   # a 4-px shift already gives ~7
    # nuclei stay where they are: dark pixels in the same places
    assert ((out.sum(2) < 400) == (ref.sum(2) < 400)).mean() > 0.97


def test_read_region_rejects_empty_boxes(synth_svs):
    with open_slide(synth_svs.path) as slide:
        with pytest.raises(ValueError):
            slide.read_region((10, 10, 10, 20), (5, 5))
        with pytest.raises(ValueError):
            slide.read_region((0, 0, 10, 10), (0, 5))


def test_thumbnail(synth_svs):
    with open_slide(synth_svs.path) as slide:
        thumb, scale = slide.thumbnail(max_side=200)
        big, big_scale = slide.thumbnail(max_side=5000)
    assert scale == pytest.approx(200 / 1024)
    assert thumb.shape == (round(768 * scale), 200, 3) and thumb.dtype == np.uint8
    ref = _resize(synth_svs.image, (0, 0, 1024, 768), (200, thumb.shape[0]))
    assert np.abs(thumb.astype(int) - ref).mean() < 4.0
    assert big_scale == 1.0
    np.testing.assert_array_equal(big, synth_svs.image)


def test_thumbnail_in_bands_equals_one_read(synth_svs, monkeypatch):
    """A single-level gigapixel slide is thumbnailed band by band; the bands must join exactly."""
    import usnet_wsi.slide as slide_mod
    with open_slide(synth_svs.path) as slide:
        whole, _ = slide.thumbnail(max_side=300)     # 3.4x reduction: resampled from level 0
        monkeypatch.setattr(slide_mod, "_MAX_READ_PX", 1024 * 37)
        banded, _ = slide.thumbnail(max_side=300)
    assert banded.shape == whole.shape
    # fractional band edges change PIL's fixed-point rounding by at most 1 level
    assert np.abs(banded.astype(int) - whole).max() <= 1


def test_neighbouring_reads_join_without_seams(synth_svs):
    """Two half reads equal the halves of one read (the filter sees past each box edge)."""
    with open_slide(synth_svs.path) as slide:
        whole = slide.read_region((100, 100, 700, 400), (240, 120))   # 2.5x, resampled
        left = slide.read_region((100, 100, 400, 400), (120, 120))
        right = slide.read_region((400, 100, 700, 400), (120, 120))
    np.testing.assert_array_equal(np.hstack([left, right]), whole)


# ---------------------------------------------------------------- bad input -> SlideError

def test_missing_path(tmp_path):
    with pytest.raises(SlideError, match="not found") as err:
        open_slide(tmp_path / "nope.svs")
    assert err.value.hint


def test_directory(tmp_path):
    with pytest.raises(SlideError, match="folder") as err:
        open_slide(tmp_path)
    assert err.value.hint


def test_empty_file(tmp_path):
    p = tmp_path / "empty.svs"
    p.write_bytes(b"")
    with pytest.raises(SlideError, match="empty"):
        open_slide(p)


def test_not_a_slide(tmp_path):
    p = tmp_path / "notes.svs"
    p.write_text("this is not a slide\n" * 50)
    with pytest.raises(SlideError, match="not an image format") as err:
        open_slide(p)
    assert "tiff" in err.value.hint.lower()


def test_flat_tiff_is_read_and_needs_a_resolution(tmp_path):
    p = tmp_path / "flat.tif"
    tifffile.imwrite(p, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    with pytest.raises(SlideError, match="pixel size") as err:
        open_slide(p)
    assert "--mpp" in err.value.hint


@pytest.mark.parametrize("levels, keep", [((1, 4), 0.9), ((1, 4), 0.3), (1, 0.6), (1, 0.02)])
def test_truncated_slide(slide_factory, levels, keep):
    s = slide_factory("t.svs", 512, 512, levels=levels)
    data = s.path.read_bytes()
    s.path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SlideError) as err:
        with open_slide(s.path) as slide:
            slide.read_region((0, 0, 512, 512), (512, 512))
    assert "truncated" in str(err.value) or "corrupt" in str(err.value)


def test_corrupt_tile_data_fails_on_read(slide_factory):
    """OpenSlide opens the file (structure intact) but decoding level-0 tiles fails."""
    s = slide_factory("c.svs", 512, 512, levels=(1, 4))
    data = bytearray(s.path.read_bytes())
    with tifffile.TiffFile(s.path) as tf:
        page = tf.pages[0]
        for off, n in zip(page.dataoffsets, page.databytecounts):
            data[off + 2: off + n] = os.urandom(n - 2)
    s.path.write_bytes(bytes(data))
    with open_slide(s.path) as slide:   # the small level is intact: opening works
        with pytest.raises(SlideError) as err:
            slide.read_region((0, 0, 256, 256), (256, 256))
    assert "corrupt" in err.value.hint


def test_read_after_close(synth_svs):
    slide = open_slide(synth_svs.path)
    assert isinstance(slide, Slide)
    slide.close()
    slide.close()   # idempotent
    with pytest.raises(SlideError):
        slide.read_region((0, 0, 10, 10), (10, 10))


def test_implausible_tiff_resolution_is_ignored(tmp_path):
    """72 dpi placeholder tags must not become a 352 um/px resolution."""
    p = tmp_path / "dpi.svs"
    img = np.full((256, 256, 3), 200, np.uint8)
    tifffile.imwrite(p, img, tile=(256, 256), photometric="rgb", metadata=None,
                     description="Aperio Image Library v12\r\n256x256|Filename = x",
                     resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(SlideError) as err:
        open_slide(p)
    assert "--mpp" in err.value.hint
