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


def split_validation(names: list[str], val: str | None, seed: int,
                     groups: dict[str, str] | None = None,
                     datasets: dict[str, str] | None = None) -> set[str]:
    """--val: 'monuseg' (the fixed 6-organ split, plus a fifth of every other dataset), a
    fraction like 0.2 (of each dataset), or comma-separated image or source-image names.
    Splits go by source image (`groups`: name -> source): tiles of one image stay together."""
    groups = groups or {}
    datasets = datasets or {}
    source = {n: groups.get(n, n) for n in names}
    if val is None or val == "none":
        return set()
    if val == "monuseg":
        fixed = set(DEFAULT_VAL) & set(names)
        others = [n for n in names if datasets.get(n) not in {datasets.get(f) for f in fixed}]
        return fixed | (_fraction(others, source, datasets, 0.2, seed) if fixed else set())
    try:
        frac = float(val)
    except ValueError:
        chosen = {v.strip() for v in val.split(",") if v.strip()}
        unknown = chosen - set(names) - set(source.values())
        if unknown:
            raise UsageError(f"--val names not in the data: {sorted(unknown)}",
                             "give image (or source image) names without extension, "
                             "comma-separated") from None
        return {n for n in names if n in chosen or source[n] in chosen}
    if not 0 < frac < 1:
        raise UsageError(f"--val {val}: a fraction must be between 0 and 1", "e.g. --val 0.2")
    return _fraction(names, source, datasets, frac, seed)


def _fraction(names: list[str], source: dict[str, str], datasets: dict[str, str], frac: float,
              seed: int) -> set[str]:
    """About `frac` of each dataset's source images (at least one), chosen with `seed`."""
    import numpy as np
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for ds in sorted({datasets.get(n, "") for n in names}):
        srcs = sorted({source[n] for n in names if datasets.get(n, "") == ds})
        if not srcs:
            continue
        k = max(1, round(frac * len(srcs)))
        picked = set(rng.choice(srcs, size=k, replace=False).tolist())
        chosen |= {n for n in names if datasets.get(n, "") == ds and source[n] in picked}
    return chosen


def parse_data(arg: Path) -> tuple[Path, float | None]:
    """DATA or DATA@MPP (microns per pixel of that dataset)."""
    text = str(arg)
    if "@" in text and not Path(text).exists():
        folder, _, mpp = text.rpartition("@")
        try:
            value = float(mpp)
        except ValueError:
            value = float("nan")
        if not 0.05 <= value <= 5:
            raise UsageError(f"{text}: {mpp!r} after @ is not a resolution in 0.05-5 um/px",
                             "write DATA@MPP, e.g. ../monuseg@0.2527")
        return Path(folder), value
    return Path(text), None


def load_datasets(data: list[tuple[Path, float | None]], recipe: str, reporter) -> list:
    """Every annotated image of every DATA folder, tagged with its dataset and source image
    and resampled to the model's resolution when the folder's mpp was given."""
    from usnet_wsi.model.spec import recipe_spec
    from usnet_wsi.training.data import discover, load_pair, rescale, source_groups
    model_mpp = recipe_spec(recipe).mpp
    out = []
    for folder, mpp in data:
        groups = source_groups(folder)
        for image, annotation in discover(folder):
            a = load_pair(image, annotation)
            a.dataset, a.group = folder.name, groups.get(a.name, "")
            out.append(rescale(a, mpp, model_mpp) if mpp else a)
        reporter.info(f"{folder.name}: {sum(a.dataset == folder.name for a in out)} images"
                      + (f" at {mpp} um/px" if mpp else ""))
    return out


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
@click.argument("data", nargs=-1, required=True, type=click.Path(path_type=Path),
                metavar="DATA[@MPP]...")
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
@click.option("--base-width", type=click.IntRange(min=2), default=None,
              help="The U-Net's base width (default: the recipe's, or the --init bundle's). "
                   "Wider than the --init bundle's grows its network without changing what it "
                   "computes, then training goes on: more capacity without starting over.")
@click.option("--lr-scale", default=1.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Multiply every learning rate (e.g. 0.3 when fine-tuning with --init).")
@click.option("--ema", "ema", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0,
              metavar="DECAY",
              help="Validate and save an exponential moving average of the weights with this "
                   "decay per step (e.g. 0.998; 0: off, the weights as trained).")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto",
              show_default=True,
              help="Arithmetic of the training forward and backward passes. auto: bfloat16 "
                   "autocast on CPUs with native bf16 (AVX512-BF16 or AMX; a step takes about "
                   "0.6x the time) and on CUDA GPUs of compute capability 8.0+, else fp32. "
                   "Weights, optimizer state and losses stay fp32.")
@verbosity_options
@guarded
def train(data: tuple[Path, ...], out: Path, val: str, epochs: int, batch_size: int,
          device: str, max_minutes: float | None, resume: bool, seed: int, recipe: str,
          val_every: int, name: str | None, init: str | None, base_width: int | None,
          lr_scale: float, ema: float, precision: str, verbose: int) -> None:
    """Train US-Net (detector + segmenter) and the 48x48 refiner on annotated H&E images.

    DATA folders hold images/ with labels/ (instance maps) and/or annotations/ (ImageScope XML),
    or images with NAME.xml / NAME_label.png beside them. DATA@MPP gives a folder's resolution
    (its images are resampled to the model's 0.25 um/px); without it they are taken as they are.
    Several folders train one model; validation is split by source image (a manifest.json with
    "source_image" per tile groups tiles) and reported per folder.
    """
    import torch
    from usnet_wsi.predict import resolve_device
    from usnet_wsi.training.loop import TrainConfig, train as run
    from usnet_wsi.training.precision import resolve_train_precision
    reporter = make_reporter(verbose)
    arith = resolve_train_precision(precision, resolve_device(device))
    init_path = resolve_init(init, resume)
    loaded = load_datasets([parse_data(d) for d in data], recipe, reporter)
    names = [a.name for a in loaded]
    if len(set(names)) != len(names):
        raise UsageError("two DATA folders hold images of the same name",
                         "rename them: validation and reports go by image name")
    val_names = split_validation(names, val, seed, {a.name: a.source for a in loaded},
                                 {a.name: a.dataset for a in loaded})
    reporter.info(f"{len(loaded)} annotated images; validation: {len(val_names)}")
    train_set = [a for a in loaded if a.name not in val_names]
    val_set = [a for a in loaded if a.name in val_names]
    if not train_set:
        raise UsageError("no training images left after the validation split", "use a smaller --val")
    cfg = TrainConfig(out=out, recipe=recipe, epochs=epochs, batch_size=batch_size,
                      max_minutes=max_minutes, device=device, seed=seed, resume=resume,
                      val_every=val_every, name=name or out.name, init=init_path,
                      lr_scale=lr_scale, base_width=base_width, ema=ema, precision=arith)
    info = {"validation_images": sorted(val_names), "train_images": sorted(a.name for a in train_set),
            "datasets": sorted({a.dataset for a in loaded}),
            "command": "usnet-wsi " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "torch_threads": torch.get_num_threads()}
    path = run(cfg, train_set, val_set, reporter, info)
    reporter.info(f"bundle written to {path}")
