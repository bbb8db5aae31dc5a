"""The per-slide unit of `segment`: one slide through `pipeline.segment_slide` with the error
policy of a multi-slide run (a failing slide becomes a "failed" row and the others go on; a
model that cannot be loaded stops the run).

The local loop and the cluster executor (`usnet_wsi.cluster`) both call `run_one`, so a slide
gives the same outputs and the same summary row wherever it runs.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from usnet_wsi.config import SegmentConfig
from usnet_wsi.console import Reporter
from usnet_wsi.errors import UsnetError, explain

if TYPE_CHECKING:  # pragma: no cover - pipeline pulls in openslide and zarr, predict torch
    from usnet_wsi.pipeline import SlideResult
    from usnet_wsi.predict import Predictor

ModelLoader = Callable[[SegmentConfig, Reporter], "Predictor"]


@dataclass(frozen=True)
class PlannedSlide:
    """A slide of the run: its path as given, its output name, and why it is refused before
    it runs (e.g. another slide of the run would write the same output names), if it is."""

    path: str
    name: str
    refused: UsnetError | None = None


def load_model(cfg: SegmentConfig, reporter: Reporter, where: str = "") -> "Predictor":
    """The model `cfg` asks for (`usnet_wsi.predict.load_predictor`, looked up at call time),
    announced with its name, device, precision and tile size (`where`: appended to that line)."""
    from usnet_wsi import predict  # lazy: imports torch

    p = predict.load_predictor(cfg.weights, cfg.device, cfg.tile_px, cfg.precision, cfg.tta)
    precision = getattr(p, "precision", "fp32")
    tta = "" if cfg.tta == "none" else f", test-time {cfg.tta}"
    reporter.info(f"model {p.name} ({p.sha256[:12]}) on {p.device}, {precision}, "
                  f"{p.tile_px} px tiles{tta}{where}")
    return p


class LazyPredictor:
    """Loads the model on first use (skipped and unreadable slides never pay for it).

    A failure to load is fatal for the whole run: it is kept in `error` and re-raised.
    """

    def __init__(self, cfg: SegmentConfig, reporter: Reporter,
                 load: ModelLoader = load_model) -> None:
        self.cfg, self.reporter, self.load = cfg, reporter, load
        self.predictor: Any = None
        self.error: BaseException | None = None

    def __call__(self) -> Any:
        if self.error is not None:
            raise self.error
        if self.predictor is None:
            try:
                self.predictor = self.load(self.cfg, self.reporter)
            except BaseException as err:
                self.error = err
                raise
        return self.predictor


def failed_result(path: str, name: str, err: BaseException, reporter: Reporter,
                  verbose: int) -> "SlideResult":
    """Report `err` (with the traceback at -v) and return the slide's "failed" row."""
    from usnet_wsi.pipeline import SlideResult

    message, hint, code = explain(err)
    reporter.error(message, hint, "".join(traceback.format_exception(err)) if verbose >= 2 else "")
    if not isinstance(err, UsnetError):
        message = f"{type(err).__name__}: {err}"
    return SlideResult(path, name, "failed", message=message, exit_code=code)


def run_one(path: str, cfg: SegmentConfig, model: LazyPredictor, reporter: Reporter,
            verbose: int, check: Callable[[], None] | None = None) -> "SlideResult":
    """Segment one slide into cfg.out_dir and return its summary row. Any error of the slide
    (after `check`, which may refuse it) is reported and returned as a "failed" row; an error
    loading the model is re-raised."""
    from usnet_wsi.pipeline import segment_slide
    from usnet_wsi.slide import slide_name

    try:
        if check is not None:
            check()
        return segment_slide(path, cfg, model, reporter)
    except Exception as err:  # noqa: BLE001 - one failing slide does not stop the rest
        if err is model.error:
            raise
        return failed_result(path, slide_name(path), err, reporter, verbose)

