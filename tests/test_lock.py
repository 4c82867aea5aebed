"""The environment the tests run in is exactly the lock: a drifting install fails here."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from scripts import check_lock
from tests.helpers import REPO


def test_installed_packages_equal_the_lock():
    problems = check_lock.differences()
    assert not problems, "\n".join(problems)


def test_nothing_installed_misses_a_requirement():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True).stdout
    # torchaudio/torchcodec are installed without their dependencies on purpose (requirements/no-deps.txt).
    broken = [line for line in out.splitlines() if line and not re.match(r"(torchaudio|torchcodec) |No broken", line)]
    assert not broken, broken


def test_a_drifted_package_is_reported(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy==1.26.4  # via x\nfoo==1.0 ; sys_platform == 'nowhere'\n")
    none = tmp_path / "none.txt"
    none.write_text("")
    have = {"numpy": "1.26.3", "extra-pkg": "2.0", "torch": "2.13.0+cpu"}
    problems = check_lock.differences(have, lock, none)
    assert "numpy==1.26.3 is installed; the lock has 1.26.4" in problems
    assert "extra-pkg==2.0 is installed but not in the lock" in problems
    assert "torch==2.13.0+cpu is installed but not in the lock" in problems
    assert check_lock.differences({"numpy": "1.26.4"}, lock, none) == []


def test_a_local_build_label_matches_its_release(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("torch==2.13.0\n")
    none = tmp_path / "none.txt"
    none.write_text("")
    assert check_lock.differences({"torch": "2.13.0+cpu"}, lock, none) == []
    assert check_lock.differences({"torch": "2.14.0+cpu"}, lock, none)


def test_the_lock_pins_every_direct_dependency_exactly():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    direct = list(project["dependencies"]) + [d for deps in project["optional-dependencies"].values() for d in deps]
    text = (REPO / "requirements" / "lock.txt").read_text()
    locked = {canonicalize_name(m) for m in re.findall(r"^([A-Za-z0-9_.-]+)==", text, re.M)}
    missing = sorted({canonicalize_name(Requirement(d).name) for d in direct} - locked)
    assert not missing, f"not in requirements/lock.txt (run scripts/lock.sh): {missing}"
    loose = [line for line in text.splitlines() if line and not line.startswith("#") and "==" not in line.split("#")[0]]
    assert not loose, loose
    # torch: one version for every platform, each taking its own build of it.
    assert re.search(r"^torch==2\.13\.0 ", text, re.M)


def test_every_installer_uses_the_lock():
    setup = (REPO / "setup_gpu_service.sh").read_text()
    assert 'LOCK=requirements/lock.txt' in setup and '-c "$LOCK"' in setup
    for dockerfile in ("runtime/Dockerfile", "evaluator/Dockerfile"):
        text = (REPO / dockerfile).read_text().replace("\\\n", " ")
        installs = [line for line in text.splitlines() if "pip install" in line]
        assert installs and all("-c requirements/lock.txt" in line for line in installs), (dockerfile, installs)
        assert re.search(r"^COPY .*requirements/lock\.txt", text, re.M), dockerfile
    test_cmd = (REPO / "scripts" / "test.sh").read_text()
    assert "setup_gpu_service.sh" in test_cmd
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()
