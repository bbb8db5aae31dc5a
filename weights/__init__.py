"""Default model bundles shipped with usnet-wsi (one folder per bundle)."""
