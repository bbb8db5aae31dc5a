"""ModelSpec: every architectural number of US-Net in one frozen, JSON-serialisable place.

Two recipes ship:
- "paper": follows arXiv 1902.00125 as closely as its text allows ("block size 4" read as a
  first-block width of 4 channels doubling per level; one-channel segmentation; SGD for the U-Net).
- "default": the same architecture family with a 3-class segmentation output (background,
  nucleus interior, nucleus boundary) and wider blocks (8 -> 128 channels). See
  weights/*/MODEL_CARD.md for why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from usnet_wsi.errors import WeightsError

RECIPES = ("default", "paper")


@dataclass(frozen=True)
class ModelSpec:
    recipe: str = "default"
    input_size: int = 300            # model input side in pixels
    mpp: float = 0.25                # microns per pixel the model runs at (40x)
    halo_px: int = 40                # tile halo in model px (>= largest expected nucleus radius x2)
    depth: int = 6                   # down-sampling levels of the U-Net
    base_width: int = 8              # channels of the first block ("block size")
    max_width: int = 128             # channel cap for deep levels
    convs_per_block: int = 2
    seg_classes: int = 3             # 1 = paper (sigmoid foreground); 3 = bg/interior/boundary
    det_levels: tuple[int, ...] = (3, 4, 5)   # U-Net levels read by the detector: 38, 19, 10 px
    anchor_sizes: tuple[float, ...] = (24.0, 48.0, 96.0)  # base side per detector level (px)
    anchor_scales: tuple[float, ...] = (0.8, 1.2)
    anchor_ratios: tuple[float, ...] = (1.0, 0.75)        # height / width
    head_width: int = 64
    refine_size: int = 48            # refinement sub-network input side
    refine_width: int = 16
    refine_context: float = 1.5      # detected box side is scaled by this before cropping
    refine_inputs: str = "rgb+seg"   # "rgb" (paper) or "rgb+seg" (also the segmentation probs)
    rescue_missed: bool = True       # read from older bundles; inference no longer rescues
                                     # segmentation components (it gave no accuracy)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def anchors_per_location(self) -> int:
        return len(self.anchor_scales) * len(self.anchor_ratios)

    @property
    def refine_in_channels(self) -> int:
        return 3 + (self.seg_classes if self.refine_inputs == "rgb+seg" else 0)

    def width(self, level: int) -> int:
        return min(self.base_width * 2 ** level, self.max_width)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        if not isinstance(d, dict):
            raise WeightsError(f"model config 'spec' must be an object, not {type(d).__name__}",
                               "re-export the bundle with `usnet-wsi train`")
        defaults = {f.name: f.default for f in fields(cls) if f.name != "extra"}
        unknown = sorted(set(d) - set(defaults) - {"extra"})
        if unknown:
            raise WeightsError(f"model config has unknown keys {unknown}",
                               "use weights made by this version of usnet-wsi")
        kw = {k: _typed(k, v, defaults[k]) for k, v in d.items() if k != "extra"}
        return cls(**kw, extra=dict(d.get("extra") or {}))


def _typed(key: str, value: Any, default: Any) -> Any:
    """Check one config value against the type of its default (lists for tuples)."""
    if isinstance(default, tuple):
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and
                                             not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default)) and not isinstance(value, bool)
    if not ok:
        raise WeightsError(f"model config {key!r} = {value!r} is not a {type(default).__name__}",
                           "re-export the bundle with `usnet-wsi train`")
    return value


def recipe_spec(recipe: str) -> ModelSpec:
    """The ModelSpec of a named training recipe."""
    if recipe == "paper":
        return ModelSpec(recipe="paper", base_width=4, max_width=128, seg_classes=1,
                         refine_inputs="rgb", rescue_missed=False)
    if recipe == "default":
        return ModelSpec()
    from usnet_wsi.errors import UsageError
    raise UsageError(f"unknown recipe {recipe!r}", f"choose one of {', '.join(RECIPES)}")
