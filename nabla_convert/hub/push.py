"""Publish a converted checkpoint to the Hugging Face Hub: check, describe, upload, verify.

`prepare_push` does everything that needs no network (checks, model card, sha256 manifest, the weights compared
with the manifest convert/adapt recorded) and is what a dry run shows. `push_to_hub` then creates the repo (and
branch), uploads exactly the manifest's files (the card from memory) in one commit with `create_commit`, and
compares the Hub's checksums for that commit with the manifest, so a push that returns has put exactly these bytes
there. FOLDER is written only after a verified push: the generated README.md, and with `restamp` the new weights
manifest. Each network step is idempotent (exist_ok, content-addressed upload), so a transient failure retries it.
"""

from __future__ import annotations

import contextlib
import logging
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, get_token
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import validate_repo_id

from nabla_convert.errors import (
    AuthenticationError,
    HubConnectionError,
    InputFileError,
    InvalidArgumentsError,
    InvalidCheckpointError,
    NotFoundError,
    PermissionDeniedError,
    PushError,
    VerificationError,
)
from nabla_convert.folders import MARKER, is_weight_file, read_marker, tool_version, write_marker
from nabla_convert.hub.card import generate_card
from nabla_convert.hub.checks import Checkpoint, ManifestEntry, build_manifest, check_checkpoint, weights_changed
from nabla_convert.io import atomic_write_text, read_text

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
DEFAULT_BRANCH = "main"
DEFAULT_RETRIES = 3
RETRY_BASE_WAIT_S = 1.0
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
T = TypeVar("T")


def human_size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


@dataclass(frozen=True)
class PushPlan:
    """What a push would send: the checked checkpoint, its card, and the manifest of every file."""

    repo_id: str
    revision: str | None
    create_pr: bool
    checkpoint: Checkpoint
    card: str
    card_is_new: bool  # generated now (written to README.md on push) rather than kept from the folder
    manifest: tuple[ManifestEntry, ...]
    restamp: bool  # the weights differ from the recorded manifest (or there is none) and will be recorded anew

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.manifest)

    @property
    def target(self) -> str:
        if self.create_pr:
            return f"a pull request on {self.repo_id} against {DEFAULT_BRANCH}"
        return f"{self.repo_id}, branch {self.revision or DEFAULT_BRANCH}"

    def describe(self) -> str:
        checkpoint = self.checkpoint
        parts = ", ".join(
            f"{t.subfolder or 'transformer'} {t.num_parameters:,} parameters" for t in checkpoint.transformers
        )
        reports = ", ".join(sorted(checkpoint.reports)) or "none"
        lines = [
            f"Would upload {len(self.manifest)} files ({human_size(self.total_bytes)}) from {checkpoint.folder} "
            f"to {self.target}.",
            f"Checked: {checkpoint.pipeline_class or 'transformer folder'} ({parts}); reports: {reports}.",
            f"Weights: {self.weights_note()}.",
            "",
            "sha256 manifest:",
            *(f"  {entry.sha256}  {entry.size:>12}  {entry.path}" for entry in self.manifest),
            "",
            f"Model card ({CARD_NAME}, {'generated' if self.card_is_new else 'kept from the folder'}):",
            "",
            self.card,
        ]
        return "\n".join(lines)

    def weights(self) -> dict[str, str]:
        return {entry.path: entry.sha256 for entry in self.manifest if is_weight_file(entry.path)}

    def weights_note(self) -> str:
        if self.restamp:
            return f"{len(self.weights())} files, re-stamped in {MARKER} after the push (--restamp)"
        return f"{len(self.weights())} files, each matching the sha256 recorded when they were written"


def check_target(repo_id: str, revision: str | None, create_pr: bool) -> None:
    """Refuse a malformed repo id or revision, or contradictory options, before any file is read or request sent."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise InvalidArgumentsError(
            f"invalid --repo-id {repo_id!r}: use namespace/name with letters, digits, '-', '_' or '.'"
        ) from None
    if "/" not in repo_id:
        raise InvalidArgumentsError(f"invalid --repo-id {repo_id!r}: give the namespace too, like you/{repo_id}")
    if revision is not None and (not revision.strip() or not revision.isprintable() or " " in revision):
        raise InvalidArgumentsError(f"invalid --revision {revision!r}: a branch name or refs/pr/N")
    if create_pr and revision not in (None, DEFAULT_BRANCH):
        raise InvalidArgumentsError(
            "--create-pr opens a pull request against main; it cannot be combined with --revision"
        )


def check_endpoint(endpoint: str) -> None:
    """An http(s) URL with a host: anything else fails the same way on every retry."""
    url = urllib.parse.urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname or not endpoint.isprintable() or " " in endpoint:
        raise InvalidArgumentsError(
            f"invalid Hub endpoint {endpoint!r}: give an http(s) URL like https://huggingface.co"
        )


def check_token(token: str) -> None:
    """A token goes into an HTTP header: refuse one that cannot, without ever printing it."""
    if not token.isascii() or not token.isprintable() or " " in token:
        raise AuthenticationError(
            f"the token ({len(token)} characters) holds spaces, line breaks or other characters no token has; "
            "check --token or HF_TOKEN"
        )


def prepare_push(
    folder: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    create_pr: bool = False,
    regenerate_card: bool = False,
    restamp: bool = False,
) -> PushPlan:
    """Check the options and the folder, and build the card and manifest, without any network call.

    The weight files must match the sha256 manifest convert/adapt recorded, so an edit made after conversion is
    caught; `restamp` accepts the folder's current weights instead (recorded after a successful push).
    """
    check_target(repo_id, revision, create_pr)
    folder = Path(folder)
    checkpoint = check_checkpoint(folder)
    card_path = folder / CARD_NAME
    if card_path.is_file() and not regenerate_card:
        try:
            card, card_is_new = read_text(card_path, CARD_NAME), False
        except InputFileError as err:
            raise InvalidCheckpointError(f"{err}; fix it or pass --regenerate-card") from None
        try:
            ModelCard(card)
        except (ValueError, yaml.YAMLError) as err:
            message = " ".join(str(err).split())
            raise InvalidCheckpointError(
                f"{CARD_NAME} has invalid metadata ({message}); fix it or pass --regenerate-card"
            ) from None
    else:
        card, card_is_new = generate_card(checkpoint, repo_id), True
    manifest = build_manifest(folder, {CARD_NAME: card.encode("utf-8")} if card_is_new else None)
    marker = read_marker(folder) or {}
    recorded = marker.get("weights")
    if not restamp and not isinstance(recorded, dict):
        raise InvalidCheckpointError(
            f"{folder} has no weights manifest ({MARKER}, written by convert and adapt); pass --restamp to record "
            "the current weights"
        )
    changed = [] if restamp else weights_changed(manifest, recorded, marker.get("weight_identities"), folder)
    if changed:
        listed = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise InvalidCheckpointError(
            f"weights differ from the sha256 recorded when they were written: {listed}; pass --restamp if intended"
        )
    return PushPlan(repo_id, revision, create_pr, checkpoint, card, card_is_new, manifest, restamp)


@dataclass(frozen=True)
class PushResult:
    """Where the files went: the commit on the Hub, its URL, the pull request if one was opened."""

    repo_id: str
    repo_url: str
    revision: str
    commit_oid: str
    commit_url: str
    pr_url: str | None
    created_commit: bool  # False when the Hub already held these exact files (nothing was committed)
    files: tuple[ManifestEntry, ...]

    def summary(self) -> str:
        if not self.created_commit:
            head = f"Nothing to commit: {self.repo_url} ({self.revision}) already holds these files."
        elif self.pr_url:
            head = f"Opened pull request {self.pr_url}"
        else:
            head = f"Pushed to {self.repo_url} ({self.revision})."
        return "\n".join(
            [
                head,
                f"Commit {self.commit_oid}: {self.commit_url}",
                f"Verified {len(self.files)} files against the Hub's checksums for that commit.",
            ]
        )


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    regenerate_card: bool = False,
    restamp: bool = False,
    retries: int = DEFAULT_RETRIES,
) -> PushResult:
    """Check, upload and verify a converted checkpoint; raise a PushError subclass naming the cause on failure.

    `revision` is a branch (created from main if missing) or an open pull request ref ("refs/pr/N");
    `create_pr` opens a pull request against main instead of committing to a branch. `private` applies when the
    repo is created; an existing repo keeps its visibility. `token` defaults to HF_TOKEN or the saved login.
    `restamp` accepts weights changed since convert/adapt recorded them. FOLDER is written only after the Hub's
    checksums verified: the generated card, and with `restamp` the weights manifest.
    """
    check_target(repo_id, revision, create_pr)
    api = HfApi(endpoint=endpoint, token=token)
    check_endpoint(api.endpoint)
    token = token or get_token()
    if not token:
        raise AuthenticationError("no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`")
    check_token(token)
    folder = Path(folder)
    plan = prepare_push(
        folder, repo_id, revision=revision, create_pr=create_pr, regenerate_card=regenerate_card, restamp=restamp
    )
    branch = revision or DEFAULT_BRANCH
    message = commit_message or f"Upload NABLA sparse-attention checkpoint (nabla-convert {tool_version()})"
    with hub_errors(api.endpoint, repo_id, branch, token):
        repo_id = retrying(lambda: ensure_repo(api, repo_id, private), retries)
        if branch != DEFAULT_BRANCH and not branch.startswith("refs/"):
            retrying(lambda: api.create_branch(repo_id, branch=branch, exist_ok=True), retries)
        head_before = retrying(lambda: api.repo_info(repo_id, revision=branch).sha, retries)
        # A retried commit whose first answer was lost is a no-op (the files are then already there), except with
        # create_pr, where it would open a second pull request.
        commit = retrying(
            lambda: api.create_commit(
                repo_id=repo_id,
                operations=upload_operations(folder, plan),
                revision=revision,
                create_pr=create_pr,
                commit_message=message,
            ),
            retries,
        )
        mismatches = retrying(lambda: remote_mismatches(api, repo_id, commit.oid, plan.manifest), retries)
    if mismatches:
        listed = "; ".join(mismatches[:3]) + (f"; and {len(mismatches) - 3} more" if len(mismatches) > 3 else "")
        raise VerificationError(f"the Hub's copy of commit {commit.oid[:12]} differs from {folder}: {listed}")
    if plan.card_is_new:
        atomic_write_text(folder / CARD_NAME, plan.card)
    if plan.restamp:
        write_marker(folder, (read_marker(folder) or {}).get("command", "push"), plan.weights())
    return PushResult(
        repo_id=repo_id,
        repo_url=str(commit.repo_url),
        revision=commit.pr_revision or branch,
        commit_oid=commit.oid,
        commit_url=commit.commit_url,
        pr_url=commit.pr_url,
        created_commit=commit.oid != head_before,
        files=plan.manifest,
    )


def upload_operations(folder: Path, plan: PushPlan) -> list[CommitOperationAdd]:
    """One addition per manifest entry, made fresh for each attempt; a generated card is sent from memory."""
    card = plan.card.encode("utf-8") if plan.card_is_new else None
    return [
        CommitOperationAdd(entry.path, card if entry.path == CARD_NAME and card is not None else folder / entry.path)
        for entry in plan.manifest
    ]


def ensure_repo(api: HfApi, repo_id: str, private: bool) -> str:
    """The full id of the repo, created if missing.

    An existing repo is looked up rather than passed to create_repo(exist_ok=True): for a token that may not create
    in that namespace (a contributor opening a PR), huggingface_hub 2.4 answers with a RepoUrl built without the
    custom endpoint, which fails for any endpoint other than HF_ENDPOINT.
    """
    try:
        return api.repo_info(repo_id).id
    except RepositoryNotFoundError:
        return api.create_repo(repo_id, private=private or None, exist_ok=True).repo_id


def remote_mismatches(api: HfApi, repo_id: str, revision: str, manifest: tuple[ManifestEntry, ...]) -> list[str]:
    """Files whose checksum in the Hub's tree at `revision` differs from the manifest (sha256 for LFS, else git sha1)."""
    remote = {
        entry.path: entry
        for entry in api.list_repo_tree(repo_id, recursive=True, revision=revision)
        if isinstance(entry, RepoFile)
    }
    problems = []
    for entry in manifest:
        found = remote.get(entry.path)
        if found is None:
            problems.append(f"{entry.path} is missing")
        elif found.lfs is not None and (found.lfs.sha256 != entry.sha256 or found.lfs.size != entry.size):
            problems.append(f"{entry.path} has sha256 {found.lfs.sha256[:12]}, expected {entry.sha256[:12]}")
        elif found.lfs is None and found.blob_id != entry.git_sha1:
            problems.append(f"{entry.path} has git sha1 {found.blob_id[:12]}, expected {entry.git_sha1[:12]}")
    return problems


def causes(err: BaseException) -> Iterator[BaseException]:
    """The exception and what it was raised from or while handling: huggingface_hub wraps LFS upload errors with
    `from`; the HTTP client raises its transport errors while handling the socket's (with `from None`)."""
    current: BaseException | None = err
    while current is not None:
        yield current
        current = current.__cause__ or current.__context__


def connection_failure(err: BaseException) -> OSError | None:
    """The socket error under a failed request (refused, reset, timed out, unknown host), if that is what it was.

    The HTTP client raises its own transport errors from the operating system's, so the standard library's classes
    name the cause whichever HTTP client this huggingface_hub version uses.
    """
    for cause in causes(err):
        if isinstance(cause, (OfflineModeIsEnabled, HfHubHTTPError)):
            return None
        if isinstance(cause, OSError):
            return cause
    return None


def is_transient(err: BaseException) -> bool:
    """Worth another try: a dropped or timed-out connection, or a Hub answer that says "later" (429, 5xx)."""
    for cause in causes(err):
        if isinstance(cause, OfflineModeIsEnabled):
            return False
        if isinstance(cause, HfHubHTTPError):
            return cause.response is not None and cause.response.status_code in TRANSIENT_STATUS
    return isinstance(connection_failure(err), (ConnectionError, TimeoutError))


def retrying(step: Callable[[], T], retries: int) -> T:
    """Run an idempotent network step, again after 1, 2, 4... s while it fails on a transient error."""
    for attempt in range(retries + 1):
        try:
            return step()
        except Exception as err:
            if attempt == retries or not is_transient(err):
                raise
            wait = RETRY_BASE_WAIT_S * 2**attempt
            logger.warning("transient Hub error (%s); retrying in %.0f s", type(err).__name__, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def hub_errors(endpoint: str, repo_id: str, revision: str, token: str) -> Iterator[None]:
    """Turn huggingface_hub and transport exceptions into one-line PushErrors, one class per cause; the token
    never appears in a message."""
    try:
        yield
    except PushError:
        raise
    except Exception as err:
        translated = translate(err, endpoint, repo_id, revision)
        if translated is None:
            said = " ".join(str(err).replace(token, "<token>").split())
            translated = PushError(
                f"unexpected failure talking to the Hub at {endpoint} ({type(err).__name__}): {said}"
            )
        raise translated from err


def translate(err: BaseException, endpoint: str, repo_id: str, revision: str) -> PushError | None:
    unreachable = connection_failure(err)
    if unreachable is not None:
        return HubConnectionError(f"cannot reach the Hub at {endpoint}: {unreachable.strerror or unreachable}")
    for cause in causes(err):
        if isinstance(cause, OfflineModeIsEnabled):
            return HubConnectionError("offline mode is on (HF_HUB_OFFLINE): unset it to push")
        if isinstance(cause, RevisionNotFoundError):
            return NotFoundError(f"revision {revision!r} of {repo_id} does not exist on {endpoint}")
        if isinstance(cause, RepositoryNotFoundError):
            return NotFoundError(f"repository {repo_id} does not exist on {endpoint} or this token cannot see it")
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            status = cause.response.status_code
            said = (cause.server_message or "").strip().replace("\n", " ") or cause.response.reason_phrase
            if status == 401:
                return AuthenticationError(f"the Hub at {endpoint} rejected the token (401: {said})")
            if status == 403:
                return PermissionDeniedError(f"this token may not write to {repo_id} (403: {said})")
            if status == 404:
                return NotFoundError(f"not found on {endpoint} (404: {said})")
            return PushError(f"the Hub at {endpoint} answered {status}: {said}")
    return None
