"""The one exception type the CLIs turn into a clear message and exit status 2."""

from __future__ import annotations

import sys

import click


class ConversionError(Exception):
    """Bad input or an impossible request; the message names the file and the problem."""


class ClearErrorGroup(click.Group):
    """A click group that turns ConversionError into one line on stderr and exit status 2 (no traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ConversionError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
