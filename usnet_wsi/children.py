"""Helpers for the child processes a run starts (CPU-stage workers, the writer process)."""

from __future__ import annotations

import os
import threading
import time

__all__ = ["exit_with_parent"]


def exit_with_parent(parent_pid: int) -> None:
    """Start a daemon thread that ends this process once its parent is gone (even when the
    parent was killed with SIGKILL), so that no child outlives a killed run."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.25)
        os._exit(0)

    threading.Thread(target=watch, name="usnet-parent-watch", daemon=True).start()
