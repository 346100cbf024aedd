"""The errors nabla-convert reports to users as one line, and the exit-code policy of every command.

Exit codes: 0 done; 1 an input or a run that cannot go on (a NablaError, or the operating system refusing a file),
printed as one "Error: ..." line; 2 a usage error (an option value or combination refused before any work). push
adds 3-8, one per cause of failure (the PushError subclasses below): scripts that publish models branch on the
cause (a missing token needs a login, a connection error a retry later, a missing repo or missing permission a
different --repo-id or token, a checksum mismatch an alarm).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click


class NablaError(Exception):
    """Base of the errors nabla-convert reports to users as one line; the CLI exits with `exit_code`."""

    exit_code = 1


class InputFileError(NablaError, ValueError):
    """A file given as input that cannot be read as what it should be: missing, a folder, not UTF-8, empty."""


class DeviceError(NablaError, ValueError):
    """A --device that torch does not know or this machine does not have."""


class PushError(NablaError):
    """Any other failure, e.g. an unexpected Hub answer; every message is one line that says why."""

    exit_code = 1


class InvalidArgumentsError(PushError):
    """A malformed repo id, revision or endpoint, or options that contradict each other (a usage error)."""

    exit_code = 2


class InvalidCheckpointError(PushError):
    """The folder is not a complete converted checkpoint (found before any network call)."""

    exit_code = 3


class AuthenticationError(PushError):
    """No token was found, or the Hub rejected the one given."""

    exit_code = 4


class HubConnectionError(PushError):
    """The Hub could not be reached: offline mode, no network, or the endpoint is down."""

    exit_code = 5


class NotFoundError(PushError):
    """The repository, its namespace or the revision does not exist (or is not visible with this token)."""

    exit_code = 6


class PermissionDeniedError(PushError):
    """The token may not write to this repository or namespace."""

    exit_code = 7


class VerificationError(PushError):
    """After the upload, the Hub's checksums for the commit differ from the local files."""

    exit_code = 8


PUSH_ERRORS = (
    PushError,
    InvalidArgumentsError,
    InvalidCheckpointError,
    AuthenticationError,
    HubConnectionError,
    NotFoundError,
    PermissionDeniedError,
    VerificationError,
)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """The policy: a NablaError exits with its code, a file the operating system refuses with 1, each as one
    "Error: ..." line on stderr (Click's own usage errors exit with 2)."""
    try:
        yield
    except (NablaError, OSError) as err:
        failure = click.ClickException(" ".join(str(err).split()))
        failure.exit_code = getattr(err, "exit_code", 1)
        raise failure from None
