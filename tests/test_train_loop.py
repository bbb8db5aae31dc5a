"""The training loop and `usnet-wsi train` end to end on tiny synthetic data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from usnet_wsi.cli import main
from usnet_wsi.console import Reporter
from usnet_wsi.model.bundle import load_bundle
from usnet_wsi.training.data import Annotated
from usnet_wsi.training.loop import TrainConfig, checkpoint_dir, train
from usnet_wsi.training.precision import resolve_train_precision


def tiny_image(seed: int, size: int = 400) -> Annotated:
    rng = np.random.default_rng(seed)
    lab = np.zeros((size, size), np.int32)
    for i in range(12):
        y, x = rng.integers(20, size - 20, 2)
        lab[y - 8:y + 8, x - 8:x + 8] = i + 1
    rgb = np.where(lab[..., None] > 0, [90, 60, 150], [230, 170, 200]).astype(np.uint8)
    return Annotated(f"img{seed}", rgb, lab)


def test_time_budget_inside_the_first_epoch_still_writes_a_bundle(tmp_path: Path):
    cfg = TrainConfig(out=tmp_path / "b", epochs=3, batch_size=1, max_minutes=1e-5, name="t")
    out = train(cfg, [tiny_image(0)], [tiny_image(1)], Reporter(0))
    bundle = load_bundle(out)
    assert bundle.name == "t" and "aji" in bundle.config["validation_metrics"]
    assert bundle.config["history"][-1].get("partial") is True
    assert (checkpoint_dir(out) / "state.safetensors").is_file()


def test_train_command_writes_a_loadable_bundle_and_resumes(tmp_path: Path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    for seed in range(3):
        a = tiny_image(seed)
        Image.fromarray(a.rgb).save(data / "images" / f"{a.name}.png")
        Image.fromarray(a.labels.astype(np.uint16)).save(data / "labels" / f"{a.name}.png")
    args = ["train", str(data), "--out", str(tmp_path / "b"), "--epochs", "1", "--batch-size", "2",
            "--val", "img2", "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    bundle = load_bundle(tmp_path / "b")
    assert bundle.config["validation_images"] == ["img2"]
    assert bundle.config["train_images"] == ["img0", "img1"]
    arith = resolve_train_precision("auto", torch.device("cpu"))      # --precision auto
    assert bundle.config["train"]["precision"] == arith
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    assert ("(bf16 autocast, torch" if arith == "bf16" else "(fp32, torch") in card
    res = CliRunner().invoke(main, args[:-3] + ["--epochs", "2", "--val", "img2", "--resume", "-q"])
    assert res.exit_code == 0, res.output
    state = json.loads((checkpoint_dir(tmp_path / "b") / "state.json").read_text())["state"]
    assert state["epoch"] == 2


def test_batch_larger_than_the_data_is_a_usage_error(tmp_path: Path):
    import pytest
    from usnet_wsi.errors import UsageError
    cfg = TrainConfig(out=tmp_path / "b", epochs=1, batch_size=4)
    with pytest.raises(UsageError, match="--batch-size 4"):
        train(cfg, [tiny_image(0)], [], Reporter(0))


def test_train_command_refuses_a_bad_validation_fraction(tmp_path: Path):
    data = tmp_path / "d"
    data.mkdir()
    a = tiny_image(0)
    Image.fromarray(a.rgb).save(data / "x.png")
    Image.fromarray(a.labels.astype(np.uint16)).save(data / "x_label.png")
    res = CliRunner().invoke(main, ["train", str(data), "--out", str(tmp_path / "b"),
                                    "--val", "1.5"])
    assert res.exit_code == 2 and "--val" in res.output


def _tiny_bundle(folder: Path, recipe: str = "default") -> Path:
    import torch
    from usnet_wsi.model.bundle import Thresholds, save_bundle
    from usnet_wsi.model.spec import ModelSpec
    from usnet_wsi.model.usnet import USNet
    torch.manual_seed(3)
    spec = ModelSpec(recipe=recipe, base_width=2, max_width=8, head_width=8, refine_width=4)
    return save_bundle(folder, "tiny", USNet(spec), spec, Thresholds(score=0.3), "card",
                       extra={"inference_tile_px": 200})


def test_fine_tuning_starts_from_the_bundle_and_changes_its_weights(tmp_path: Path):
    init = _tiny_bundle(tmp_path / "init")
    cfg = TrainConfig(out=tmp_path / "tuned", epochs=1, batch_size=2, init=init, name="tuned",
                      lr_scale=0.3)
    out = train(cfg, [tiny_image(0), tiny_image(1)], [tiny_image(2)], Reporter(0))
    before, after = load_bundle(init), load_bundle(out)
    assert after.spec == before.spec                       # the bundle's architecture, not the recipe's
    assert after.config["init_bundle"] == {"name": "tiny", "sha256": before.sha256}
    assert after.config["inference_tile_px"] == 200
    assert "Fine-tuned from `tiny`" in (out / "MODEL_CARD.md").read_text()
    changed = [k for k in before.state if before.state[k].is_floating_point()
               and not (before.state[k] == after.state[k]).all()]
    assert len(changed) > len(before.state) // 2


def test_init_refusals_name_the_fix(tmp_path: Path):
    from usnet_wsi.errors import UsageError
    import pytest
    paper = _tiny_bundle(tmp_path / "paper", recipe="paper")
    cfg = TrainConfig(out=tmp_path / "o", epochs=1, batch_size=1, init=paper)
    with pytest.raises(UsageError, match="--recipe paper"):
        train(cfg, [tiny_image(0)], [], Reporter(0))
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    a = tiny_image(0)
    Image.fromarray(a.rgb).save(data / "images" / "img0.png")
    Image.fromarray(a.labels.astype(np.uint16)).save(data / "labels" / "img0.png")
    base = ["train", str(data), "--out", str(tmp_path / "b"), "--val", "none", "--epochs", "1"]
    for extra, code, words in ((["--init", "no-such-bundle"], 1, "usnet-monuseg-v1"),
                               (["--init", str(paper)], 2, "--recipe paper"),
                               (["--init", "usnet-monuseg-v1", "--resume"], 2, "--resume")):
        res = CliRunner().invoke(main, base + extra)
        assert res.exit_code == code, res.output
        assert words in res.output
    assert not (tmp_path / "b").exists()


def test_the_shipped_bundle_is_found_by_name():
    from usnet_wsi.cli.train import resolve_init
    from usnet_wsi.model.bundle import DEFAULT_BUNDLE, default_bundle_path
    assert resolve_init(DEFAULT_BUNDLE, resume=False) == default_bundle_path()


def _write_dataset(folder: Path, images: list[Annotated], sources: dict[str, str] | None = None):
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for a in images:
        Image.fromarray(a.rgb).save(folder / "images" / f"{a.name}.png")
        Image.fromarray(a.labels.astype(np.uint16)).save(folder / "labels" / f"{a.name}.png")
    if sources:
        manifest = [{"name": n, "source_image": s} for n, s in sources.items()]
        (folder / "manifest.json").write_text(json.dumps(manifest))


def _tile(name: str, seed: int, size: int = 256) -> Annotated:
    a = tiny_image(seed, size)
    return Annotated(name, a.rgb, a.labels)


def test_two_datasets_small_tiles_grouped_validation_and_per_dataset_metrics(tmp_path: Path):
    big = tmp_path / "big"
    _write_dataset(big, [Annotated(f"big{i}", *_pair(tiny_image(i))) for i in range(3)])
    small = tmp_path / "small"
    tiles = {f"s{src}_{k}": f"s{src}" for src in range(3) for k in range(2)}
    _write_dataset(small, [_tile(n, 10 + i) for i, n in enumerate(tiles)], tiles)
    out = tmp_path / "b"
    res = CliRunner().invoke(main, ["train", f"{big}@0.25", str(small), "--out", str(out),
                                    "--epochs", "1", "--batch-size", "2", "--val", "0.34",
                                    "--val-every", "1", "-q"])
    assert res.exit_code == 0, res.output
    config = load_bundle(out).config
    val = set(config["validation_images"])
    val_sources = {tiles[n] for n in val if n in tiles}
    assert len(val_sources) == 1                         # one source image of the tiles ...
    assert {n for n, s in tiles.items() if s in val_sources} <= val   # ... with all its tiles
    assert any(n.startswith("big") for n in val)         # and a share of the other dataset
    assert config["datasets"] == ["big", "small"]
    metrics = config["validation_metrics"]
    assert {"big/aji", "small/aji", "aji"} <= set(metrics)
    assert metrics["aji"] == pytest.approx((metrics["big/aji"] + metrics["small/aji"]) / 2,
                                           abs=1e-3)


def _pair(a: Annotated):
    return a.rgb, a.labels


def test_data_at_mpp_is_parsed_and_images_are_resampled(tmp_path: Path):
    from usnet_wsi.cli.train import parse_data
    from usnet_wsi.errors import UsageError
    from usnet_wsi.training.data import rescale
    assert parse_data(tmp_path / "x@0.5") == (tmp_path / "x", 0.5)
    assert parse_data(tmp_path) == (tmp_path, None)
    with pytest.raises(UsageError, match="DATA@MPP"):
        parse_data(tmp_path / "x@fast")
    a = tiny_image(0, 200)
    half = rescale(a, 0.5, 0.25)                    # 0.5 um/px -> 0.25: twice the pixels
    assert half.rgb.shape == (400, 400, 3) and half.labels.shape == (400, 400)
    assert set(np.unique(half.labels)) == set(np.unique(a.labels))
    assert rescale(a, 0.2505, 0.25) is a


def test_tiles_smaller_than_the_model_input_are_padded_not_stretched():
    from usnet_wsi.training.data import pad_to
    a = tiny_image(0, 256)
    rgb, lab = pad_to(a.rgb, a.labels, 300, np.random.default_rng(0))
    assert rgb.shape == (300, 300, 3) and lab.shape == (300, 300)
    assert (lab > 0).sum() == (a.labels > 0).sum()      # every nucleus kept at its size
    assert (rgb[lab == 0] == 255).all(axis=1).sum() >= 300 * 300 - 256 * 256


def test_the_model_card_names_the_device_the_model_trained_on(monkeypatch):
    """A model trained on the CPU of a machine that also has a GPU: the card names the CPU."""
    from usnet_wsi.training.card import hardware
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    assert hardware(torch.device("cpu")).endswith(f"{torch.get_num_threads()} threads")
    assert hardware(torch.device("cuda", 1)) == "Some GPU"
