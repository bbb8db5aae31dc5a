"""Deployable exports of a weights bundle: TorchScript (one file) or ONNX (two files).

An export runs US-Net without usnet-wsi (a C++/JS/ONNX Runtime service, for instance). It holds
two entry points:

- ``forward(images)``: ``images`` uint8 (B, S, S, 3) RGB tiles, S = the model input side (300)
  at the bundle's microns per pixel; normalisation happens inside. Returns, in this order:
  ``seg_probs`` (B, C, S, S) segmentation probabilities (C = 1: nucleus; C = 3: background,
  interior, boundary), ``det_probs`` (B, A) detection probabilities of the A anchors (7620),
  ``boxes_xyxy`` (B, A, 4) the anchors' decoded boxes in model pixels, clipped to [0, S], and
  ``refine_input`` (B, R, S, S) the normalised image (plus ``seg_probs`` in the default
  recipe) from which refiner crops are cut.
- ``refine(crops)``: (N, R, 48, 48) crops -> ``mask_logits`` (N, 1, 48, 48).

TorchScript: ``torch.jit.load(FILE)`` gives a module with both methods; the metadata below is
the extra file ``usnet_wsi.json``. ONNX: ``FILE`` holds ``forward`` (input ``images``) and
``NAME.refine.onnx`` beside it holds ``refine`` (input ``crops``): two graphs because their
batch axes count different things (tiles, detections). Each carries the metadata as the
``usnet_wsi`` entry of its ``metadata_props``. Batch axes are dynamic.

Post-processing stays outside the graphs, as in ``usnet_wsi.instances``: keep boxes with
``det_probs >= thresholds.score``, top-k (equal scores in anchor order), greedy NMS in that
order; grow each box by ``refine_context`` (``context_boxes``), resample that crop of
``refine_input`` to 48x48 (``crop_resize``), run ``refine``, resize the logits onto the crop
and keep ``> 0`` (``paste_mask``); drop masks whose mean foreground probability
(``1 - seg_probs[:, 0]``, or ``seg_probs[:, 0]`` with one class) is below
``thresholds.seg_agreement``; paint them best score first.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from usnet_wsi import __version__
from usnet_wsi.anchors import decode, make_anchors
from usnet_wsi.errors import OutputError, UsageError
from usnet_wsi.model.bundle import Bundle
from usnet_wsi.model.usnet import USNet

FORMATS = ("onnx", "torchscript")
OUTPUTS = ("seg_probs", "det_probs", "boxes_xyxy", "refine_input")
ONNX_OPSET = 18
ONNX_REQUIREMENT = '"onnx>=1.17" "onnxscript>=0.7" onnxruntime'   # onnxruntime: for --check
ONNX_INSTALL = f'pip install "usnet-wsi[export]"  (or: pip install {ONNX_REQUIREMENT})'
METADATA_KEY = "usnet_wsi"


class DeployModule(nn.Module):
    """US-Net with normalisation, probabilities and box decoding inside (anchors as a buffer)."""

    def __init__(self, model: USNet) -> None:
        super().__init__()
        self.model = model.eval()
        self.register_buffer("anchors", make_anchors(model.spec))
        self.size = float(model.spec.input_size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """uint8 (B, S, S, 3) -> (seg_probs, det_probs, boxes_xyxy, refine_input)."""
        x = self.model.normalise(images)
        out = self.model(x)
        probs = self.model.seg_probs(out.seg_logits)
        boxes = decode(out.loc, self.anchors[None]).clamp(0.0, self.size)
        refine_in = torch.cat([x, probs], dim=1) if self.model.spec.refine_inputs == "rgb+seg" \
            else x
        return probs, torch.sigmoid(out.conf_logits), boxes, refine_in

    def refine(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, R, 48, 48) crops of refine_input -> (N, 1, 48, 48) mask logits."""
        return self.model.refiner(crops)


class _RefineOnly(nn.Module):
    """The refiner as the forward of its own graph (ONNX has one entry point per file)."""

    def __init__(self, deploy: DeployModule) -> None:
        super().__init__()
        self.deploy = deploy

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.deploy.refine(crops)


def refine_path(out: Path) -> Path:
    """Where the ONNX refiner goes: NAME.onnx -> NAME.refine.onnx beside it."""
    out = Path(out)
    stem = out.stem if out.suffix.lower() == ".onnx" else out.name
    return out.with_name(f"{stem}.refine.onnx")


def output_paths(fmt: str, out: Path) -> list[Path]:
    """The files an export of format `fmt` to `out` writes."""
    check_format(fmt)
    return [Path(out), refine_path(out)] if fmt == "onnx" else [Path(out)]


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not an export format", "use onnx or torchscript")


def require_onnx() -> None:
    """UsageError naming the pip command when the ONNX exporter's packages are missing."""
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UsageError(f"ONNX export needs the Python package(s) {', '.join(missing)}, "
                         "which are not installed", ONNX_INSTALL)


def deploy_metadata(bundle: Bundle) -> dict[str, Any]:
    """What a deployment needs besides the graphs: resolution, thresholds, I/O conventions."""
    spec = bundle.spec
    return {
        "usnet_wsi_version": __version__, "bundle": bundle.name, "weights_sha256": bundle.sha256,
        "input": "images: uint8 (B, S, S, 3) RGB", "input_size": spec.input_size,
        "mpp": spec.mpp, "halo_px": spec.halo_px, "recipe": spec.recipe,
        "seg_classes": spec.seg_classes, "anchors": int(make_anchors(spec).shape[0]),
        "outputs": list(OUTPUTS), "refine_input": "crops: float32 (N, R, 48, 48)",
        "refine_output": "mask_logits (N, 1, 48, 48); mask = resized logits > 0",
        "refine_size": spec.refine_size, "refine_context": spec.refine_context,
        "refine_channels": spec.refine_in_channels, "thresholds": asdict(bundle.thresholds),
    }


def example_images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Random uint8 tiles (B, size, size, 3) for tracing and checks."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))


def example_crops(spec_channels: int, size: int, n: int = 3, seed: int = 0) -> torch.Tensor:
    """Random normalised-looking refiner crops (N, R, size, size)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, spec_channels, size, size), generator=g)


def export_bundle(bundle: Bundle, fmt: str, out: Path) -> list[Path]:
    """Write the export of `bundle` in format `fmt` to `out` (atomically); returns the paths."""
    from usnet_wsi.writers.atomic import atomic_path
    check_format(fmt)
    if fmt == "onnx":
        require_onnx()
    paths = output_paths(fmt, out)
    for p in paths:
        if p.is_dir():
            raise UsageError(f"-o {p} is a folder", "give a file name, e.g. -o usnet.onnx")
    deploy = DeployModule(bundle.build_model().cpu().float()).eval()
    meta = deploy_metadata(bundle)
    with ExitStack() as stack:
        temps = [stack.enter_context(atomic_path(p)) for p in paths]
        if fmt == "torchscript":
            _write_torchscript(deploy, temps[0], meta)
        else:
            _write_onnx(deploy, temps[0], temps[1], meta)
    return paths


def _write_torchscript(deploy: DeployModule, path: Path, meta: dict[str, Any]) -> None:
    spec = deploy.model.spec
    inputs = {"forward": (example_images(spec.input_size),),
              "refine": (example_crops(spec.refine_in_channels, spec.refine_size),)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(deploy, inputs)
        torch.jit.save(traced, str(path), _extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})


def _write_onnx(deploy: DeployModule, main: Path, refine: Path, meta: dict[str, Any]) -> None:
    spec = deploy.model.spec
    batch = torch.export.Dim("batch", min=1, max=4096)
    _onnx_graph(deploy, (example_images(spec.input_size),), main, ["images"], list(OUTPUTS),
                {"images": {0: batch}}, meta)
    _onnx_graph(_RefineOnly(deploy).eval(), (example_crops(spec.refine_in_channels,
                                                           spec.refine_size),),
                refine, ["crops"], ["mask_logits"], {"crops": {0: batch}}, meta)


def _onnx_graph(module: nn.Module, args: tuple, path: Path, inputs: list[str],
                outputs: list[str], dynamic: dict, meta: dict[str, Any]) -> None:
    """One self-contained ONNX file (weights inside) with the metadata attached."""
    import onnx
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(module, args, dynamo=True, input_names=inputs,
                                        output_names=outputs, dynamic_shapes=dynamic,
                                        opset_version=ONNX_OPSET, verbose=False)
    except Exception as err:  # noqa: BLE001 - exporter failures have many types
        raise OutputError(f"ONNX export failed: {type(err).__name__}: {str(err)[:300]}",
                          "use --format torchscript, or report the failure") from None
    proto = program.model_proto
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
    onnx.save_model(proto, str(path))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints, warnings and log lines (library code never
    prints; failures still raise)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _load_torchscript(path: Path, extra_files: dict[str, str] | None = None
                      ) -> torch.jit.ScriptModule:
    """torch.jit.load without its deprecation warning (TorchScript is what was asked for)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files or {})


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of an export written by `export_bundle` (either format)."""
    path = Path(path)
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"
    if is_zip:
        files = {f"{METADATA_KEY}.json": ""}
        _load_torchscript(path, files)
        return json.loads(files[f"{METADATA_KEY}.json"])
    import onnx
    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    return json.loads(props[METADATA_KEY])


def reference_outputs(bundle: Bundle, images: torch.Tensor, crops: torch.Tensor
                      ) -> tuple[list[np.ndarray], np.ndarray]:
    """The PyTorch model's outputs for `images` and refiner `crops` (float32 numpy)."""
    deploy = DeployModule(bundle.build_model().cpu().float()).eval()
    with torch.no_grad():
        outs = [o.numpy() for o in deploy(images)]
        return outs, deploy.refine(crops).numpy()


def run_export(fmt: str, paths: list[Path]) -> Callable[[torch.Tensor, torch.Tensor], tuple[
        list[np.ndarray], np.ndarray]]:
    """A function running an export on (images, crops), or UsageError when it cannot run here
    (ONNX needs onnxruntime)."""
    if fmt == "torchscript":
        module = _load_torchscript(paths[0])

        def run_ts(images: torch.Tensor, crops: torch.Tensor):
            with torch.no_grad():
                return [o.numpy() for o in module(images)], module.refine(crops).numpy()
        return run_ts
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError("checking ONNX numerics needs onnxruntime",
                         "pip install onnxruntime") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    main, ref = (ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                 for p in paths)

    def run_onnx(images: torch.Tensor, crops: torch.Tensor):
        outs = main.run(list(OUTPUTS), {"images": images.numpy()})
        return outs, ref.run(["mask_logits"], {"crops": crops.numpy()})[0]
    return run_onnx


def check_export(bundle: Bundle, fmt: str, paths: list[Path], batch: int = 3
                 ) -> dict[str, float]:
    """Largest absolute difference per output between the export and the PyTorch model.

    For ONNX without onnxruntime the graphs are only validated (onnx.checker) and {} is
    returned."""
    spec = bundle.spec
    if fmt == "onnx":
        import onnx
        for p in paths:
            onnx.checker.check_model(str(p), full_check=True)
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return {}
    images = example_images(spec.input_size, batch, seed=1)
    crops = example_crops(spec.refine_in_channels, spec.refine_size, n=batch + 2, seed=1)
    ref, ref_mask = reference_outputs(bundle, images, crops)
    got, got_mask = run_export(fmt, paths)(images, crops)
    diffs = {name: float(np.abs(np.asarray(g) - r).max()) for name, g, r in zip(OUTPUTS, got, ref)}
    diffs["mask_logits"] = float(np.abs(np.asarray(got_mask) - ref_mask).max())
    return diffs
