"""atomic_path / outputs_complete, the overview PNG and run.json."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usnet_wsi.errors import OutputError
from usnet_wsi.writers.atomic import atomic_path, is_temporary, outputs_complete
from usnet_wsi.writers.overview import colormap, density_map, write_overview
from usnet_wsi.writers.runjson import provenance, utc_now, write_run_json

# --- atomic -------------------------------------------------------------------------------


def test_atomic_file_appears_only_on_success(tmp_path):
    final = tmp_path / "out.txt"
    with atomic_path(final) as tmp:
        assert tmp.parent == tmp_path and is_temporary(tmp) and not is_temporary(final)
        tmp.write_text("hello")
        assert not final.exists()
    assert final.read_text() == "hello"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_error_leaves_no_file_and_keeps_the_old_one(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "new.txt") as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old.txt"
    old.write_text("complete")
    with pytest.raises(RuntimeError):
        with atomic_path(old) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["old.txt"] and old.read_text() == "complete"


def test_atomic_directory_replaces_and_cleans_up(tmp_path):
    final = tmp_path / "store.zarr"
    for content in ("first", "second"):
        with atomic_path(final) as tmp:
            (tmp / "sub").mkdir(parents=True)
            (tmp / "sub" / "data").write_text(content)
    assert (final / "sub" / "data").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["store.zarr"]
    with pytest.raises(ValueError):
        with atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "half").write_text("x")
            raise ValueError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["store.zarr"]
    assert (final / "sub" / "data").read_text() == "second"


def test_atomic_missing_folder_is_an_output_error(tmp_path):
    with pytest.raises(OutputError) as info:
        with atomic_path(tmp_path / "nope" / "out.txt"):
            pass
    assert "nope" in str(info.value) and info.value.hint


def test_outputs_complete(tmp_path):
    geo, store = tmp_path / "s.geojson", tmp_path / "s.zarr"
    assert not outputs_complete([geo, store])
    geo.write_text("")
    store.mkdir()
    assert not outputs_complete([geo])  # empty file
    assert not outputs_complete([store])  # no zarr.json
    geo.write_text("{}")
    (store / "zarr.json").write_text("{}")
    assert outputs_complete([geo, store])


# --- overview -----------------------------------------------------------------------------


def _thumb(h=60, w=80):
    rng = np.random.default_rng(0)
    return rng.integers(150, 230, (h, w, 3), dtype=np.uint8)


def test_density_map_counts_centroids_per_thumbnail_cell():
    cents = np.array([[10.0, 10.0], [11.0, 9.0], [150.0, 90.0], [-40.0, 5.0]])  # last: outside
    dens = density_map((30, 40), 0.25, cents, sigma_px=0)
    assert dens.sum() == 3 and dens[2, 2] == 2 and dens[22, 37] == 1


def test_colormap_is_monotone_in_brightness():
    rgb = colormap(np.linspace(0, 1, 11)).astype(int)
    assert rgb.shape == (11, 3) and rgb.dtype == np.int64
    assert np.all(np.diff(rgb.sum(axis=1)) > 0)


def test_overview_png_shows_density_where_the_nuclei_are(tmp_path):
    thumb, scale = _thumb(), 0.1
    rng = np.random.default_rng(1)
    cents = rng.normal((150, 200), 20, (500, 2))  # cluster around thumbnail (x 15, y 20)
    write_overview(tmp_path / "o.png", thumb, scale, cents, mpp=0.5, sigma_px=2)
    img = np.asarray(Image.open(tmp_path / "o.png").convert("RGB"))
    assert img.shape[0] > thumb.shape[0] and img.shape[1] == thumb.shape[1]  # legend strip
    body = img[: thumb.shape[0]]
    assert np.abs(body[20, 15].astype(int) - thumb[20, 15]).sum() > 60  # tinted
    np.testing.assert_array_equal(body[50:, 60:], thumb[50:, 60:])  # far away: untouched
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]


def test_overview_without_nuclei_is_the_thumbnail(tmp_path):
    thumb = _thumb()
    write_overview(tmp_path / "o.png", thumb, 0.1, np.zeros((0, 2)), legend=False)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png")), thumb)


def test_overview_bad_thumbnail_writes_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_overview(tmp_path / "o.png", _thumb().astype(np.float32), 0.1, np.zeros((0, 2)))
    assert list(tmp_path.iterdir()) == []


# --- run.json -----------------------------------------------------------------------------


def test_run_json_sorted_indented_and_plain(tmp_path):
    data = {"zeta": np.int64(3), "alpha": {"b": np.float32(0.5), "a": [Path("/x/y"), (1, 2)]},
            "nan": float("nan"), "arr": np.arange(3)}
    write_run_json(tmp_path / "r.json", data)
    text = (tmp_path / "r.json").read_text(encoding="utf-8")
    assert text.endswith("}\n") and '\n  "alpha": {\n    "a": [' in text
    assert json.loads(text) == {"alpha": {"a": ["/x/y", [1, 2]], "b": 0.5}, "arr": [0, 1, 2],
                                "nan": None, "zeta": 3}
    keys = list(json.loads(text))
    assert keys == sorted(keys)


def test_run_json_unknown_type_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_run_json(tmp_path / "r.json", {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_provenance_basics():
    prov = provenance(argv=["usnet-wsi", "segment", "a.svs"], started_utc="2024-01-02T03:04:05Z")
    assert prov["argv"] == ["usnet-wsi", "segment", "a.svs"]
    assert prov["started_utc"] == "2024-01-02T03:04:05Z" and prov["finished_utc"] is None
    assert prov["usnet_wsi_version"] and prov["python"].count(".") == 2
    assert prov["packages"]["numpy"] == np.__version__
    assert "torch" in prov["packages"] and prov["platform"]
    stamp = utc_now()
    assert datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
    assert provenance(argv=[])["started_utc"] >= stamp
    assert os.sep not in stamp
