"""mypy finds no error in the core (``napari_e2enet`` without ``_napari``), and the check really checks.

The configuration is pyproject.toml's ``[tool.mypy]``; the test runs ``python -m mypy`` with it on the
package as it is (every error is listed in the failure), then on a copy of one module with a
planted error, which must be reported: a check that cannot fail would pass silently forever. Both
runs share mypy's cache, kept in pytest's cache folder (``.pytest_cache/d/mypy``, git-ignored) so
that a second run of the suite checks only what changed: a cold run (a fresh clone, CI) costs ~14 s
of CPU on the 2-core EPYC, a warm one ~2 s. Not a skip when mypy is missing: it is in the ``test``
extra, and a missing check must fail.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
_ERROR = re.compile(r"^(?P<file>[^:\n]+\.py):(?P<line>\d+): error: (?P<text>.*)$", re.MULTILINE)


@pytest.fixture(scope="module")
def mypy_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    return cache.mkdir("mypy") if cache is not None else tmp_path_factory.mktemp("mypy-cache")


def _mypy(cwd: Path, cache: Path) -> tuple[subprocess.CompletedProcess[str], list[re.Match[str]]]:
    """``mypy napari_e2enet`` in ``cwd`` with the project's configuration; the process and its error lines."""
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(PYPROJECT), "--cache-dir", str(cache),
         "--no-error-summary", "--no-pretty", "napari_e2enet"],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )
    return proc, list(_ERROR.finditer(proc.stdout))


def test_core_has_no_type_errors(mypy_cache: Path) -> None:
    proc, errors = _mypy(ROOT, mypy_cache)
    listed = "\n".join(m.group(0) for m in errors)
    assert not errors, f"mypy found {len(errors)} errors in the core:\n{listed}"
    # exit 1 with no parsable error line would be a crash or a config error: show what it said
    assert proc.returncode == 0, f"mypy exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"


def test_planted_error_is_reported(mypy_cache: Path, tmp_path: Path) -> None:
    """errors.py alone (it imports nothing of the package) plus an *unannotated* function with an
    error inside: pyproject.toml's ``disallow_untyped_defs`` reports the function and its
    ``check_untyped_defs`` the body (plain mypy would say nothing), so this also proves the
    configuration is the one in use."""
    package = tmp_path / "napari_e2enet"
    package.mkdir()
    (package / "__init__.py").write_text("")
    source = (ROOT / "napari_e2enet" / "errors.py").read_text()
    planted = "\n\ndef _planted():\n    count: int = 'three'\n    return count\n"
    (package / "errors.py").write_text(source + planted)
    line = (source + planted).splitlines().index("    count: int = 'three'") + 1  # def is the line before

    proc, errors = _mypy(tmp_path, mypy_cache)
    found = [(Path(m.group("file")).as_posix(), int(m.group("line")), m.group("text")) for m in errors]
    assert proc.returncode == 1, f"mypy exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    codes = sorted((file, at, text.rsplit("[", 1)[-1].rstrip("]")) for file, at, text in found)
    assert codes == [("napari_e2enet/errors.py", line - 1, "no-untyped-def"),
                     ("napari_e2enet/errors.py", line, "assignment")], found
