"""The training loop and `usnet-wsi train` end to end on tiny synthetic data."""

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from usnet_wsi.cli import main
from usnet_wsi.console import Reporter
from usnet_wsi.model.bundle import load_bundle
from usnet_wsi.training.data import Annotated
from usnet_wsi.training.loop import TrainConfig, checkpoint_dir, train


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
