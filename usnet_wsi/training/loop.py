"""The training loop: joint US-Net + refiner optimisation, validation, checkpoints, resume."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from usnet_wsi import losses
from usnet_wsi.anchors import make_anchors
from usnet_wsi.console import Reporter
from usnet_wsi.errors import UsageError
from usnet_wsi.model.bundle import Thresholds, load_bundle, save_bundle
from usnet_wsi.model.grow import widen
from usnet_wsi.model.refine import context_boxes, crop_resize
from usnet_wsi.model.spec import recipe_spec
from usnet_wsi.model.usnet import USNet, USNetOutput
from usnet_wsi.training.batches import Batch, epoch_windows, make_batch, refine_samples
from usnet_wsi.training.data import Annotated
from usnet_wsi.training.ema import WeightAverage
from usnet_wsi.training.precision import autocast
from usnet_wsi.training.validate import validate


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    recipe: str = "default"
    epochs: int = 40
    batch_size: int = 8
    max_minutes: float | None = None
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    val_every: int = 2
    refine_per_image: int = 12
    name: str = "usnet-custom"
    lr_scale: float = 1.0
    init: Path | None = None       # start from this bundle's weights (fine-tuning)
    base_width: int | None = None  # U-Net base width (None: the recipe's or the init bundle's)
    ema: float = 0.0               # decay of the weight average validated and saved (0: off)
    precision: str = "fp32"        # "bf16": forward passes under bf16 autocast (resolved)


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    best_aji: float = -1.0
    elapsed_s: float = 0.0
    history: list[dict] = field(default_factory=list)


@dataclass
class _Run:
    """What one training run works with."""

    cfg: TrainConfig
    model: USNet
    opts: list[torch.optim.Optimizer]
    ema: WeightAverage | None
    anchors: torch.Tensor
    dev: torch.device
    reporter: Reporter

    @property
    def kept(self) -> USNet:
        """The weights that are validated and saved: the average with --ema, else the model."""
        return self.model if self.ema is None else self.ema.model  # type: ignore[return-value]


def make_optimizers(model: USNet, recipe: str, lr_scale: float = 1.0) -> list[torch.optim.Optimizer]:
    """Paper: Adam 1e-3 for the detector, SGD 1e-4 (momentum 0.9, wd 1e-4) for the U-Net.
    Default recipe: Adam 1e-3 for the U-Net too (the paper's SGD 1e-4 barely moves the U-Net
    within a CPU budget of hours). The refiner always uses Adam 1e-3."""
    det = torch.optim.Adam(model.detector_parameters(), lr=1e-3 * lr_scale)
    if recipe == "paper":
        unet = torch.optim.SGD(model.unet_parameters(), lr=1e-4 * lr_scale, momentum=0.9,
                               weight_decay=1e-4)
    else:
        unet = torch.optim.AdamW(model.unet_parameters(), lr=1e-3 * lr_scale, weight_decay=1e-4)
    ref = torch.optim.Adam(model.refiner_parameters(), lr=1e-3 * lr_scale)
    for opt in (det, unet, ref):
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return [det, unet, ref]


def set_lr(opts: list[torch.optim.Optimizer], frac: float) -> None:
    """Cosine decay from the base rate to 5% of it over the run (frac in [0, 1])."""
    f = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))
    for opt in opts:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f


def seg_loss(model: USNet, seg_logits: torch.Tensor, target: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor]:
    """(L_seg (paper eq. 2, L1), extra cross-entropy for the default recipe or 0)."""
    probs = model.seg_probs(seg_logits)
    if model.spec.seg_classes == 1:
        l1 = losses.seg_l1(probs, target[:, None].float())
        return l1, l1 * 0.0
    onehot = F.one_hot(target, model.spec.seg_classes).permute(0, 3, 1, 2).float()
    weights = torch.tensor([1.0, 1.0, 2.0], device=seg_logits.device)[: model.spec.seg_classes]
    return losses.seg_l1(probs, onehot), F.cross_entropy(seg_logits, target, weight=weights)


def refiner_loss(model: USNet, x: torch.Tensor, probs: torch.Tensor, batch: Batch,
                 cfg: TrainConfig, rng: np.random.Generator, dev: torch.device) -> torch.Tensor:
    bidx, boxes, ids = refine_samples(batch, cfg.refine_per_image, rng)
    if len(bidx) == 0:
        return x.sum() * 0.0
    spec = model.spec
    crops = context_boxes(boxes, spec.refine_context, spec.input_size).to(dev)
    inp = torch.cat([x, probs.detach()], 1) if spec.refine_inputs == "rgb+seg" else x
    bidx = bidx.to(dev)
    crop_in = crop_resize(inp, bidx, crops, spec.refine_size)
    inst = (batch.labels.to(dev)[bidx] == ids.to(dev)[:, None, None]).float()[:, None]
    target = (crop_resize(inst, torch.arange(len(bidx), device=dev), crops, spec.refine_size)
              > 0.5).float()
    with autocast(cfg.precision, dev):
        logits = model.refiner(crop_in)
    return losses.refine_loss(logits.float(), target)


def train_step(model: USNet, batch: Batch, anchors: torch.Tensor, opts, cfg: TrainConfig,
               rng: np.random.Generator, dev: torch.device) -> dict[str, float]:
    model.train()
    x = model.normalise(batch.images.to(dev))
    with autocast(cfg.precision, dev):
        out = model(x)
    out = USNetOutput(*(t.float() for t in out))      # the losses in float32
    l_seg, l_ce = seg_loss(model, out.seg_logits, batch.seg.to(dev))
    probs = model.seg_probs(out.seg_logits)
    eta_bg, eta_fg = losses.eta_weights((model.foreground(probs) > 0.5).detach())
    labels = batch.anchor_labels.to(dev)
    l_conf = losses.focal_conf(out.conf_logits, labels, eta_bg, eta_fg)
    l_loc = losses.loc_loss(out.loc, batch.loc_targets.to(dev), labels)
    l_ref = refiner_loss(model, x, probs, batch, cfg, rng, dev)
    total = losses.usnet_loss(l_conf, l_loc, l_seg) + l_ce + l_ref
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    for opt in opts:
        opt.step()
    return {"conf": l_conf.item(), "loc": l_loc.item(), "seg": l_seg.item(),
            "ce": l_ce.item(), "ref": l_ref.item()}


def checkpoint_dir(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint")


def _init(cfg: TrainConfig, dev: torch.device, reporter: Reporter) -> tuple[_Run, TrainState]:
    from usnet_wsi.training.checkpoint import checkpoint_spec, load_checkpoint
    torch.manual_seed(cfg.seed)
    spec = checkpoint_spec(checkpoint_dir(cfg.out)) if cfg.resume else None
    model = (USNet(spec) if spec is not None else initial_model(cfg, reporter)).to(dev)
    opts = make_optimizers(model, cfg.recipe, cfg.lr_scale)
    ema = WeightAverage(model, cfg.ema, warmup=cfg.init is None) if cfg.ema else None
    state = TrainState()
    if cfg.resume:
        state = TrainState(**load_checkpoint(checkpoint_dir(cfg.out), model, opts,
                                             None if ema is None else ema.model))
        reporter.info(f"resumed at epoch {state.epoch} (step {state.step}, "
                      f"best AJI {state.best_aji:.4f})")
    return _Run(cfg, model, opts, ema, make_anchors(model.spec), dev, reporter), state


def initial_model(cfg: TrainConfig, reporter: Reporter) -> USNet:
    """A fresh model of the recipe, or (`cfg.init`) the weights and architecture of a bundle,
    which must have been trained with the same recipe. `cfg.base_width` sets the U-Net's base
    width; a bundle is grown to it without changing what it computes (`model.grow.widen`)."""
    if cfg.init is None:
        spec = recipe_spec(cfg.recipe)
        return USNet(replace(spec, base_width=cfg.base_width or spec.base_width))
    bundle = load_bundle(cfg.init)
    if bundle.spec.recipe != cfg.recipe:
        raise UsageError(f"--init {cfg.init}: the bundle was trained with recipe "
                         f"{bundle.spec.recipe!r}, not {cfg.recipe!r}",
                         f"add --recipe {bundle.spec.recipe}, or train from scratch")
    reporter.info(f"starting from {bundle.name} ({bundle.sha256[:12]})")
    model = bundle.build_model().train()
    if cfg.base_width and cfg.base_width != bundle.spec.base_width:
        model = widen(model, cfg.base_width, cfg.seed)
        reporter.info(f"grown from base width {bundle.spec.base_width} to {cfg.base_width}")
    return model


def init_thresholds(cfg: TrainConfig) -> Thresholds:
    """The thresholds to validate with until they are tuned: the init bundle's, else defaults."""
    return load_bundle(cfg.init).thresholds if cfg.init is not None else Thresholds()


def _run_epoch(run: _Run, data: list[Annotated], state: TrainState, rng: np.random.Generator,
               t_start: float) -> bool:
    """One pass over the shuffled paper windows. Returns False when time ran out."""
    cfg, model = run.cfg, run.model
    wins = epoch_windows(data, rng)
    n_batches = len(wins) // cfg.batch_size
    if n_batches == 0:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {len(wins)} training "
                         "windows of the data (400x400, stride 200)",
                         f"use --batch-size {max(1, len(wins))} or add images")
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    agg: dict[str, float] = {}
    with run.reporter.task(f"epoch {state.epoch + 1}/{cfg.epochs}", n_batches) as task:
        for b in range(n_batches):
            elapsed = state.elapsed_s + time.monotonic() - t_start
            frac = (state.epoch + b / n_batches) / cfg.epochs
            if budget:
                frac = max(frac, elapsed / budget)
                if elapsed > budget:
                    return False
            set_lr(run.opts, frac)
            batch = make_batch(data, wins[b * cfg.batch_size:(b + 1) * cfg.batch_size],
                               model.spec, run.anchors, rng)
            parts = train_step(model, batch, run.anchors, run.opts, cfg, rng, run.dev)
            if run.ema is not None:
                run.ema.update(model, state.step)
            state.step += 1
            for k, v in parts.items():
                agg[k] = agg.get(k, 0.0) + v / n_batches
            task.advance(1, **{k: f"{v:.3f}" for k, v in parts.items()})
    state.history.append({"epoch": state.epoch + 1, **{k: round(v, 5) for k, v in agg.items()}})
    return True


def train(cfg: TrainConfig, data: list[Annotated], val: list[Annotated], reporter: Reporter,
          card_info: dict | None = None) -> Path:
    """Train, validate every `val_every` epochs, keep the best bundle in cfg.out, tune thresholds."""
    from usnet_wsi.predict import resolve_device
    from usnet_wsi.training.checkpoint import save_checkpoint
    dev = resolve_device(cfg.device)
    run, state = _init(cfg, dev, reporter)
    model = run.kept
    rng = np.random.default_rng([cfg.seed, state.step])
    t_start = time.monotonic()
    thr = init_thresholds(cfg)
    tile_px = _inherited(cfg).get("inference_tile_px")   # validate as `segment` will run it
    while state.epoch < cfg.epochs:
        finished = _run_epoch(run, data, state, rng, t_start)
        if finished:
            state.epoch += 1
        last = not finished or state.epoch >= cfg.epochs
        if val and (state.epoch % cfg.val_every == 0 or last):
            m = validate(model, val, thr, dev, model.spec.mpp, tile_px)
            if not finished:   # time ran out part-way: record the partial epoch
                state.history.append({"epoch": state.epoch + 1, "partial": True})
            state.history[-1].update({f"val_{k}": round(v, 4) for k, v in m.items()})
            reporter.info(f"epoch {state.epoch}: " + " ".join(f"{k} {v:.4f}" for k, v in m.items()))
            if m["aji"] > state.best_aji:
                state.best_aji = m["aji"]
                _save(cfg, model, thr, state, m, card_info)
        elif not val:
            _save(cfg, model, thr, state, {}, card_info)
        state.elapsed_s += time.monotonic() - t_start
        t_start = time.monotonic()
        save_checkpoint(checkpoint_dir(cfg.out), run.model, run.opts, state,
                        None if run.ema is None else run.ema.model)
        if not finished:
            reporter.info(f"time budget of {cfg.max_minutes} min reached at epoch {state.epoch}")
            break
    return finalize(cfg, val, dev, state, reporter, card_info)


def _save(cfg, model, thr, state, metrics, card_info) -> None:
    from usnet_wsi.training.card import model_card
    train_cfg = {**asdict(cfg), "out": str(cfg.out),
                 "init": None if cfg.init is None else str(cfg.init)}
    extra = {"validation_metrics": metrics, "train": train_cfg, "history": state.history,
             **_inherited(cfg), **(card_info or {})}
    card = model_card(cfg.name, model.spec, thr, metrics, state, cfg,
                      {**(card_info or {}), **_inherited(cfg)}, next(model.parameters()).device)
    save_bundle(cfg.out, cfg.name, model, model.spec, thr, card, extra)


def _inherited(cfg: TrainConfig) -> dict:
    """Inference settings a fine-tuned bundle keeps from the bundle it started from."""
    if cfg.init is None:
        return {}
    init = load_bundle(cfg.init)
    keep = {k: init.config[k] for k in ("inference_tile_px",) if k in init.config}
    return {**keep, "init_bundle": {"name": init.name, "sha256": init.sha256}}


def finalize(cfg: TrainConfig, val: list[Annotated], dev, state: TrainState, reporter: Reporter,
             card_info: dict | None) -> Path:
    """Reload the best bundle, tune thresholds on validation, write the final bundle."""
    from usnet_wsi.training.validate import tune_thresholds
    if not val:
        return cfg.out
    bundle = load_bundle(cfg.out)
    model = bundle.build_model().to(dev)
    reporter.info("tuning score / NMS thresholds on validation AJI")
    thr, m = tune_thresholds(model, val, bundle.thresholds, dev, reporter.info,
                             bundle.config.get("inference_tile_px"))
    _save(cfg, model, thr, state, m, card_info)
    reporter.info("best: " + " ".join(f"{k} {v:.4f}" for k, v in m.items()))
    return cfg.out
