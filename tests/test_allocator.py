"""The allocator settings: freed memory is reused without new page faults (glibc only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from usnet_wsi.allocator import _glibc

glibc_only = pytest.mark.skipif(_glibc() is None, reason="the allocator settings are glibc's")

_SCRIPT = """
import json, resource, sys
import numpy as np
applied = []
if sys.argv[1] == "keep":
    from usnet_wsi.allocator import keep_freed_memory
    applied = keep_freed_memory()
def churn():            # two 24 MB buffers, allocated, written and freed, as batches do
    for _ in range(10):
        a = np.ones(24 * 2**20, np.uint8)
        b = np.ones(24 * 2**20, np.uint8)
        del a, b
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(json.dumps({"applied": applied,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _run(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True,
                         env={**environ, **env}, check=True)
    return json.loads(out.stdout)


@glibc_only
def test_freed_buffers_are_reused_without_page_faults() -> None:
    default, kept = _run("default"), _run("keep")
    assert kept["applied"] == ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                               "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"]
    assert default["faults"] >= 10 * 256          # glibc's defaults: fresh pages every round
    assert kept["faults"] < default["faults"] / 10


@glibc_only
def test_a_setting_the_user_made_is_left_alone() -> None:
    got = _run("keep", MALLOC_ARENA_MAX="4", MALLOC_TOP_PAD_="0")
    assert got["applied"] == ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
