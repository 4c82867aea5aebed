"""Compare the installed packages with the lock: exit 1 and list every difference.

    python scripts/check_lock.py            # the running interpreter's environment
Used by setup_gpu_service.sh after installing and by tests/test_lock.py.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements" / "lock.txt"
NO_DEPS = REPO / "requirements" / "no-deps.txt"
PROJECT = "avatar-stack"
# Installers themselves are pinned by setup_gpu_service.sh, not by the resolution.
IGNORED = {"pip", PROJECT}


def read_pins(path: Path) -> dict[str, str]:
    """name -> exact version of each requirement in a lock file whose marker holds here."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        (spec,) = req.specifier
        if spec.operator != "==":
            raise ValueError(f"{path.name}: {line!r} is not an exact pin")
        pins[canonicalize_name(req.name)] = spec.version
    return pins


def installed() -> dict[str, str]:
    """name -> version of every distribution in this environment."""
    return {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}


def _same(locked: str, have: str) -> bool:
    # A local build label (torch 2.13.0+cpu) is that platform's build of the locked release.
    return Version(have).public == Version(locked).public if "+" in have else Version(have) == Version(locked)


def differences(have: dict[str, str] | None = None, lock: Path = LOCK, no_deps: Path = NO_DEPS) -> list[str]:
    """Every installed package that the locks do not pin at its installed version.

    The reverse (a locked requirement of an installed package that is missing) is `pip check`'s
    job; setup_gpu_service.sh and tests/test_lock.py run both.
    """
    have = installed() if have is None else have
    pins = read_pins(lock)
    extra = read_pins(no_deps)
    problems = [f"{name} is pinned in both {lock.name} and {no_deps.name}" for name in sorted(set(pins) & set(extra))]
    pins.update(extra)
    for name, version in sorted(have.items()):
        if name in IGNORED:
            continue
        if name not in pins:
            problems.append(f"{name}=={version} is installed but not in the lock")
        elif not _same(pins[name], version):
            problems.append(f"{name}=={version} is installed; the lock has {pins[name]}")
    return problems


def main() -> int:
    problems = differences()
    for line in problems:
        print(f"[lock] {line}", file=sys.stderr)
    if problems:
        print("[lock] the environment differs from requirements/lock.txt; re-run ./setup_gpu_service.sh", file=sys.stderr)
        return 1
    print(f"[lock] {len(installed()) - 1} installed packages match the lock")
    return 0


if __name__ == "__main__":
    sys.exit(main())
