"""Shared pytest fixtures: synthetic slides (see tests/synth.py) and a recording reporter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(_TESTS))  # `from synth import make_slide`
if str(_TESTS.parent) not in sys.path:   # the package, when not pip-installed
    sys.path.insert(1, str(_TESTS.parent))

from synth import SynthSlide, grid_nuclei, make_slide  # noqa: E402

from usnet_wsi.console import Reporter  # noqa: E402


class RecordingReporter(Reporter):
    """A quiet Reporter that keeps its messages (`.warnings`, `.infos`) for assertions."""

    def __init__(self) -> None:
        super().__init__(verbosity=0, style="none")
        self.warnings: list[str] = []
        self.infos: list[str] = []

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def info(self, msg: str) -> None:
        self.infos.append(msg)

    def debug(self, msg: str) -> None:
        self.infos.append(msg)


@pytest.fixture
def reporter() -> RecordingReporter:
    return RecordingReporter()


@pytest.fixture(scope="session")
def synth_svs(tmp_path_factory: pytest.TempPathFactory) -> SynthSlide:
    """1024 x 768 Aperio-style SVS at 0.25 um/px, levels (1, 4), grid nuclei, 256-px tiles.

    Shared by the session: do not modify the file.
    """
    path = tmp_path_factory.mktemp("synth") / "grid.svs"
    nuclei = grid_nuclei(1024, 768, spacing=64, radius=9, core_l0=200)
    return make_slide(path, 1024, 768, mpp=0.25, kind="svs", nuclei=nuclei, levels=(1, 4))


@pytest.fixture
def slide_factory(tmp_path: Path):
    """make(name, width, height, **make_slide kwargs) -> SynthSlide written under tmp_path."""

    def make(name: str = "s.svs", width: int = 512, height: int = 512, **kw) -> SynthSlide:
        return make_slide(tmp_path / name, width, height, **kw)

    return make
