"""Publishing to the Hugging Face Hub: pre-upload checks, model card, upload, checksum verification.

Its failures, one class per cause with its exit code, are in nabla_convert.errors.
"""

from nabla_convert.hub.card import generate_card
from nabla_convert.hub.checks import Checkpoint, ManifestEntry, build_manifest, check_checkpoint
from nabla_convert.hub.push import PushPlan, PushResult, prepare_push, push_to_hub

__all__ = [
    "Checkpoint",
    "ManifestEntry",
    "PushPlan",
    "PushResult",
    "build_manifest",
    "check_checkpoint",
    "generate_card",
    "prepare_push",
    "push_to_hub",
]
