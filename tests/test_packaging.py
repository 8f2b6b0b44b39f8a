"""What PyPI and the napari hub show: declared dependencies the code uses, classifiers, README images
that exist in the repository and are not shipped in the wheel."""

from __future__ import annotations

import re
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# distribution name -> module the code imports (where they differ)
IMPORT_NAME = {"pyyaml": "yaml", "pynrrd": "nrrd", "dynamic-network-architectures": "dynamic_network_architectures"}
# used without an import statement: pydicom loads the pylibjpeg decoders as plugins by itself;
# scripts/prepare_sample.py reads the MNI152 files inside the nilearn wheel (importlib.resources)
NOT_IMPORTED = {"pylibjpeg", "pylibjpeg-libjpeg", "nilearn"}


def _requirement_name(spec: str) -> str:
    return re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0].lower()


def _imported_modules(folders: list[Path]) -> set[str]:
    found: set[str] = set()
    pattern = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", re.M)
    for folder in folders:
        for source in folder.rglob("*.py"):
            found |= set(pattern.findall(source.read_text(encoding="utf-8")))
    return found


def test_every_declared_dependency_is_imported_by_the_package():
    used = _imported_modules([ROOT / "napari_e2enet", ROOT / "scripts"])
    extras = PYPROJECT["optional-dependencies"]
    declared = [*PYPROJECT["dependencies"], *extras["gui"], *extras["formats"], *extras["bench"]]
    unused = []
    for spec in declared:
        name = _requirement_name(spec)
        if name not in NOT_IMPORTED and IMPORT_NAME.get(name, name.replace("-", "_")) not in used:
            unused.append(name)
    assert unused == [], f"declared but never imported: {unused}"


def test_classifiers_cover_framework_python_os_and_status():
    classifiers = set(PYPROJECT["classifiers"])
    assert "Framework :: napari" in classifiers
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    assert any(c.startswith("Operating System :: ") for c in classifiers)
    low = PYPROJECT["requires-python"].removeprefix(">=")
    assert f"Programming Language :: Python :: {low}" in classifiers


def test_readme_images_exist_outside_the_package():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", readme)
    assert images, "the README shows no pictures"
    for link in images:
        if link.startswith(("http://", "https://")):
            continue
        path = ROOT / link
        assert path.is_file(), link
        assert "napari_e2enet" not in path.relative_to(ROOT).parts, f"{link}: a README picture would ship in the wheel"
