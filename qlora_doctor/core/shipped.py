"""Files the tool reads at run time that live at the top of the repository - the recipes (with their
data), matrix.yaml, the matrix records and the lockfiles - found the same way in a checkout, an editable
install and an installed wheel.

A wheel carries them inside the package, under `qlora_doctor/shipped/` (setup.py copies them there at
build time, so the repository keeps its layout). A checkout or an editable install has no such folder
and reads them from the repository itself. A user's own paths (`./recipes`, `--combos`, `--results`,
QLORA_DOCTOR_RESULTS, a recipe path) are looked at first by the callers; this is the fallback.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_NAMES = ("recipes", "matrix.yaml", "matrix-results", "lockfiles")
"""What setup.py copies into the wheel, relative to the repository root."""

_PACKAGE = Path(__file__).resolve().parent.parent
_IN_WHEEL = _PACKAGE / "shipped"
_CHECKOUT = _PACKAGE.parent


def shipped_path(name: str) -> Path:
    """Where the shipped `name` (one of SHIPPED_NAMES) is: inside the installed package, else in the
    checkout the package is imported from. The path may not exist (a checkout without records)."""
    if name not in SHIPPED_NAMES:
        raise ValueError(f"{name!r} is not shipped; one of {', '.join(SHIPPED_NAMES)}")
    inside = _IN_WHEEL / name
    return inside if inside.exists() else _CHECKOUT / name


def checkout_root() -> Path | None:
    """The repository the package is imported from (a checkout or an editable install), None when it runs
    from an installed wheel (the tool's own wheel can only be built from a checkout)."""
    return _CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() and not _IN_WHEEL.exists() else None
