"""Command-line interface: `usnet-wsi segment|info|train|evaluate|export`.

Each command lives in its own module and stays thin: parse -> config -> library call -> summary.
"""

from __future__ import annotations

import importlib

import click

from usnet_wsi import __version__
from usnet_wsi.allocator import keep_freed_memory

_COMMANDS = {
    "segment": ("usnet_wsi.cli.segment", "segment"),
    "info": ("usnet_wsi.cli.info", "info"),
    "train": ("usnet_wsi.cli.train", "train"),
    "evaluate": ("usnet_wsi.cli.evaluate", "evaluate"),
    "export": ("usnet_wsi.cli.export", "export"),
}


class _LazyGroup(click.Group):
    """Imports a command's module only when that command runs (torch is slow to import)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return None
        module, attr = _COMMANDS[name]
        return getattr(importlib.import_module(module), attr)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="usnet-wsi")
def main() -> None:
    """Find and outline every cell nucleus in H&E whole-slide images (US-Net)."""
    keep_freed_memory()
