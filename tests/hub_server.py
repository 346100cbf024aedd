"""A loopback Hugging Face Hub for tests: enough of the HTTP API for huggingface_hub's upload and download paths.

It answers what `HfApi.create_repo`, `create_branch`, `upload_folder` (plain LFS, Xet disabled, with or without
`create_pr`), `model_info`/`repo_info`, `list_repo_tree`, `list_repo_refs`, `snapshot_download`
and `hf_hub_download` send, following huggingface_hub 2.4 (hf_api.py, _commit_api.py, lfs.py, file_download.py).
Every checksum it reports (git blob sha1, LFS sha256, sizes) is computed from the bytes it stores, never copied
from what a client claimed, so a stored file that differs from the uploaded one shows up in the metadata.

Users and permissions: `tokens` maps a token to (user, role) with role "write" or "read". A user writes to its own
namespace with a write token; anyone with read access may open a pull request. Unknown tokens get 401
"Invalid credentials in Authorization header", like the Hub. Only 127.0.0.1 is bound; bodies are size-capped.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

MAX_BODY_BYTES = 256 * 1024 * 1024
LFS_THRESHOLD_BYTES = 10 * 1024 * 1024
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack", "*.gguf")
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS).encode()
COMMIT_OID = re.compile(r"[0-9a-f]{40}")


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Blob:
    content: bytes
    lfs: bool

    def tree_entry(self, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "path": path, "size": len(self.content)}
        entry["oid"] = git_blob_sha1(self.content)
        if self.lfs:
            sha256 = hashlib.sha256(self.content).hexdigest()
            entry["lfs"] = {"oid": sha256, "size": len(self.content), "pointerSize": 134}
        return entry

    @property
    def etag(self) -> str:
        return hashlib.sha256(self.content).hexdigest() if self.lfs else git_blob_sha1(self.content)


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # "main", "my-branch", "refs/pr/1" -> commit oid
    pull_requests: int = 0


class HubError(Exception):
    """An HTTP error answer: status, message, and the X-Error-Code huggingface_hub maps to exception classes."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers: dict[str, str] = headers or {}
        self.body: dict[str, Any] = body or {}


@dataclass
class Faults:
    """Failures the tests switch on: transient 503s on commit, and added files stored altered (once per path)."""

    fail_commits: int = 0
    corrupt_on_commit: set[str] = field(default_factory=set)


class HubState:
    """Repos, LFS objects and users; every method runs under one lock."""

    def __init__(self, tokens: dict[str, tuple[str, str]]):
        self.url = ""  # set by the server once its port is known
        self.tokens = tokens
        self.namespaces = {user for user, _ in tokens.values()}
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.faults = Faults()
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.RLock()
        self._serial = itertools.count()

    # --- identity and access -------------------------------------------------------------------------------
    def user_of(self, authorization: str | None) -> tuple[str, str] | None:
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def readable_repo(self, repo_id: str, user: tuple[str, str] | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and (user is None or user[0] != repo_id.split("/")[0])):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def writable_repo(self, repo_id: str, user: tuple[str, str] | None, create_pr: bool) -> Repo:
        repo = self.readable_repo(repo_id, user)
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        if not create_pr and (user[1] != "write" or user[0] != repo_id.split("/")[0]):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # --- git-like storage ------------------------------------------------------------------------------------
    def resolve(self, repo: Repo, revision: str) -> Commit:
        oid = repo.refs.get(revision)
        if oid is None and COMMIT_OID.fullmatch(revision) and revision in repo.commits:
            oid = revision
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    def new_commit(self, repo: Repo, parent: Commit | None, title: str, message: str, author: str, files) -> Commit:
        oid = hashlib.sha1(f"{repo.repo_id}:{next(self._serial)}:{title}".encode()).hexdigest()
        date = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        commit = Commit(oid, parent.oid if parent else None, title, message, author, date, files)
        repo.commits[oid] = commit
        return commit

    def create_repo(self, user: tuple[str, str] | None, payload: dict[str, Any]) -> Repo:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        namespace = payload.get("organization") or user[0]
        repo_id = f"{namespace}/{payload['name']}"
        if namespace not in self.namespaces:
            raise HubError(404, f"Namespace {namespace} not found")
        if user[1] != "write" or namespace != user[0]:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        if repo_id in self.repos:
            # The Hub names the existing repo in its 409 answer; create_repo(exist_ok=True) returns that url.
            raise HubError(409, "You already created this model repo", body={"url": f"{self.url}/{repo_id}"})
        repo = Repo(repo_id, private=payload.get("visibility") == "private")
        self.repos[repo_id] = repo
        initial = self.new_commit(
            repo, None, "initial commit", "", user[0], {".gitattributes": Blob(GITATTRIBUTES, False)}
        )
        repo.refs["main"] = initial.oid
        return repo

    def create_branch(self, repo: Repo, branch: str, starting_point: str | None) -> None:
        if branch.startswith("refs/") or not branch:
            raise HubError(400, f"Invalid reference for a branch: {branch}")
        if branch in repo.refs:
            raise HubError(409, f"Reference already exists: {branch}")
        repo.refs[branch] = self.resolve(repo, starting_point or "main").oid

    @staticmethod
    def is_lfs(path: str, size: int) -> bool:
        return size >= LFS_THRESHOLD_BYTES or any(fnmatch(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)

    def preupload(self, repo: Repo, revision: str, files: list[dict[str, Any]]) -> list[dict[str, Any]]:
        head = self.resolve(repo, revision)
        answers = []
        for item in files:
            answer = {
                "path": item["path"],
                "uploadMode": "lfs" if self.is_lfs(item["path"], item["size"]) else "regular",
            }
            answer["shouldIgnore"] = False
            if item["path"] in head.files:
                answer["oid"] = head.files[item["path"]].etag
            answers.append(answer)
        return answers

    def commit(self, repo: Repo, revision: str, lines: list[dict[str, Any]], author: str, create_pr: bool) -> tuple:
        if self.faults.fail_commits > 0:
            self.faults.fail_commits -= 1
            raise HubError(503, "Service temporarily unavailable")
        header = lines[0]["value"] if lines and lines[0]["key"] == "header" else None
        if header is None:
            raise HubError(400, "The first line of a commit must be its header")
        base = self.resolve(repo, revision)
        if not create_pr and revision not in repo.refs:
            raise HubError(400, f"Cannot commit to {revision}: not a branch")
        if header.get("parentCommit") and not base.oid.startswith(header["parentCommit"]):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(base.files)
        added = set()
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key in ("file", "lfsFile"):
                added.add(value["path"])
            if key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(422, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = Blob(self.lfs_objects[value["oid"]], True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: blob for path, blob in files.items() if not path.startswith(prefix)}
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        for path in self.faults.corrupt_on_commit & added:
            self.faults.corrupt_on_commit.discard(path)
            stored = files[path].content
            files[path] = Blob(bytes([stored[0] ^ 0xFF]) + stored[1:], files[path].lfs)
        commit = self.new_commit(repo, base, header["summary"], header.get("description", ""), author, files)
        pull_request = None
        if create_pr:
            repo.pull_requests += 1
            pull_request = repo.pull_requests
            repo.refs[f"refs/pr/{pull_request}"] = commit.oid
        else:
            repo.refs[revision] = commit.oid
        return commit, pull_request


def tree_entries(files: dict[str, Blob], prefix: str, recursive: bool) -> list[dict[str, Any]]:
    """Files and folders under `prefix` (one level, or all with `recursive`), folders with a content-derived oid."""
    prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    entries: dict[str, dict[str, Any]] = {}
    for path, blob in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        for depth in range(1, len(parts)):
            if depth > 1 and not recursive:
                break
            folder = prefix + "/".join(parts[:depth])
            entries.setdefault(folder, {"type": "directory", "path": folder, "oid": ""})
        if len(parts) == 1 or recursive:
            entries[path] = blob.tree_entry(path)
    for entry in entries.values():
        if entry["type"] == "directory":
            inside = [blob.etag for path, blob in sorted(files.items()) if path.startswith(entry["path"] + "/")]
            entry["oid"] = hashlib.sha1("".join(inside).encode()).hexdigest()
    return list(entries.values())


class HubHandler(BaseHTTPRequestHandler):
    server: HubHTTPServer
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:  # the tests read state, not access logs
        pass

    # --- plumbing ------------------------------------------------------------------------------------------
    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY_BYTES:
                    raise HubError(413, "Body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise HubError(413, "Body too large")
        return self.rfile.read(length)

    def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def send_json(self, data: Any, status: int = 200) -> None:
        self.send(status, json.dumps(data).encode())

    @property
    def base_url(self) -> str:
        return self.server.url

    def dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        state = self.server.state
        try:
            body = self.read_body() if method in ("POST", "PUT") else b""
            with state.lock:
                state.requests.append((method, url.path))
                user = state.user_of(self.headers.get("Authorization"))
                self.route(method, parts, query, body, user)
        except Exception as unexpected:  # a malformed request: answer it, so the client fails with a message
            if not isinstance(unexpected, HubError):
                unexpected = HubError(500, f"{type(unexpected).__name__}: {unexpected}")
            err = unexpected
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            body = json.dumps({"error": err.message, **err.body}).encode()
            self.send(err.status, body, headers, head=method == "HEAD")

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_HEAD(self) -> None:
        self.dispatch("HEAD")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_PUT(self) -> None:
        self.dispatch("PUT")

    # --- routes --------------------------------------------------------------------------------------------
    def route(self, method: str, parts: list[str], query: dict[str, str], body: bytes, user) -> None:
        state = self.server.state
        if method == "POST" and parts == ["api", "repos", "create"]:
            repo = state.create_repo(user, json.loads(body))
            self.send_json({"url": f"{self.base_url}/{repo.repo_id}", "name": repo.repo_id, "id": repo.repo_id})
        elif method == "POST" and parts == ["api", "validate-yaml"]:
            self.validate_yaml(json.loads(body)["content"])
        elif len(parts) >= 4 and parts[:2] == ["api", "models"]:
            self.route_api(method, f"{parts[2]}/{parts[3]}", parts[4:], query, body, user)
        elif (
            method == "POST"
            and len(parts) == 6
            and parts[1].endswith(".git")
            and parts[2:] == ["info", "lfs", "objects", "batch"]
        ):
            self.lfs_batch(f"{parts[0]}/{parts[1].removesuffix('.git')}", json.loads(body), user)
        elif method == "PUT" and len(parts) == 2 and parts[0] == "lfs-upload":
            if hashlib.sha256(body).hexdigest() != parts[1]:
                raise HubError(400, "Uploaded content does not match its sha256")
            state.lfs_objects[parts[1]] = body
            self.send(200, headers={"ETag": f'"{parts[1]}"'})
        elif method == "POST" and parts == ["lfs-verify"]:
            request = json.loads(body)
            stored = state.lfs_objects.get(request["oid"])
            if stored is None or len(stored) != request["size"]:
                raise HubError(404, "Object not found")
            self.send_json({})
        elif method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            self.resolve_file(method, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), user)
        else:
            raise HubError(404, f"No route for {method} /{'/'.join(parts)}")

    def route_api(self, method: str, repo_id: str, rest: list[str], query, body: bytes, user) -> None:
        state = self.server.state
        create_pr = query.get("create_pr") == "1"
        if method == "GET" and (not rest or rest[0] == "revision"):
            repo = state.readable_repo(repo_id, user)
            commit = state.resolve(repo, rest[1] if rest else "main")
            self.send_json(self.model_info(repo, commit, blobs=query.get("blobs", "").lower() == "true"))
        elif method == "GET" and rest and rest[0] == "tree":
            repo = state.readable_repo(repo_id, user)
            commit = state.resolve(repo, rest[1])
            prefix = "/".join(rest[2:])
            if prefix and not any(path.startswith(prefix.rstrip("/") + "/") or path == prefix for path in commit.files):
                raise HubError(404, f"{prefix} does not exist", "EntryNotFound")
            self.send_json(tree_entries(commit.files, prefix, query.get("recursive", "").lower() == "true"))
        elif method == "GET" and rest == ["refs"]:
            repo = state.readable_repo(repo_id, user)

            def refs(names):
                return [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": repo.refs[n]} for n in names]

            branches = [n for n in repo.refs if not n.startswith("refs/")]
            pulls = [
                {"name": n, "ref": n, "targetCommit": oid} for n, oid in repo.refs.items() if n.startswith("refs/pr/")
            ]
            data = {"branches": refs(branches), "converts": [], "tags": []}
            data["pullRequests"] = pulls if query.get("include_prs") == "1" else None
            self.send_json(data)
        elif method == "POST" and rest and rest[0] == "branch":
            repo = state.writable_repo(repo_id, user, create_pr=False)
            state.create_branch(repo, rest[1], json.loads(body or b"{}").get("startingPoint"))
            self.send_json({})
        elif method == "POST" and rest and rest[0] == "preupload":
            repo = state.writable_repo(repo_id, user, create_pr)
            self.send_json({"files": state.preupload(repo, rest[1], json.loads(body)["files"])})
        elif method == "POST" and rest and rest[0] == "commit":
            repo = state.writable_repo(repo_id, user, create_pr)
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            commit, pull_request = state.commit(repo, rest[1], lines, user[0], create_pr)
            pr_url = f"{self.base_url}/{repo_id}/discussions/{pull_request}" if pull_request else None
            self.send_json(
                {
                    "success": True,
                    "commitOid": commit.oid,
                    "commitUrl": f"{self.base_url}/{repo_id}/commit/{commit.oid}",
                    "pullRequestUrl": pr_url,
                }
            )
        else:
            raise HubError(404, f"No route for {method} /api/models/{repo_id}/{'/'.join(rest)}")

    def model_info(self, repo: Repo, commit: Commit, blobs: bool) -> dict[str, Any]:
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry = blob.tree_entry(path)
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in entry:
                    sibling["lfs"] = {"sha256": entry["lfs"]["oid"], "size": entry["size"], "pointerSize": 134}
            siblings.append(sibling)
        owner = repo.repo_id.split("/")[0]
        return {
            "id": repo.repo_id,
            "author": owner,
            "sha": commit.oid,
            "private": repo.private,
            "lastModified": commit.date,
            "tags": [],
            "siblings": siblings,
        }

    def validate_yaml(self, content: str) -> None:
        match = re.match(r"^---\n(.*?)\n---\n", content, flags=re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
            problem = None if metadata is None or isinstance(metadata, dict) else "metadata must be a YAML mapping"
        except yaml.YAMLError as err:
            problem = f"invalid YAML: {err}"
        if problem:
            self.send(400, json.dumps({"errors": [{"message": problem}]}).encode())
        else:
            self.send_json({"errors": [], "warnings": []})

    def lfs_batch(self, repo_id: str, request: dict[str, Any], user) -> None:
        state = self.server.state
        # huggingface_hub leaves the ref out when it uploads for a pull request, which readers may open.
        state.writable_repo(repo_id, user, create_pr="ref" not in request)
        objects = []
        for item in request["objects"]:
            answer = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in state.lfs_objects:
                answer["actions"] = {
                    "upload": {"href": f"{self.base_url}/lfs-upload/{item['oid']}", "header": {}},
                    "verify": {"href": f"{self.base_url}/lfs-verify", "header": {}},
                }
            objects.append(answer)
        self.send_json({"transfer": "basic", "objects": objects})

    def resolve_file(self, method: str, repo_id: str, revision: str, path: str, user) -> None:
        state = self.server.state
        repo = state.readable_repo(repo_id, user)
        commit = state.resolve(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"{path} does not exist", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        content = blob.content
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes"}
        headers["Content-Type"] = "application/octet-stream"
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.etag}"', "X-Linked-Size": str(len(content))})
        status = 200
        requested = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if requested:
            start = int(requested.group(1))
            end = int(requested.group(2)) if requested.group(2) else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start : end + 1], 206
        self.send(status, content, headers, head=method == "HEAD")


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.state = state
        self.url = state.url = f"http://127.0.0.1:{self.server_address[1]}"


class LoopbackHub:
    """Start with `with LoopbackHub(tokens) as hub:`; `hub.url` is the endpoint, `hub.state` the stored repos."""

    def __init__(self, tokens: dict[str, tuple[str, str]]):
        self.state = HubState(tokens)
        self._server = HubHTTPServer(self.state)
        self.url = self._server.url
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> LoopbackHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def commit_count(self, repo_id: str) -> int:
        with self.state.lock:
            return len(self.state.repos[repo_id].commits)
