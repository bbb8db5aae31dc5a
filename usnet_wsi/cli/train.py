"""`usnet-wsi train DATA... --out BUNDLE_DIR`: train US-Net + refiner on annotated images."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from usnet_wsi.cli.common import guarded, make_reporter, verbosity_options
from usnet_wsi.errors import UsageError

DEFAULT_VAL = ("TCGA-21-5786-01Z-00-DX1", "TCGA-AR-A1AS-01Z-00-DX1", "TCGA-B0-5710-01Z-00-DX1",
               "TCGA-G9-6362-01Z-00-DX1", "TCGA-NH-A8F7-01A-01-TS1", "TCGA-DK-A2I6-01A-01-TS1")


def split_validation(names: list[str], val: str | None, seed: int) -> set[str]:
    """--val: 'monuseg' (the fixed 6-organ split), a fraction like 0.2, or comma-separated names."""
    if val is None or val == "none":
        return set()
    if val == "monuseg":
        return set(DEFAULT_VAL) & set(names)
    try:
        frac = float(val)
    except ValueError:
        chosen = {v.strip() for v in val.split(",") if v.strip()}
        unknown = chosen - set(names)
        if unknown:
            raise UsageError(f"--val names not in the data: {sorted(unknown)}",
                             "give image names without extension, comma-separated") from None
        return chosen
    if not 0 < frac < 1:
        raise UsageError(f"--val {val}: a fraction must be between 0 and 1", "e.g. --val 0.2")
    import numpy as np
    rng = np.random.default_rng(seed)
    k = max(1, round(frac * len(names)))
    return set(rng.choice(sorted(names), size=k, replace=False).tolist())


def resolve_init(init: str | None, resume: bool) -> Path | None:
    """--init: a bundle folder, or the name of a shipped bundle; checked before any training."""
    if init is None:
        return None
    if resume:
        raise UsageError("--init and --resume both say where training starts",
                         "use --resume to continue a run, --init to start a new one from a bundle")
    from usnet_wsi.model.bundle import load_bundle, shipped_bundle_path
    path = Path(init) if Path(init).exists() else shipped_bundle_path(init)
    load_bundle(path)          # verified now: a bad bundle fails before the data is read
    return path


@click.command()
@click.argument("data", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Folder for the trained bundle (checkpoints go to OUT.checkpoint).")
@click.option("--val", default="monuseg", show_default=True,
              help="Validation images: 'monuseg' (fixed 6-organ split), a fraction (e.g. 0.2, "
                   "fixed by --seed), comma-separated names, or 'none'.")
@click.option("--epochs", default=40, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True),
              help="Stop after this much training time (the LR schedule follows the budget).")
@click.option("--resume", is_flag=True, help="Continue from OUT.checkpoint.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--recipe", type=click.Choice(["default", "paper"]), default="default",
              show_default=True, help="'paper' follows arXiv 1902.00125 as closely as it allows.")
@click.option("--val-every", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--name", default=None, help="Bundle name (default: the OUT folder name).")
@click.option("--init", "init", default=None, metavar="BUNDLE",
              help="Start from a bundle's weights (fine-tuning): a bundle folder, or the name of "
                   "a bundle shipped with usnet-wsi (e.g. usnet-monuseg-v1).")
@click.option("--lr-scale", default=1.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Multiply every learning rate (e.g. 0.3 when fine-tuning with --init).")
@verbosity_options
@guarded
def train(data: tuple[Path, ...], out: Path, val: str, epochs: int, batch_size: int,
          device: str, max_minutes: float | None, resume: bool, seed: int, recipe: str,
          val_every: int, name: str | None, init: str | None, lr_scale: float,
          verbose: int) -> None:
    """Train US-Net (detector + segmenter) and the 48x48 refiner on annotated H&E images.

    DATA folders hold images/ with labels/ (instance maps) and/or annotations/ (ImageScope XML),
    or images with NAME.xml / NAME_label.png beside them.
    """
    import torch
    from usnet_wsi.training.data import discover, load_pair
    from usnet_wsi.training.loop import TrainConfig, train as run
    reporter = make_reporter(verbose)
    init_path = resolve_init(init, resume)
    pairs = [p for folder in data for p in discover(folder)]
    names = [p[0].stem for p in pairs]
    val_names = split_validation(names, val, seed)
    reporter.info(f"{len(pairs)} annotated images; validation: {len(val_names)}")
    loaded = [load_pair(*p) for p in pairs]
    train_set = [a for a in loaded if a.name not in val_names]
    val_set = [a for a in loaded if a.name in val_names]
    if not train_set:
        raise UsageError("no training images left after the validation split", "use a smaller --val")
    cfg = TrainConfig(out=out, recipe=recipe, epochs=epochs, batch_size=batch_size,
                      max_minutes=max_minutes, device=device, seed=seed, resume=resume,
                      val_every=val_every, name=name or out.name, init=init_path,
                      lr_scale=lr_scale)
    info = {"validation_images": sorted(val_names), "train_images": sorted(a.name for a in train_set),
            "command": "usnet-wsi " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "torch_threads": torch.get_num_threads()}
    path = run(cfg, train_set, val_set, reporter, info)
    reporter.info(f"bundle written to {path}")
