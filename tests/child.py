"""`usnet-wsi segment` in a child process with the oracle as the model, for kill and signal tests.

    python child.py MODE segment SLIDE -o OUT ...

MODE: "plain"; "slow" (each model batch takes 0.5 s longer); "slowish" (each model batch takes
0.15 s longer, and writing the overview, the last output, 0.5 s longer; when USNET_TEST_MARK
names a file, it is created as the overview starts); "die-in-swap" (the process dies,
as with kill -9, right after the new zarr is renamed into place); "empty" (a model that finds
nothing, for any slide). Slides must otherwise be the 360 x 300 px, 0.5 um/px slides of
`nuclei()` below. With USNET_TEST_LIMIT_GB set, the address space is limited to that (GiB).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from oracle import OraclePredictor  # noqa: E402
from synth import grid_nuclei  # noqa: E402

W, H, MPP, TILE, HALO = 360, 300, 0.5, 100, 16


def nuclei():
    return grid_nuclei(W, H, spacing=50, radius=8, core_l0=TILE - 2 * HALO, edges=False)


class Slow(OraclePredictor):
    delay = 0.5

    def predict(self, tiles, meta=None, regions=None):
        time.sleep(self.delay)
        return super().predict(tiles, meta, regions)


class Slowish(Slow):
    delay = 0.15


def slow_overview() -> None:
    import usnet_wsi.pipeline

    real = usnet_wsi.pipeline.write_overview

    def write_overview(*args, **kwargs):
        mark = os.environ.get("USNET_TEST_MARK")
        if mark:
            Path(mark).touch()
        time.sleep(0.5)
        return real(*args, **kwargs)

    usnet_wsi.pipeline.write_overview = write_overview


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if os.environ.get("USNET_TEST_LIMIT_GB"):
        import resource

        limit = int(float(os.environ["USNET_TEST_LIMIT_GB"]) * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cls = {"slow": Slow, "slowish": Slowish}.get(mode, OraclePredictor)
    found = [] if mode == "empty" else nuclei()
    import usnet_wsi.predict

    usnet_wsi.predict.load_predictor = lambda weights=None, device="auto", *rest: cls(
        found, W, H, MPP, TILE, HALO, check_pixels=mode != "empty")
    if mode == "slowish":
        slow_overview()
    if mode == "die-in-swap":
        real = os.replace

        def replace(src, dst):
            real(src, dst)
            if str(dst).endswith(".zarr") and ".usnet-tmp-" in str(src) \
                    and ".usnet-tmp-" not in str(dst):
                os._exit(9)

        os.replace = replace
    from usnet_wsi.cli import main as cli

    cli(args, prog_name="usnet-wsi")


if __name__ == "__main__":
    main()
