"""Push failures, one class per cause, each with the exit code the CLI returns for it.

Scripts that publish models branch on the cause: a missing token needs a login, a connection error a retry
later, a missing repo or missing permission a different --repo-id or token, a checksum mismatch an alarm.
"""

from __future__ import annotations

from nabla_convert.errors import NablaError


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
