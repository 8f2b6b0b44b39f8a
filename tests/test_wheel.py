"""The package works installed from a real wheel, not only as the editable checkout.

A wheel is built from the checkout (``napari_e2enet/napari.yaml`` and ``napari_e2enet/resources/``
are real files there) and installed with ``--no-deps`` into a fresh virtual environment. That environment borrows the dependencies (torch, numpy, npe2, …)
from the interpreter running the tests through a ``.pth`` file, so nothing is downloaded; such a
``.pth`` line only appends the folder to ``sys.path`` and does not run the ``.pth`` files inside
it, so the editable install's own ``.pth`` (which points at the checkout) stays inactive and the
wheel's copy is the one imported — checked, not assumed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "napari_e2enet"
BIN = "Scripts" if os.name == "nt" else "bin"
EXE = ".exe" if os.name == "nt" else ""

pytestmark = pytest.mark.skipif(importlib.util.find_spec("build") is None, reason="needs the 'build' package")


def _run(cmd: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None,
         ) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env=env, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _bundled_in_checkout() -> list[str]:
    models = PACKAGE / "resources" / "models"
    if not models.is_dir():
        return []
    return sorted(p.name for p in models.iterdir() if (p / "model_card.json").is_file())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--wheel", "--outdir", out]
    if importlib.util.find_spec("hatchling") is not None:
        cmd.append("--no-isolation")  # else build installs hatchling in an isolated env (package index)
    _run([*cmd, ROOT], cwd=out)
    wheels = sorted(out.glob("napari_e2enet-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; dependencies come from this interpreter's site-packages."""
    root = tmp_path_factory.mktemp("installed")
    env_dir = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir], cwd=root)
    python = env_dir / BIN / f"python{EXE}"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=root).stdout.strip())
    assert purelib.is_dir() and env_dir.resolve() in purelib.resolve().parents
    borrowed = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (purelib / "_borrowed_site_packages.pth").write_text("".join(f"{p}\n" for p in borrowed))
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # --ignore-installed: pip sees the checkout's editable install through the borrowed folder and
    # must neither treat it as "already satisfied" nor try to uninstall it.
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel], cwd=root, env=env)
    return env_dir


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working directory outside the checkout (so ``''`` on sys.path cannot find the sources)."""
    assert ROOT not in tmp_path.resolve().parents
    return tmp_path


def test_wheel_carries_manifest_sample_and_bundled_models(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "napari_e2enet/napari.yaml" in names
        assert zf.read("napari_e2enet/napari.yaml") == (PACKAGE / "napari.yaml").read_bytes()
        samples = {p.name for p in (PACKAGE / "resources" / "sample").glob("*.nii.gz")}
        assert samples, "the checkout has no sample volumes"
        for name in samples:
            assert f"napari_e2enet/resources/sample/{name}" in names
        assert "napari_e2enet/resources/sample/labels.json" in names
        for model in _bundled_in_checkout():
            folder = f"napari_e2enet/resources/models/{model}"
            assert f"{folder}/model_card.json" in names and f"{folder}/model.safetensors" in names, model
            card = json.loads(zf.read(f"{folder}/model_card.json"))
            assert hashlib.sha256(zf.read(f"{folder}/model.safetensors")).hexdigest() == card["sha256"], model
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        text = zf.read(entry_points).decode()
        assert "napari-e2enet = napari_e2enet.cli:main" in text
        assert "napari-e2enet = napari_e2enet:napari.yaml" in text
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def _is_link(info: zipfile.ZipInfo) -> bool:
    return (info.external_attr >> 16) & 0o170000 == 0o120000  # S_IFLNK in the entry's Unix mode


def test_wheel_holds_only_what_users_need(wheel: Path):
    """No links, no tests/benchmarks/scripts/notebooks, no README screenshots; the manifest, the C
    kernels and every file of the package's folder are there (nothing the plugin reads is left out)."""
    with zipfile.ZipFile(wheel) as zf:
        infos = zf.infolist()
    names = {i.filename for i in infos}
    assert [i.filename for i in infos if _is_link(i)] == []
    top = {n.split("/")[0] for n in names}
    assert top == {"napari_e2enet", f"napari_e2enet-{wheel.name.split('-')[1]}.dist-info"}, top
    assert not [n for n in names if n.endswith(".png") or "/screenshots/" in n], "screenshots belong to docs/"
    for name in ("napari.yaml", "inference/cpu/kernels.c", "inference/cpu/kernels.h", "inference/cpu/omp_probe.c",
                 "resources/sample/LICENSE-MNI152.txt"):
        assert f"napari_e2enet/{name}" in names, name
    tracked = subprocess.run(["git", "ls-files", "napari_e2enet"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0 and tracked.stdout:
        missing = [f for f in tracked.stdout.split() if f not in names]
        assert missing == [], f"tracked package files not in the wheel: {missing}"
    size = sum(i.file_size for i in infos)
    weights = sum(i.file_size for i in infos if i.filename.endswith(".safetensors"))
    assert size - weights < 4_000_000, f"{(size - weights) / 1e6:.1f} MB besides the bundled weights"


def test_sdist_holds_no_links_and_the_package_files(tmp_path: Path):
    import tarfile

    cmd = [sys.executable, "-m", "build", "--sdist", "--outdir", tmp_path]
    if importlib.util.find_spec("hatchling") is not None:
        cmd.append("--no-isolation")
    _run([*cmd, ROOT], cwd=tmp_path)
    (sdist,) = tmp_path.glob("napari_e2enet-*.tar.gz")
    with tarfile.open(sdist) as tf:
        members = tf.getmembers()
    assert [m.name for m in members if m.issym() or m.islnk()] == []
    names = {m.name.split("/", 1)[1] for m in members if "/" in m.name}
    for name in ("napari_e2enet/napari.yaml", "napari_e2enet/inference/cpu/kernels.c", "pyproject.toml", "LICENSE"):
        assert name in names, name
    assert not [n for n in names if n.startswith(("resources/", "napari.yaml", "docs/"))]


def test_installed_package_is_the_wheel_not_the_checkout(venv: Path, wheel: Path, outside: Path):
    code = (
        "import importlib.metadata as md, json, pathlib, napari_e2enet\n"
        "from napari_e2enet import bundled\n"
        "dist = md.distribution('napari-e2enet')\n"
        "print(json.dumps({'module': str(pathlib.Path(napari_e2enet.__file__).resolve()),\n"
        "  'dist': str(pathlib.Path(dist.locate_file('napari_e2enet')).resolve()), 'version': dist.version,\n"
        "  'samples': [str(p.resolve()) for p in bundled.sample_files().values()],\n"
        "  'manifest_is_link': (pathlib.Path(napari_e2enet.__file__).parent / 'napari.yaml').is_symlink(),\n"
        "  'models': bundled.list_bundled_models()}))\n"
    )
    info = json.loads(_run([venv / BIN / f"python{EXE}", "-c", code], cwd=outside).stdout)
    env_dir = venv.resolve()
    module = Path(info["module"])
    assert env_dir in module.parents, f"imported {module}, not the installed wheel"
    assert env_dir in Path(info["dist"]).parents
    assert info["version"] == wheel.name.split("-")[1]
    for sample in map(Path, info["samples"]):
        assert sample.is_file() and env_dir in sample.parents, sample
    assert not info["manifest_is_link"]
    assert info["models"] == _bundled_in_checkout()


def test_installed_console_script_runs(venv: Path, outside: Path):
    script = venv / BIN / f"napari-e2enet{EXE}"
    assert script.is_file()
    out = _run([script, "--help"], cwd=outside)
    assert "usage: napari-e2enet" in out.stdout
    for command in ("info", "train", "predict", "evaluate", "demo"):
        assert command in out.stdout


def test_installed_manifest_passes_npe2_validate(venv: Path, outside: Path):
    pytest.importorskip("npe2")
    python = venv / BIN / f"python{EXE}"
    code = "from npe2 import PluginManifest; print(PluginManifest.from_distribution('napari-e2enet').name)"
    assert _run([python, "-c", code], cwd=outside).stdout.strip() == "napari-e2enet"
    out = _run([python, "-m", "npe2", "validate", "napari-e2enet", "--imports"], cwd=outside)
    assert "valid" in out.stdout.lower()


def test_installed_demo_segments_the_sample(venv: Path, outside: Path):
    if "mni152-tissue" not in _bundled_in_checkout():
        pytest.skip("no bundled model in this checkout (napari_e2enet/resources/models/mni152-tissue/ is not there)")
    nibabel = pytest.importorskip("nibabel")
    out_dir = outside / "demo"
    _run([venv / BIN / f"napari-e2enet{EXE}", "demo", "--out", out_dir, "--device", "cpu"], cwd=outside)
    report = json.loads((out_dir / "report.json").read_text())
    classes = {k: v for k, v in report["dice"].items() if k != "mean"}
    assert set(classes) == {"CSF/other", "grey matter", "white matter"}
    assert 0.5 < report["dice"]["mean"] <= 1.0, report["dice"]
    labels = nibabel.load(out_dir / report["labels"])
    sample = nibabel.load(PACKAGE / "resources" / "sample" / "mni152_t1_2mm.nii.gz")
    assert labels.shape == sample.shape
    assert (labels.affine == sample.affine).all()
    values = set(map(int, np.unique(np.asarray(labels.dataobj))))
    assert values <= {0, 1, 2, 3} and {1, 2, 3} <= values
    assert (out_dir / "overlay.png").stat().st_size > 0
    assert not [p.name for p in out_dir.iterdir() if p.name.endswith(".tmp")]


def test_installed_wheel_builds_and_runs_the_c_kernels(venv: Path, wheel: Path, outside: Path):
    """The kernels ship as C source in the wheel and the installed copy compiles and runs them."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for name in ("kernels.c", "kernels.h", "omp_probe.c", "build.py", "bindings.py"):
        assert f"napari_e2enet/inference/cpu/{name}" in names, name
    from napari_e2enet.inference.cpu import find_compiler

    if find_compiler() is None:
        pytest.skip("no C compiler here")
    code = (
        "import json, pathlib, sys, torch\n"
        "from napari_e2enet.inference.cpu import bindings\n"
        "lib = bindings.load(cache_dir=pathlib.Path(sys.argv[1]), warnings_as_errors=True)\n"
        "x = torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last)\n"
        "y = x.clone()\n"
        "lib.cl_norm_act(x=y, scale=torch.full((4,), 2.0), shift=torch.ones(4), slope=0.1)\n"
        "ref = torch.nn.functional.leaky_relu(2 * x + 1, 0.1)\n"
        "print(json.dumps({'module': str(pathlib.Path(bindings.__file__).resolve()), 'family': lib.family,\n"
        "  'library': str(lib.path), 'error': float((y - ref).abs().max())}))\n"
    )
    info = json.loads(_run([venv / BIN / f"python{EXE}", "-c", code, outside / "cache"], cwd=outside).stdout)
    assert venv.resolve() in Path(info["module"]).parents, f"imported {info['module']}, not the installed wheel"
    assert Path(info["library"]).parent == outside / "cache" and info["error"] < 1e-6
