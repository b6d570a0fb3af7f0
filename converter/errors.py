"""The one exception type the CLIs turn into a clear message and exit status 2."""

from __future__ import annotations


class ConversionError(Exception):
    """Bad input or an impossible request; the message names the file and the problem."""
