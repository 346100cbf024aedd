"""The data folders nabla-convert ships: recipes/ and calibration/.

They are top-level folders of the repository (the source of truth); a wheel carries a copy in nabla_convert/data/
(see pyproject.toml). `shipped_folder` finds them in either layout: an installed wheel, or a checkout (editable
install, PYTHONPATH).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def shipped_folder(name: str) -> Path:
    """The shipped folder `name` ("recipes" or "calibration"): inside the installed package, else the checkout's."""
    installed = PACKAGE / "data" / name
    return installed if installed.is_dir() else PACKAGE.parent / name
