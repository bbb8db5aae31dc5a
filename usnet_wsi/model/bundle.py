"""Weights bundles: a folder with model.safetensors, config.json, thresholds.json, MODEL_CARD.md.

Loading never unpickles: weights are read with safetensors only, their SHA-256 is checked against
config.json, and a pickle or PyTorch checkpoint is refused with an explanation.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from usnet_wsi.errors import WeightsError
from usnet_wsi.model.spec import ModelSpec

FORMAT = "usnet-wsi-bundle"
FORMAT_VERSION = 1
DEFAULT_BUNDLE = "usnet-v2-w10"
_FILES = ("model.safetensors", "config.json", "thresholds.json")


@dataclass(frozen=True)
class Thresholds:
    score: float = 0.35          # detection probability to keep a box
    nms: float = 0.4             # box IoU above which the lower-scored box is suppressed
    top_k: int = 1000            # candidate boxes per tile before NMS
    min_area_px: int = 12        # smallest nucleus kept (model px)
    rescue_prob: float = 0.5     # unused since inference stopped rescuing segmentation
    rescue_min_area_px: int = 40  # components; kept so that existing bundles load
    keep_fraction: float = 0.5   # a mask losing more than this to higher-scored ones is dropped
    max_edge_fraction: float = 0.3  # a mask covering more of its crop border is a cut-off piece
    quality_weight: float = 0.0  # w: ranking score = detection^(1-w) * mask quality^w (0: off)
    final_score: float = 0.0     # nuclei whose ranking score is below this are dropped
    mask_threshold: float = 0.5  # refiner probability above which a pixel is in the nucleus
    seg_agreement: float = 0.0   # masks whose mean segmentation foreground probability is
                                 # below this are dropped (0: off)

    def __post_init__(self) -> None:
        for key in ("score", "nms", "rescue_prob", "keep_fraction", "max_edge_fraction",
                    "quality_weight", "final_score", "mask_threshold", "seg_agreement"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise WeightsError(f"threshold {key} = {v!r} must be a number in [0, 1]",
                                   "fix thresholds.json or re-export the bundle")
        for key, low in (("top_k", 1), ("min_area_px", 0), ("rescue_min_area_px", 0)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise WeightsError(f"threshold {key} = {v!r} must be an integer >= {low}",
                                   "fix thresholds.json or re-export the bundle")


@dataclass
class Bundle:
    name: str
    path: Path
    spec: ModelSpec
    thresholds: Thresholds
    state: dict[str, torch.Tensor]
    sha256: str
    config: dict[str, Any] = field(default_factory=dict)

    def build_model(self) -> "torch.nn.Module":
        from usnet_wsi.model.usnet import USNet
        model = USNet(self.spec)
        try:
            model.load_state_dict(self.state, strict=True)
        except RuntimeError as err:
            raise WeightsError(f"weights in {self.path} do not fit their config.json: "
                               f"{str(err).splitlines()[0]}", "re-export the bundle") from None
        return model.eval()


def default_bundle_path() -> Path:
    return Path(str(resources.files("usnet_wsi.weights") / DEFAULT_BUNDLE))


def shipped_bundle_path(name: str) -> Path:
    """The folder of a bundle shipped with usnet-wsi, by name; WeightsError naming the shipped
    bundles when there is none of that name."""
    root = Path(str(resources.files("usnet_wsi.weights")))
    path = root / name
    if not name or "/" in name or not (path / "config.json").is_file():
        shipped = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())
        raise WeightsError(f"no bundle folder or shipped bundle named {name!r}",
                           f"give a bundle folder, or one of: {', '.join(shipped)}")
    return path


def bundle_location(path: str | Path | None) -> Path:
    """Where a bundle is: the shipped default for None, a path that exists as given, else the
    shipped bundle of that name (e.g. `--weights usnet-monuseg-v1`)."""
    if path is None:
        return default_bundle_path()
    given = Path(path)
    if given.exists() or os.sep in str(path) or str(path).startswith("."):
        return given
    try:
        return shipped_bundle_path(str(path))
    except WeightsError:
        return given          # reported as "weights not found" by load_bundle


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _bundle_dir(path: Path) -> Path:
    if not path.exists():
        raise WeightsError(f"weights not found: {path}",
                           "give a bundle folder (with model.safetensors and config.json)")
    if path.is_file():
        _refuse_pickle(path)
        if path.name not in _FILES:
            raise WeightsError(f"{path} is not a usnet-wsi weights bundle",
                               "give the bundle folder or its model.safetensors")
        path = path.parent
    missing = [f for f in _FILES if not (path / f).is_file()]
    if missing:
        raise WeightsError(f"{path} is not a complete weights bundle (missing {', '.join(missing)})",
                           "give a folder written by `usnet-wsi train`")
    return path


def _looks_pickled(head: bytes) -> bool:
    """Binary pickles start with PROTO (0x80), torch.save zips with PK; text pickles (protocol
    0/1) start with an opcode such as '(', 'c' (GLOBAL) or ']' and end with '.'."""
    return head[:1] == b"\x80" or head[:2] == b"PK" or head[:1] in (b"(", b"c", b"]", b"}")


def _is_safetensors(head: bytes, size: int) -> bool:
    """safetensors: 8-byte little-endian header length, then a JSON object."""
    n = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(9)
    if not _is_safetensors(head, path.stat().st_size) and _looks_pickled(head):
        raise WeightsError(f"{path} is a pickle / PyTorch checkpoint; usnet-wsi never unpickles "
                           "files (unpickling can run arbitrary code)",
                           "convert it to a bundle with safetensors, or use `usnet-wsi train`")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{path} is not valid JSON ({err})", "restore the bundle file") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} must hold a JSON object", "restore the bundle file")
    return data


def _check_config(config: dict[str, Any], path: Path) -> None:
    if config.get("format") != FORMAT:
        raise WeightsError(f"{path} is not a usnet-wsi bundle config (format "
                           f"{config.get('format')!r})", "give a folder written by usnet-wsi")
    if config.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"{path}: bundle format version {config.get('format_version')!r} is "
                           f"not supported (this usnet-wsi reads version {FORMAT_VERSION})",
                           "use a usnet-wsi release that matches the bundle, or retrain")
    for key in ("spec", "weights_sha256", "name"):
        if key not in config:
            raise WeightsError(f"{path} lacks {key!r}", "re-export the bundle")
    tile = config.get("inference_tile_px")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 64):
        raise WeightsError(f"{path}: inference_tile_px = {tile!r} must be an integer >= 64",
                           "fix config.json or re-export the bundle")


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    _refuse_pickle(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path} is not a readable safetensors file ({err})",
                           "restore the bundle from the release or retrain") from None
    # bundles may store floating tensors in half precision; the model computes in float32
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_bundle(path: str | Path | None = None) -> Bundle:
    """Load and verify a bundle folder, or a shipped bundle by name (the shipped default when
    path is None)."""
    folder = _bundle_dir(bundle_location(path))
    config = _read_json(folder / "config.json")
    _check_config(config, folder / "config.json")
    weights = folder / "model.safetensors"
    digest = sha256_file(weights)
    if digest != config["weights_sha256"]:
        raise WeightsError(f"{weights} is corrupt: SHA-256 {digest[:12]}... does not match "
                           f"config.json ({str(config['weights_sha256'])[:12]}...)",
                           "restore the bundle from the release or retrain")
    spec = ModelSpec.from_dict(config["spec"])
    thr = _read_json(folder / "thresholds.json")
    _refuse_pickle(weights)
    unknown = sorted(set(thr) - {f.name for f in fields(Thresholds)}) if isinstance(thr, dict) \
        else []
    if unknown:
        raise WeightsError(f"{folder / 'thresholds.json'} has thresholds this version of "
                           f"usnet-wsi does not know: {', '.join(unknown)}",
                           "upgrade usnet-wsi (the bundle was made by a newer one), or remove "
                           "them from thresholds.json")
    try:
        thresholds = Thresholds(**thr)
    except TypeError as err:
        raise WeightsError(f"{folder / 'thresholds.json'}: {err}", "re-export the bundle") from None
    return Bundle(str(config["name"]), folder, spec, thresholds, _read_state(weights), digest,
                  config)


def save_bundle(folder: Path, name: str, model: torch.nn.Module, spec: ModelSpec,
                thresholds: Thresholds, card: str, extra: dict[str, Any] | None = None,
                dtype: torch.dtype = torch.float32) -> Path:
    """Write a bundle atomically (temporary folder beside `folder`, then rename). `dtype`
    float16 halves the file (the shipped bundle); loading always computes in float32."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name,
              "storage_dtype": str(dtype).replace("torch.", ""),
              "spec": spec.to_dict(), "weights_sha256": sha256_file(tmp / "model.safetensors"),
              **(extra or {})}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (tmp / "thresholds.json").write_text(json.dumps(asdict(thresholds), indent=2) + "\n")
    (tmp / "MODEL_CARD.md").write_text(card)
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        os.replace(folder, old)
        os.replace(tmp, folder)
        import shutil
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder
