"""Publishing to the Hugging Face Hub: pre-upload checks, model card, upload, checksum verification."""

from nabla_convert.errors import (
    AuthenticationError,
    HubConnectionError,
    InvalidArgumentsError,
    InvalidCheckpointError,
    NotFoundError,
    PermissionDeniedError,
    PushError,
    VerificationError,
)
from nabla_convert.hub.card import generate_card
from nabla_convert.hub.checks import Checkpoint, ManifestEntry, build_manifest, check_checkpoint
from nabla_convert.hub.push import PushPlan, PushResult, prepare_push, push_to_hub

__all__ = [
    "AuthenticationError",
    "Checkpoint",
    "HubConnectionError",
    "InvalidArgumentsError",
    "InvalidCheckpointError",
    "ManifestEntry",
    "NotFoundError",
    "PermissionDeniedError",
    "PushError",
    "PushPlan",
    "PushResult",
    "VerificationError",
    "build_manifest",
    "check_checkpoint",
    "generate_card",
    "prepare_push",
    "push_to_hub",
]
