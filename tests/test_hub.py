"""push against a loopback Hub (tests/hub_server.py) through the real huggingface_hub client, Xet disabled.

References are independent of the code under test: the bytes the server stored, hashlib over the local files,
HfApi.verify_repo_checksums, and a stock WanPipeline loaded from a snapshot_download of the pushed repo.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import generate
from hub_server import LoopbackHub
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError

from nabla_convert import NablaConfig, NablaWanTransformer3DModel, convert
from nabla_convert.cli import main
from nabla_convert.config import LayerSettings
from nabla_convert.errors import (
    AuthenticationError,
    HubConnectionError,
    InvalidArgumentsError,
    InvalidCheckpointError,
    NotFoundError,
    PermissionDeniedError,
    VerificationError,
)
from nabla_convert.folders import MARKER
from nabla_convert.hub import prepare_push, push_to_hub
from nabla_convert.hub import push as push_module

ALICE = "hf_alice_write"
ALICE_READ = "hf_alice_read"
BOB = "hf_bob_write"
TOKENS = {ALICE: ("alice", "write"), ALICE_READ: ("alice", "read"), BOB: ("bob", "write")}
REPO = "alice/tiny-nabla"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fresh loopback Hub; huggingface_hub online, Xet off, no ambient token, fast retries."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(push_module, "RETRY_BASE_WAIT_S", 0.01)
    with LoopbackHub(TOKENS) as server:
        yield server


@pytest.fixture
def converted(tiny_pipeline_dir, tmp_path) -> Path:
    """A converted tiny pipeline (sharded transformer, one dense layer) with a calibration report.

    Copied, not hard-linked: the tests below corrupt its files in place (as a careless user might), which
    through a hard link would corrupt the shared base pipeline too.
    """
    config = NablaConfig(threshold=0.5, sta=(1, 3, 3), layers={1: LayerSettings(dense=True)})
    out = convert(tiny_pipeline_dir, tmp_path / "nabla", config, link=False)
    report = {"summary": {"mean_density": 0.31, "prompts": 4}, "layers": [{"layer": 0, "density": 0.31}]}
    (out / "nabla_reports").mkdir()
    (out / "nabla_reports" / "calibration.json").write_text(json.dumps(report))
    return out


def local_files(folder: Path) -> dict[str, bytes]:
    """What a push publishes: every file but the local marker of the nabla-convert run that wrote the folder."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return {path: content for path, content in files.items() if path != MARKER}


def remote_files(hub: LoopbackHub, revision: str) -> dict[str, bytes]:
    with hub.state.lock:
        repo = hub.state.repos[REPO]
        return {path: blob.content for path, blob in hub.state.resolve(repo, revision).files.items()}


def run_cli(*args: str):
    return CliRunner().invoke(main, ["push", *(str(a) for a in args)])


def error_line(result) -> str:
    """The CLI's error: nothing on stdout, one "Error: " line closing stderr (progress bars may precede it)."""
    assert result.stdout == "" and result.stderr.count("Error: ") == 1, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: ")
    return line


def test_push_new_repo_uploads_every_byte_and_verifies(hub, converted):
    result = push_to_hub(converted, REPO, token=ALICE, endpoint=hub.url)

    assert result.created_commit and result.pr_url is None and result.revision == "main"
    assert hub.state.repos[REPO].refs["main"] == result.commit_oid
    local = local_files(converted)
    assert "README.md" in local and local["README.md"].startswith(b"---\n")
    remote = remote_files(hub, "main")
    assert {path: remote[path] for path in local} == local
    assert set(remote) - set(local) == {".gitattributes"}
    check = HfApi(endpoint=hub.url, token=ALICE).verify_repo_checksums(
        REPO, revision=result.commit_oid, local_dir=converted
    )
    assert (
        check.mismatches == [] and check.extra_paths == [MARKER] and check.checked_count == len(local)
    )  # marker: local only
    info = HfApi(endpoint=hub.url, token=ALICE).model_info(REPO, files_metadata=True)
    shards = [s for s in info.siblings if s.rfilename.endswith(".safetensors")]
    assert shards and all(s.lfs.sha256 == hashlib.sha256(local[s.rfilename]).hexdigest() for s in shards)


def test_second_identical_push_makes_no_commit(hub, converted):
    first = push_to_hub(converted, REPO, token=ALICE, endpoint=hub.url)
    commits = hub.commit_count(REPO)
    second = run_cli(converted, "--repo-id", REPO, "--token", ALICE, "--endpoint", hub.url)

    assert second.exit_code == 0, second.output
    assert "Nothing to commit" in second.stdout and f"{hub.url}/{REPO}/commit/{first.commit_oid}" in second.stdout
    assert hub.commit_count(REPO) == commits


def test_private_repo_is_invisible_without_its_token(hub, converted):
    result = run_cli(converted, "--repo-id", REPO, "--token", ALICE, "--endpoint", hub.url, "--private")
    assert result.exit_code == 0 and f"Pushed to {hub.url}/{REPO} (main)" in result.stdout
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info(REPO)
    assert HfApi(endpoint=hub.url, token=ALICE).model_info(REPO).private


def test_push_to_branch_leaves_main_alone(hub, converted):
    push_to_hub(converted, REPO, token=ALICE, endpoint=hub.url, revision="nabla-v1")
    (converted / "nabla_reports" / "eval.json").write_text(json.dumps({"summary": {"psnr": 31.5}}))
    result = push_to_hub(converted, REPO, token=ALICE, endpoint=hub.url, revision="nabla-v1", regenerate_card=True)

    assert result.created_commit and result.revision == "nabla-v1"
    refs = HfApi(endpoint=hub.url, token=ALICE).list_repo_refs(REPO)
    assert {ref.name: ref.target_commit for ref in refs.branches}["nabla-v1"] == result.commit_oid
    assert set(remote_files(hub, "main")) == {".gitattributes"}
    branch = remote_files(hub, "nabla-v1")
    assert branch["nabla_reports/eval.json"] == (converted / "nabla_reports" / "eval.json").read_bytes()
    assert b"31.5" in branch["README.md"]


def test_create_pr_opens_pull_request_without_touching_main(hub, converted):
    base = push_to_hub(converted, REPO, token=ALICE, endpoint=hub.url)
    config_path = converted / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["_nabla"]["threshold"] = 0.6
    config_path.write_text(json.dumps(config, indent=2))

    result = push_to_hub(converted, REPO, token=BOB, endpoint=hub.url, create_pr=True)  # bob may only open a PR

    assert result.pr_url == f"{hub.url}/{REPO}/discussions/1" and result.revision == "refs/pr/1"
    assert hub.state.repos[REPO].refs["main"] == base.commit_oid
    refs = HfApi(endpoint=hub.url, token=BOB).list_repo_refs(REPO, include_pull_requests=True)
    assert [(ref.ref, ref.target_commit) for ref in refs.pull_requests] == [("refs/pr/1", result.commit_oid)]
    assert remote_files(hub, "refs/pr/1")["transformer/config.json"] == config_path.read_bytes()
    assert remote_files(hub, "main")["transformer/config.json"] != config_path.read_bytes()


def test_corrupted_remote_files_fail_verification(hub, converted):
    shard = sorted(p for p in local_files(converted) if p.startswith("transformer/diffusion_pytorch_model-"))[0]
    hub.state.faults.corrupt_on_commit = {shard, "transformer/config.json"}

    result = run_cli(converted, "--repo-id", REPO, "--token", ALICE, "--endpoint", hub.url)

    assert result.exit_code == VerificationError.exit_code, result.output
    assert shard in error_line(result) and "transformer/config.json" in error_line(result)
    head = hub.state.repos[REPO].refs["main"]
    check = HfApi(endpoint=hub.url, token=ALICE).verify_repo_checksums(REPO, revision=head, local_dir=converted)
    assert {m["path"] for m in check.mismatches} == {shard, "transformer/config.json"}


def test_transient_commit_failure_is_retried(hub, converted):
    hub.state.faults.fail_commits = 1
    result = push_to_hub(converted, REPO, token=ALICE, endpoint=hub.url)
    assert result.created_commit and hub.commit_count(REPO) == 2  # the initial commit and one upload


@pytest.mark.parametrize("token", [None, "hf_not_a_token"])
def test_missing_or_rejected_token(hub, converted, token):
    args = [converted, "--repo-id", REPO, "--endpoint", hub.url] + (["--token", token] if token else [])
    result = run_cli(*args)

    assert result.exit_code == AuthenticationError.exit_code == 4
    assert ("no Hugging Face token" in error_line(result)) == (token is None)
    assert (hub.state.requests == []) == (token is None)  # a missing token is known before any request
    assert REPO not in hub.state.repos


def test_permission_denied(hub, converted):
    result = run_cli(converted, "--repo-id", REPO, "--token", ALICE_READ, "--endpoint", hub.url)
    assert result.exit_code == PermissionDeniedError.exit_code == 7, result.output
    push_to_hub(converted, REPO, token=ALICE, endpoint=hub.url)
    with pytest.raises(PermissionDeniedError, match="403"):
        push_to_hub(converted, REPO, token=BOB, endpoint=hub.url)  # bob may open a PR, not commit


def test_not_found(hub, converted):
    result = run_cli(converted, "--repo-id", "ghost/tiny", "--token", ALICE, "--endpoint", hub.url)
    assert result.exit_code == NotFoundError.exit_code == 6, result.output
    push_to_hub(converted, REPO, token=ALICE, endpoint=hub.url)
    with pytest.raises(NotFoundError, match="refs/pr/9"):
        push_to_hub(converted, REPO, token=ALICE, endpoint=hub.url, revision="refs/pr/9")


def test_offline_and_unreachable(hub, converted, monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    result = run_cli(converted, "--repo-id", REPO, "--token", ALICE, "--endpoint", closed)
    assert result.exit_code == HubConnectionError.exit_code == 5, result.output
    assert closed in error_line(result)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubConnectionError, match="HF_HUB_OFFLINE"):
        push_to_hub(converted, REPO, token=ALICE, endpoint=hub.url)
    assert hub.state.requests == []


def test_dry_run_prints_manifest_and_card_without_network(hub, converted, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("dry run opened a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    result = run_cli(converted, "--repo-id", REPO, "--endpoint", hub.url, "--dry-run")

    assert result.exit_code == 0, result.output
    assert hub.state.requests == [] and not (converted / "README.md").exists()
    plan = prepare_push(converted, REPO)
    assert plan.card in result.output
    for path, content in local_files(converted).items():
        assert f"{hashlib.sha256(content).hexdigest()}  {len(content):>12}  {path}" in result.output
    card_line = f"{hashlib.sha256(plan.card.encode()).hexdigest()}  {len(plan.card.encode()):>12}  README.md"
    assert card_line in result.output


def test_existing_card_is_kept_unless_regenerated(hub, converted):
    own_card = "---\nlicense: mit\n---\n\n# My own words\n"
    (converted / "README.md").write_text(own_card)
    push_to_hub(converted, REPO, token=ALICE, endpoint=hub.url)
    assert remote_files(hub, "main")["README.md"].decode() == own_card

    push_to_hub(converted, REPO, token=ALICE, endpoint=hub.url, regenerate_card=True)
    assert "| 1 | dense | - | - |" in remote_files(hub, "main")["README.md"].decode()


def test_create_pr_with_revision_is_a_usage_error(hub, converted):
    result = run_cli(converted, "--repo-id", REPO, "--token", ALICE, "--create-pr", "--revision", "dev")
    assert result.exit_code == 2 and "--create-pr" in error_line(result)
    assert hub.state.requests == []


def index_of(folder: Path) -> Path:
    return folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json"


def drop_first_shard(folder: Path) -> None:
    shard = sorted(set(json.loads(index_of(folder).read_text())["weight_map"].values()))[0]
    (folder / "transformer" / shard).unlink()


def truncate_first_shard(folder: Path) -> None:
    shard = folder / "transformer" / sorted(set(json.loads(index_of(folder).read_text())["weight_map"].values()))[0]
    shard.write_bytes(shard.read_bytes()[:-16])


def forget_a_tensor(folder: Path) -> None:
    index = json.loads(index_of(folder).read_text())
    index["weight_map"].pop(sorted(index["weight_map"])[0])
    index_of(folder).write_text(json.dumps(index))


def strip_nabla(folder: Path) -> None:
    config = json.loads((folder / "transformer" / "config.json").read_text())
    del config["_nabla"]
    (folder / "transformer" / "config.json").write_text(json.dumps(config))


def load_as_dense(folder: Path) -> None:
    model_index = json.loads((folder / "model_index.json").read_text())
    model_index["transformer"] = ["diffusers", "WanTransformer3DModel"]
    (folder / "model_index.json").write_text(json.dumps(model_index))


def break_report(folder: Path) -> None:
    (folder / "nabla_reports" / "eval.json").write_text('{"summary": ')


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (drop_first_shard, "which is missing"),
        (truncate_first_shard, "not readable safetensors"),
        (forget_a_tensor, "does not list"),
        (strip_nabla, "no '_nabla' entry"),
        (load_as_dense, "diffusers.WanTransformer3DModel"),
        (break_report, "eval.json is not valid JSON"),
    ],
)
def test_invalid_checkpoint_fails_before_any_request(hub, converted, damage, message):
    damage(converted)
    result = run_cli(converted, "--repo-id", REPO, "--token", ALICE, "--endpoint", hub.url)
    assert result.exit_code == InvalidCheckpointError.exit_code == 3, result.output
    assert message in error_line(result)
    assert hub.state.requests == []


def test_round_trip_stock_pipeline_matches_local(hub, converted, tmp_path):
    from diffusers import WanPipeline

    pushed = push_to_hub(converted, REPO, token=ALICE, endpoint=hub.url)
    snapshot = snapshot_download(REPO, endpoint=hub.url, token=ALICE, cache_dir=tmp_path / "cache")
    assert Path(snapshot).name == pushed.commit_oid

    remote_pipe = WanPipeline.from_pretrained(snapshot)
    local_pipe = WanPipeline.from_pretrained(converted)
    assert isinstance(remote_pipe.transformer, NablaWanTransformer3DModel)
    assert remote_pipe.transformer.config["_nabla"] == local_pipe.transformer.config["_nabla"]
    for pipe in (remote_pipe, local_pipe):
        pipe.set_progress_bar_config(disable=True)
    assert torch.equal(generate(remote_pipe, seed=3), generate(local_pipe, seed=3))


def test_links_leaving_the_folder_are_refused_and_never_uploaded(hub, converted, tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0")
    (converted / "README.md").symlink_to(secret)
    (converted / "vae" / "extra.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")  # dangling

    for dry_run in (["--dry-run"], []):
        result = run_cli(converted, "--repo-id", REPO, "--token", ALICE, "--endpoint", hub.url, *dry_run)
        assert result.exit_code == InvalidCheckpointError.exit_code, result.output
        line = error_line(result)
        assert "README.md -> " in line and "vae/extra.safetensors -> " in line and "root:x" not in result.output
    assert hub.state.requests == [] and REPO not in hub.state.repos
    assert secret.read_text() == "root:x:0:0" and (converted / "README.md").is_symlink()


def rewrite_a_weight(folder: Path, value: float) -> None:
    from safetensors.torch import load_file, save_file

    shard = sorted((folder / "transformer").glob("diffusion_pytorch_model-*.safetensors"))[0]
    tensors = load_file(shard)
    tensors[sorted(tensors)[0]].view(-1)[0] = value
    save_file(tensors, shard, metadata={"format": "pt"})


def test_weights_edited_after_conversion_are_refused_unless_restamped(hub, converted):
    rewrite_a_weight(converted, 0.123)
    result = run_cli(converted, "--repo-id", REPO, "--token", ALICE, "--endpoint", hub.url)
    assert result.exit_code == InvalidCheckpointError.exit_code, result.output
    assert "diffusion_pytorch_model-00001-of-00004.safetensors (changed)" in error_line(result)
    assert "--restamp" in error_line(result) and hub.state.requests == []

    marker_before = (converted / MARKER).read_text()
    dry = run_cli(converted, "--repo-id", REPO, "--dry-run", "--restamp")
    assert dry.exit_code == 0 and "re-stamped" in dry.output
    assert (converted / MARKER).read_text() == marker_before  # a dry run writes nothing

    result = run_cli(converted, "--repo-id", REPO, "--token", ALICE, "--endpoint", hub.url, "--restamp")
    assert result.exit_code == 0, result.output
    recorded = json.loads((converted / MARKER).read_text())["weights"]
    assert recorded == {
        p: hashlib.sha256(c).hexdigest() for p, c in local_files(converted).items() if p.endswith(".safetensors")
    }
    assert run_cli(converted, "--repo-id", REPO, "--dry-run").exit_code == 0  # consistent again


def test_folder_without_manifest_needs_restamp(hub, converted):
    (converted / MARKER).unlink()
    result = run_cli(converted, "--repo-id", REPO, "--dry-run")
    assert result.exit_code == InvalidCheckpointError.exit_code and "no weights manifest" in error_line(result)
    assert run_cli(converted, "--repo-id", REPO, "--dry-run", "--restamp").exit_code == 0


def test_non_finite_weights_are_refused(hub, converted):
    rewrite_a_weight(converted, float("nan"))
    result = run_cli(converted, "--repo-id", REPO, "--token", ALICE, "--endpoint", hub.url, "--restamp")
    assert result.exit_code == InvalidCheckpointError.exit_code, result.output
    assert "1 tensors hold NaN or inf" in error_line(result) and hub.state.requests == []


def test_failed_push_leaves_the_folder_as_it_was(hub, converted):
    before = local_files(converted)
    result = run_cli(converted, "--repo-id", REPO, "--token", ALICE_READ, "--endpoint", hub.url)
    assert result.exit_code == PermissionDeniedError.exit_code
    assert local_files(converted) == before and not (converted / "README.md").exists()

    (converted / "README.md").write_text("---\nlicense: mit\n---\n# mine\n")
    result = run_cli(converted, "--repo-id", REPO, "--token", ALICE_READ, "--endpoint", hub.url, "--regenerate-card")
    assert result.exit_code == PermissionDeniedError.exit_code
    assert (converted / "README.md").read_text() == "---\nlicense: mit\n---\n# mine\n"


@pytest.mark.parametrize("token", [ALICE + "\nhf_second_line", ALICE + " ", "hf_tab\there", "hf_ünï"])
def test_unusable_token_is_refused_unprinted_before_any_request(hub, converted, token):
    result = run_cli(converted, "--repo-id", REPO, "--token", token, "--endpoint", hub.url)
    assert result.exit_code == AuthenticationError.exit_code == 4, result.output
    assert "token" in error_line(result)
    for part in token.split():
        assert part not in result.output
    assert hub.state.requests == []


@pytest.mark.parametrize(
    "repo_id", ["tiny-nabla", "alice/tiny/nabla", "alice/tiny..nabla", "alice/tiny nabla", "-alice/x", "alice/", ""]
)
@pytest.mark.parametrize("dry_run", [False, True])
def test_malformed_repo_id_is_refused_before_any_request(hub, converted, repo_id, dry_run):
    result = run_cli(converted, "--repo-id", repo_id, "--token", ALICE, "--endpoint", hub.url, *["--dry-run"] * dry_run)
    assert result.exit_code == InvalidArgumentsError.exit_code == 2, result.output
    assert "--repo-id" in error_line(result)
    assert hub.state.requests == []


@pytest.mark.parametrize("endpoint", ["htp://hub.example", "hub.example", "http://", "http://hub example", "ftp://x"])
def test_malformed_endpoint_is_refused_without_retries(hub, converted, endpoint, monkeypatch):
    waits = []
    monkeypatch.setattr(push_module.time, "sleep", waits.append)
    result = run_cli(converted, "--repo-id", REPO, "--token", ALICE, "--endpoint", endpoint)
    assert result.exit_code == InvalidArgumentsError.exit_code == 2, result.output
    assert "endpoint" in error_line(result) and waits == []


def test_unexpected_client_error_is_one_line_without_the_token(hub, converted, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError(f"Illegal header value b'Bearer {ALICE}'")

    monkeypatch.setattr(push_module.HfApi, "repo_info", broken)
    result = run_cli(converted, "--repo-id", REPO, "--token", ALICE, "--endpoint", hub.url)
    assert result.exit_code == 1 and "Illegal header value" in error_line(result)
    assert ALICE not in result.output
