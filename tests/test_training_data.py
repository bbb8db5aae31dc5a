"""Training data: folder discovery, bad data, the paper's crop windows, segmentation targets,
aligned augmentation, one training step and resumable checkpoints."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from usnet_wsi.anchors import make_anchors
from usnet_wsi.errors import DataError
from usnet_wsi.model.spec import ModelSpec
from usnet_wsi.model.usnet import USNet
from usnet_wsi.training.batches import make_batch
from usnet_wsi.training.checkpoint import load_checkpoint, save_checkpoint
from usnet_wsi.training.data import (Annotated, augment, crop_origins, discover, load_pair,
                                     rescale_pair, seg_target)
from usnet_wsi.training.loop import TrainConfig, TrainState, make_optimizers, train_step

TINY = dict(base_width=2, max_width=8, head_width=8, refine_width=4, input_size=96)


def discs(h: int, w: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-ish RGB image with n dark discs and its instance map."""
    rng = np.random.default_rng(seed)
    rgb = np.full((h, w, 3), (230, 200, 220), np.uint8)
    labels = np.zeros((h, w), np.int32)
    yy, xx = np.mgrid[0:h, 0:w]
    for k in range(1, n + 1):
        cy, cx, r = rng.integers(8, h - 8), rng.integers(8, w - 8), rng.integers(4, 8)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        labels[disc] = k
        rgb[disc] = (80, 40, 120)
    return rgb, labels


def save_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


# ---------------------------------------------------------------- discovery

def test_discover_images_and_labels_folders(tmp_path: Path) -> None:
    rgb, lab = discs(40, 50, 3, seed=0)
    save_png(tmp_path / "images" / "a.png", rgb)
    save_png(tmp_path / "labels" / "a.png", lab.astype(np.uint16))
    tifffile.imwrite(tmp_path / "images" / "b.tif", rgb)
    tifffile.imwrite(tmp_path / "labels" / "b.tif", lab)
    save_png(tmp_path / "images" / "unlabelled.png", rgb)
    pairs = discover(tmp_path)
    assert pairs == [(tmp_path / "images" / "a.png", tmp_path / "labels" / "a.png"),
                     (tmp_path / "images" / "b.tif", tmp_path / "labels" / "b.tif")]
    for image, labels in pairs:
        sample = load_pair(image, labels)
        assert sample.rgb.dtype == np.uint8 and sample.rgb.shape == (40, 50, 3)
        np.testing.assert_array_equal(sample.rgb, rgb)
        assert sample.labels.dtype == np.int32
        np.testing.assert_array_equal(sample.labels, lab)


def test_discover_flat_name_and_name_label(tmp_path: Path) -> None:
    rgb, lab = discs(30, 30, 2, seed=1)
    save_png(tmp_path / "one.png", rgb)
    save_png(tmp_path / "one_label.png", lab.astype(np.uint8))
    save_png(tmp_path / "two.png", rgb)
    save_png(tmp_path / "two_labels.png", lab.astype(np.uint16))
    save_png(tmp_path / "three.png", rgb)                       # no annotation: skipped
    assert discover(tmp_path) == [(tmp_path / "one.png", tmp_path / "one_label.png"),
                                  (tmp_path / "two.png", tmp_path / "two_labels.png")]


def test_discover_refuses_empty_and_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        discover(tmp_path)
    assert "no annotated images" in info.value.message and info.value.hint
    save_png(tmp_path / "lonely.png", discs(20, 20, 1, seed=2)[0])   # images without labels
    with pytest.raises(DataError):
        discover(tmp_path)
    with pytest.raises(DataError) as info:
        discover(tmp_path / "nope")
    assert "not found" in info.value.message and info.value.hint


def test_load_pair_refuses_mismatched_sizes(tmp_path: Path) -> None:
    rgb, lab = discs(40, 50, 3, seed=3)
    image = save_png(tmp_path / "a.png", rgb)
    labels = save_png(tmp_path / "a_label.png", lab[:, :45].astype(np.uint16))
    with pytest.raises(DataError) as info:
        load_pair(image, labels)
    assert "45x40" in info.value.message and "50x40" in info.value.message
    assert info.value.hint


def test_load_pair_refuses_rgb_and_binary_label_images(tmp_path: Path) -> None:
    rgb, lab = discs(40, 50, 3, seed=4)
    image = save_png(tmp_path / "a.png", rgb)
    colour = save_png(tmp_path / "a_label.png", np.stack([lab.astype(np.uint8)] * 3, axis=-1))
    with pytest.raises(DataError) as info:
        load_pair(image, colour)
    assert "not an instance label map" in info.value.message and info.value.hint
    binary = save_png(tmp_path / "b_label.png", (lab > 0).astype(np.uint8))
    with pytest.raises(DataError, match="binary"):
        load_pair(image, binary)


# ---------------------------------------------------------------- windows and targets

def test_crop_origins_are_the_papers_400_200_windows() -> None:
    steps = [0, 200, 400, 600]                                   # 600 + 400 = 1000: flush
    assert crop_origins(1000, 1000) == [(y, x) for y in steps for x in steps]
    assert crop_origins(1000, 700) == [(y, x) for y in steps for x in (0, 200, 300)]
    assert crop_origins(300, 350) == [(0, 0)]                    # smaller than a window


def test_seg_target_marks_outlines_and_contacts_as_boundary() -> None:
    labels = np.zeros((8, 12), np.int32)
    labels[1:6, 1:6] = 1
    labels[1:6, 6:11] = 2              # touches square 1 along columns 5 | 6
    expected = np.zeros((8, 12), np.int64)
    expected[1:6, 1:6] = 2             # every pixel of a 5x5 square ...
    expected[2:5, 2:5] = 1             # ... but its 3x3 core is on its outline
    expected[1:6, 6:11] = 2
    expected[2:5, 7:10] = 1
    np.testing.assert_array_equal(seg_target(labels, 3), expected)
    np.testing.assert_array_equal(seg_target(labels, 1), (labels > 0).astype(np.int64))


def test_seg_target_image_border_is_not_a_boundary() -> None:
    labels = np.zeros((6, 6), np.int32)
    labels[0:4, 0:4] = 7               # a nucleus cut by the crop's top-left corner
    expected = np.zeros((6, 6), np.int64)
    expected[0:4, 0:4] = 2
    expected[0:3, 0:3] = 1             # its outline is only where it meets background
    np.testing.assert_array_equal(seg_target(labels, 3), expected)


# ---------------------------------------------------------------- augmentation

def test_augment_keeps_image_and_labels_aligned() -> None:
    """Label = original pixel index + 1, image colour = original (row, col): after a crop,
    flips and rotations the colour under every label is still that label's pixel."""
    h, w, size = 70, 60, 48
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([yy, xx, np.full_like(yy, 9)], axis=-1).astype(np.uint8)
    labels = (yy * w + xx + 1).astype(np.int32)
    orientations = set()
    for seed in range(24):
        out_rgb, out_lab = augment(rgb, labels, size, np.random.default_rng(seed), strong=False)
        assert out_rgb.shape == (size, size, 3) and out_lab.shape == (size, size)
        src_y, src_x = np.divmod(out_lab - 1, w)
        np.testing.assert_array_equal(out_rgb[..., 0], src_y)
        np.testing.assert_array_equal(out_rgb[..., 1], src_x)
        assert (out_rgb[..., 2] == 9).all()
        # a rigid motion of a crop: neighbours stay neighbours (steps of one pixel)
        step = np.abs(np.diff(src_y, axis=1)) + np.abs(np.diff(src_x, axis=1))
        assert (step == 1).all()
        orientations.add((src_y[0, 1] - src_y[0, 0], src_x[0, 1] - src_x[0, 0],
                          src_y[1, 0] - src_y[0, 0], src_x[1, 0] - src_x[0, 0]))
    assert len(orientations) >= 6      # rotations and flips were exercised


@pytest.mark.parametrize("shape", [(90, 81), (63, 70), (70, 60)])
def test_rescale_pair_maps_pixel_centres(shape: tuple[int, int]) -> None:
    """Labels: each output pixel takes the input pixel under its centre. Image: bilinear, so
    a ramp stays a ramp (value = 2 * source column centre, to within rounding)."""
    h, w = 70, 60
    yy, xx = np.mgrid[0:h, 0:w]
    labels = (yy * w + xx + 1).astype(np.int32)
    rgb = np.stack([2 * xx + 10, 2 * yy + 10, np.full_like(xx, 77)], -1).astype(np.uint8)
    out_rgb, out_lab = rescale_pair(rgb, labels, shape)
    assert out_rgb.shape == (*shape, 3) and out_rgb.dtype == np.uint8
    assert out_lab.shape == shape and out_lab.dtype == np.int32
    src_y, src_x = np.divmod(out_lab - 1, w)
    cy = (np.arange(shape[0]) + 0.5) * h / shape[0]
    cx = (np.arange(shape[1]) + 0.5) * w / shape[1]
    np.testing.assert_array_equal(src_y[:, 0], np.floor(cy).astype(int))
    np.testing.assert_array_equal(src_x[0], np.floor(cx).astype(int))
    inner = (cx > 1) & (cx < w - 1)                     # bilinear away from the clamped border
    want = 2 * (cx - 0.5) + 10
    assert np.abs(out_rgb[5, inner, 0] - want[inner]).max() <= 0.51
    assert (out_rgb[..., 2] == 77).all()
    same_rgb, same_lab = rescale_pair(rgb, labels, (h, w))
    np.testing.assert_array_equal(same_rgb, rgb)
    np.testing.assert_array_equal(same_lab, labels)


def test_strong_augment_keeps_shapes_and_label_ids() -> None:
    rgb, lab = discs(120, 110, 6, seed=5)
    out_rgb, out_lab = augment(rgb, lab, 96, np.random.default_rng(0), strong=True)
    assert out_rgb.shape == (96, 96, 3) and out_rgb.dtype == np.uint8
    assert out_lab.shape == (96, 96) and out_lab.dtype == np.int32
    assert set(np.unique(out_lab)) <= set(np.unique(lab))


# ---------------------------------------------------------------- training step, checkpoint

def tiny_setup(recipe: str, seed: int) -> tuple[USNet, list]:
    torch.manual_seed(seed)
    extra = {} if recipe == "default" else dict(recipe="paper", seg_classes=1,
                                                refine_inputs="rgb", rescue_missed=False)
    model = USNet(ModelSpec(**TINY, **extra))
    return model, make_optimizers(model, recipe)


def tiny_batch(model: USNet, seed: int):
    data = [Annotated(f"img{i}", *discs(128, 128, 8, seed=10 + i)) for i in range(2)]
    return make_batch(data, [(0, 0, 0), (1, 0, 0)], model.spec, make_anchors(model.spec),
                      np.random.default_rng(seed))


def step(model: USNet, opts: list, batch, tmp_path: Path, seed: int) -> dict[str, float]:
    cfg = TrainConfig(out=tmp_path / "bundle", batch_size=2, refine_per_image=4)
    return train_step(model, batch, make_anchors(model.spec), opts, cfg,
                      np.random.default_rng(seed), torch.device("cpu"))


@pytest.mark.parametrize("recipe", ["default", "paper"])
def test_train_step_gives_finite_losses_and_moves_every_branch(tmp_path: Path,
                                                               recipe: str) -> None:
    model, opts = tiny_setup(recipe, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = tiny_batch(model, seed=1)
    assert batch.images.shape == (2, 96, 96, 3) and (batch.anchor_labels == 1).any()
    parts = step(model, opts, batch, tmp_path, seed=2)
    assert set(parts) == {"conf", "loc", "seg", "ce", "ref"}
    assert all(np.isfinite(v) for v in parts.values()), parts
    assert parts["conf"] > 0 and parts["seg"] > 0 and parts["ref"] > 0
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    for name in ("unet.enc.0.0.weight", "head.cls.0.weight", "refiner.c4.weight"):
        assert not torch.equal(before[name], model.state_dict()[name]), name


@pytest.mark.parametrize("recipe", ["default", "paper"])
def test_checkpoint_round_trips_model_and_optimizer_state(tmp_path: Path, recipe: str) -> None:
    model, opts = tiny_setup(recipe, seed=0)
    batch = tiny_batch(model, seed=1)
    step(model, opts, batch, tmp_path, seed=2)
    state = TrainState(epoch=1, step=1, best_aji=0.25, elapsed_s=3.5,
                       history=[{"epoch": 1, "conf": 0.5}])
    save_checkpoint(tmp_path / "ckpt", model, opts, state)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["state.json",
                                                                    "state.safetensors"]
    other, other_opts = tiny_setup(recipe, seed=99)
    assert load_checkpoint(tmp_path / "ckpt", other, other_opts) == asdict(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    for a, b in zip(opts, other_opts):
        sa, sb = a.state_dict(), b.state_dict()
        assert json.loads(json.dumps(sa["param_groups"])) == \
            json.loads(json.dumps(sb["param_groups"]))
        assert sa["state"].keys() == sb["state"].keys() and sa["state"]
        for pid in sa["state"]:
            for name, val in sa["state"][pid].items():
                assert torch.equal(torch.as_tensor(val), torch.as_tensor(sb["state"][pid][name]))
    # the resumed run continues exactly as the original would have
    next_batch = tiny_batch(model, seed=3)
    want = step(model, opts, next_batch, tmp_path, seed=4)
    got = step(other, other_opts, next_batch, tmp_path, seed=4)
    assert got == pytest.approx(want, rel=1e-5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_load_checkpoint_without_one_is_a_data_error(tmp_path: Path) -> None:
    model, opts = tiny_setup("default", seed=0)
    with pytest.raises(DataError) as info:
        load_checkpoint(tmp_path / "none", model, opts)
    assert "--resume" in info.value.hint


@pytest.mark.parametrize("damage", ["other recipe", "bad json"])
def test_unusable_checkpoint_is_a_data_error(tmp_path: Path, damage: str) -> None:
    model, opts = tiny_setup("default", seed=0)
    save_checkpoint(tmp_path / "ckpt", model, opts, TrainState())
    if damage == "bad json":
        (tmp_path / "ckpt" / "state.json").write_text("{")
    else:
        model, opts = tiny_setup("paper", seed=0)
    with pytest.raises(DataError):
        load_checkpoint(tmp_path / "ckpt", model, opts)
