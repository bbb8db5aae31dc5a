"""dask worker preload: the oracle model (tests/oracle.py) in place of the real one.

    dask worker ADDRESS --preload dask_oracle        (with tests/ on PYTHONPATH)
    LocalCluster(..., preload=["dask_oracle"])       (tests/ on sys.path, as under pytest)

At worker start (`dask_setup`) it replaces `usnet_wsi.predict.load_predictor` in that worker
with `load`, a loader of the oracle for the 360 x 300 px, 0.5 um/px synthetic slides of
`child.nuclei()`; importing this module elsewhere changes nothing. `loads()` counts the
worker's model loads; `set_delay(s)` (e.g. `client.run(dask_oracle.set_delay, 0.25)`) makes each
model batch sleep s seconds, so that a kill can land mid-slide.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from child import HALO, MPP, TILE, H, W, nuclei  # noqa: E402
from oracle import OraclePredictor  # noqa: E402

_state = {"loads": 0, "delay_s": 0.0}


class DelayedOracle(OraclePredictor):
    """The oracle, each batch `set_delay` seconds late."""

    def predict(self, tiles, meta=None, regions=None):
        time.sleep(_state["delay_s"])
        return super().predict(tiles, meta, regions)


def load(weights=None, device="auto", tile_px=None, precision="auto",
         tta="none") -> DelayedOracle:
    """`load_predictor`'s signature; the oracle whatever is asked for."""
    _state["loads"] += 1
    return DelayedOracle(nuclei(), W, H, MPP, TILE, HALO)


def loads() -> int:
    """How often this worker process loaded the model."""
    return int(_state["loads"])


def set_delay(seconds: float) -> None:
    _state["delay_s"] = float(seconds)


def dask_setup(worker: Any) -> None:
    import usnet_wsi.predict

    usnet_wsi.predict.load_predictor = load
