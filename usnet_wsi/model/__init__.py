"""US-Net: a U-Net backbone with an SSD-style detection head and a 48x48 refinement net."""

from usnet_wsi.model.spec import ModelSpec, recipe_spec
from usnet_wsi.model.usnet import USNet, USNetOutput

__all__ = ["ModelSpec", "USNet", "USNetOutput", "recipe_spec"]
