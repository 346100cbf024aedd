"""The errors nabla-convert reports to users as one line, and the exit codes of the command line.

Exit codes, every command: 0 done; 1 an input or a run that cannot go on (a NablaError, or the operating system
refusing a file), printed as one "Error: ..." line; 2 a usage error (an option value or combination refused before
any work). push adds 3-8, one per cause of failure (nabla_convert/hub/errors.py).
"""

from __future__ import annotations


class NablaError(Exception):
    """Base of the errors nabla-convert reports to users as one line; the CLI exits with `exit_code`."""

    exit_code = 1


class InputFileError(NablaError, ValueError):
    """A file given as input that cannot be read as what it should be: missing, a folder, not UTF-8, empty."""


class DeviceError(NablaError, ValueError):
    """A --device that torch does not know or this machine does not have."""
