"""`nabla-convert push`: a thin Click layer over nabla_convert.hub.push_to_hub and prepare_push."""

from __future__ import annotations

from pathlib import Path

import click

from nabla_convert.errors import PUSH_ERRORS
from nabla_convert.hub.push import prepare_push, push_to_hub

EXIT_CODE_HELP = "\b\nExit codes:\n" + "\n".join(
    f"  {cls.exit_code}  {cls.__doc__.splitlines()[0]}" for cls in PUSH_ERRORS
)


@click.command(epilog=EXIT_CODE_HELP)
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="Hub repository, namespace/name; created if missing.")
@click.option("--private", is_flag=True, help="Create the repository private (an existing one keeps its visibility).")
@click.option("--revision", default=None, help="Branch to push to (created from main if missing), or refs/pr/N.")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option("--token", default=None, help="Hub token; default: HF_TOKEN or the token saved by `hf auth login`.")
@click.option("--endpoint", default=None, help="Hub endpoint; default: HF_ENDPOINT or https://huggingface.co.")
@click.option("--commit-message", default=None, help="Commit title.")
@click.option("--dry-run", is_flag=True, help="Check the folder, print the manifest and model card; no network.")
@click.option("--regenerate-card", is_flag=True, help="Replace the folder's README.md with a generated card.")
@click.option(
    "--restamp",
    is_flag=True,
    help="Accept weights changed since convert/adapt recorded their sha256, and record them anew after the push.",
)
def push(
    folder: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    create_pr: bool,
    token: str | None,
    endpoint: str | None,
    commit_message: str | None,
    dry_run: bool,
    regenerate_card: bool,
    restamp: bool,
) -> None:
    """Check a converted checkpoint FOLDER, upload it with a model card, and verify the Hub's checksums."""
    if dry_run:
        plan = prepare_push(
            folder, repo_id, revision=revision, create_pr=create_pr, regenerate_card=regenerate_card, restamp=restamp
        )
        click.echo(plan.describe())
        click.echo("\nDry run: nothing was sent and nothing was written.")
        return
    result = push_to_hub(
        folder,
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        token=token,
        endpoint=endpoint,
        commit_message=commit_message,
        regenerate_card=regenerate_card,
        restamp=restamp,
    )
    click.echo(result.summary())
