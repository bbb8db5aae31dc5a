"""`usnet-wsi export`: TorchScript and ONNX exports reproduce the PyTorch pipeline numerically."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from usnet_wsi.anchors import decode, make_anchors
from usnet_wsi.cli import main
from usnet_wsi.decode import detect_boxes, nms
from usnet_wsi.errors import OutputError, UsageError
from usnet_wsi.export import (OUTPUTS, example_images, export_bundle, read_metadata, refine_path,
                              require_onnx)
from usnet_wsi.model.bundle import Bundle, Thresholds, load_bundle, save_bundle
from usnet_wsi.model.refine import context_boxes, crop_resize
from usnet_wsi.model.spec import ModelSpec
from usnet_wsi.model.usnet import USNet

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")

TINY = dict(base_width=2, max_width=8, head_width=8, refine_width=4)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A tiny random-weight default-recipe bundle (3-class seg, rgb+seg refiner input)."""
    torch.manual_seed(3)
    spec = ModelSpec(**TINY)
    model = USNet(spec)
    folder = save_bundle(tmp_path_factory.mktemp("bundle") / "tiny", "tiny", model, spec,
                         Thresholds(), "card")
    return load_bundle(folder)


def reference(bundle: Bundle, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the usnet-wsi pipeline computes for `images`, from the bundle's own model."""
    model = bundle.build_model()
    with torch.no_grad():
        x = model.normalise(images)
        out = model(x)
        probs = model.seg_probs(out.seg_logits)
    return {"model": model, "x": x, "out": out, "probs": probs,
            "refine_input": torch.cat([x, probs], dim=1)}


def post_process(det_probs: torch.Tensor, boxes: torch.Tensor, thr: float, top_k: int,
                 iou: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented recipe for exported outputs: threshold, top-k (equal scores in anchor
    order), drop thin boxes, NMS."""
    cand = torch.nonzero(det_probs >= thr).flatten()                  # in anchor order
    cand = cand[torch.argsort(det_probs[cand], descending=True, stable=True)[:top_k]]
    b, s = boxes[cand], det_probs[cand]
    ok = ((b[:, 2:] - b[:, :2]) > 2).all(dim=1)
    keep = nms(b[ok], s[ok], iou)
    return b[ok][keep], s[ok][keep]


def assert_matches_pipeline(bundle: Bundle, images: torch.Tensor, got: list[np.ndarray],
                            refine_fn, atol: float, same_kernels: bool) -> None:
    """Exported outputs equal the model's (boxes: decoded anchors clipped to the tile), the
    exported refiner equals the model's on crops of the exported refine input, and (when the
    export runs PyTorch's own kernels, so that near-tied scores rank alike) the documented
    post-processing of the exported outputs gives exactly the pipeline's detections."""
    ref = reference(bundle, images)
    seg, det, boxes, rin = (torch.as_tensor(np.asarray(g)) for g in got)
    assert seg.shape == ref["probs"].shape and rin.shape == ref["refine_input"].shape
    torch.testing.assert_close(seg, ref["probs"], atol=atol, rtol=0)
    torch.testing.assert_close(det, torch.sigmoid(ref["out"].conf_logits), atol=atol, rtol=0)
    torch.testing.assert_close(rin, ref["refine_input"], atol=atol, rtol=0)
    anchors = make_anchors(bundle.spec)
    size = bundle.spec.input_size
    want_all = decode(ref["out"].loc, anchors[None]).clamp(0, size)
    torch.testing.assert_close(boxes, want_all, atol=max(atol, 1e-3), rtol=0)
    for i in range(images.shape[0]):
        want_b, want_s = detect_boxes(ref["out"].conf_logits[i], ref["out"].loc[i], anchors,
                                      0.0, 0.4, 40, size)
        assert len(want_b) > 3
        if same_kernels:
            got_b, got_s = post_process(det[i], boxes[i], 0.0, 40, 0.4)
            torch.testing.assert_close(got_b, want_b, atol=atol, rtol=0)
            torch.testing.assert_close(got_s, want_s, atol=atol, rtol=0)
        crops = context_boxes(want_b, bundle.spec.refine_context, size)
        idx = torch.zeros(len(crops), dtype=torch.long)
        with torch.no_grad():
            want = ref["model"].refiner(crop_resize(ref["refine_input"][i:i + 1], idx, crops, 48))
        got_m = torch.as_tensor(np.asarray(refine_fn(crop_resize(rin[i:i + 1], idx, crops, 48))))
        assert got_m.shape == (len(crops), 1, 48, 48)
        torch.testing.assert_close(got_m, want, atol=max(atol, 1e-4), rtol=0)


def test_torchscript_export_reproduces_pipeline(bundle: Bundle, tmp_path: Path) -> None:
    out = tmp_path / "usnet.pt"
    assert export_bundle(bundle, "torchscript", out) == [out]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["usnet.pt"]   # no temporaries left
    module = torch.jit.load(str(out))
    for batch in (1, 3):                      # traced with 2: the batch axis stays free
        images = example_images(bundle.spec.input_size, batch, seed=10 + batch)
        with torch.no_grad():
            got = [o.numpy() for o in module(images)]

            def refine(c):
                return module.refine(c).numpy()
            assert_matches_pipeline(bundle, images, got, refine, atol=1e-5, same_kernels=True)
    meta = read_metadata(out)
    assert meta["weights_sha256"] == bundle.sha256
    assert meta["anchors"] == make_anchors(bundle.spec).shape[0] == 7620
    assert meta["thresholds"]["score"] == bundle.thresholds.score
    assert meta["outputs"] == list(OUTPUTS)


def test_onnx_export_reproduces_pipeline(bundle: Bundle, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="ONNX export needs the 'export' extra (onnx)")
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (the 'export' extra)")
    out = tmp_path / "usnet.onnx"
    paths = export_bundle(bundle, "onnx", out)
    assert paths == [out, tmp_path / "usnet.refine.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["usnet.onnx", "usnet.refine.onnx"]
    for p in paths:
        onnx.checker.check_model(str(p), full_check=True)
        assert read_metadata(p)["weights_sha256"] == bundle.sha256
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param     # dynamic batch
    assert [o.name for o in graph.output] == list(OUTPUTS)
    ort = pytest.importorskip("onnxruntime", reason="numerics need onnxruntime (graph checked)")
    main_s, ref_s = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                     for p in paths)
    for batch in (1, 3):
        images = example_images(bundle.spec.input_size, batch, seed=20 + batch)
        got = main_s.run(list(OUTPUTS), {"images": images.numpy()})

        def refine(c):
            return ref_s.run(["mask_logits"], {"crops": c.numpy()})[0]
        assert_matches_pipeline(bundle, images, got, refine, atol=1e-4, same_kernels=False)


def test_refine_path_names_the_second_onnx_file() -> None:
    assert refine_path(Path("out/m.onnx")) == Path("out/m.refine.onnx")
    assert refine_path(Path("out/m.v2.ONNX")) == Path("out/m.v2.refine.onnx")
    assert refine_path(Path("out/model")) == Path("out/model.refine.onnx")


def test_missing_onnx_packages_give_usage_error_with_pip_command(
        monkeypatch: pytest.MonkeyPatch, bundle: Bundle, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)   # makes `import onnxscript` fail
    with pytest.raises(UsageError) as info:
        require_onnx()
    assert "onnxscript" in info.value.message and "pip install" in info.value.hint
    res = CliRunner().invoke(main, ["export", "--format", "onnx", "--weights",
                                    str(bundle.path), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 2, res.output
    assert "pip install" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_export_writes_checks_and_refuses_to_overwrite(bundle: Bundle, tmp_path: Path
                                                           ) -> None:
    out = tmp_path / "m.pt"
    args = ["export", "--format", "torchscript", "--weights", str(bundle.path), "-o", str(out)]
    res = CliRunner().invoke(main, [*args, "--json", "-q"])
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["files"] == [str(out)] and summary["weights_sha256"] == bundle.sha256
    assert set(summary["max_abs_diff"]) == {*OUTPUTS, "mask_logits"}
    assert all(v <= 1e-5 for v in summary["max_abs_diff"].values())
    before = out.read_bytes()
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "--overwrite" in res.stderr
    assert out.read_bytes() == before
    res = CliRunner().invoke(main, [*args, "--overwrite", "--no-check"])
    assert res.exit_code == 0, res.stderr
    assert torch.jit.load(str(out)) is not None


def test_failed_export_keeps_the_previous_file(monkeypatch: pytest.MonkeyPatch, bundle: Bundle,
                                               tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    out.write_bytes(b"previous export")

    def broken_save(module, path, **kw):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch.jit, "save", broken_save)
    with pytest.raises(OSError):
        export_bundle(bundle, "torchscript", out)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_bad_output_locations(bundle: Bundle, tmp_path: Path) -> None:
    with pytest.raises(OutputError) as info:
        export_bundle(bundle, "torchscript", tmp_path / "missing" / "m.pt")
    assert "does not exist" in info.value.message and info.value.hint
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(UsageError):
        export_bundle(bundle, "torchscript", tmp_path / "dir.pt")
    with pytest.raises(UsageError):
        export_bundle(bundle, "tflite", tmp_path / "m.tflite")
