"""A failed ``predict`` leaves no empty output folder behind, and never removes the user's.

``predict -o FOLDER`` makes the folder (and any missing parents) before loading the model, so that
the output location is checked before minutes of work. A run that then fails before writing any
case (a bad --model, a backend that cannot be had) used to leave that empty folder: it is removed
again, but only the folders predict made itself and only while they are empty.
"""

from __future__ import annotations

import pytest

from napari_e2enet.bundled import sample_files
from napari_e2enet.cli import main
from napari_e2enet.inference import fastpath

MISSING_MODEL = "no-such-model.safetensors"


def _predict(out, capsys, *extra: str) -> tuple[int, list[str]]:
    code = main(["predict", "-i", str(sample_files()["image"]), "-o", str(out), *extra])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_bad_model_removes_the_folders_predict_made(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "labels"
    code, err = _predict(out, capsys, "--model", str(tmp_path / MISSING_MODEL))
    assert code == 2 and "no such model file" in err[-1]
    assert list(tmp_path.iterdir()) == []  # labels, deeper and new: all made by predict, all gone


def test_an_unavailable_backend_removes_the_folder_predict_made(tmp_path, monkeypatch, capsys):
    """The failure comes in the first case, after its image was read: still nothing written."""
    monkeypatch.setattr(fastpath, "kernel_status", lambda: (None, "no C compiler here"))
    out = tmp_path / "labels"
    code, err = _predict(out, capsys, "--backend", "sparse")
    assert code == 2 and "sparse CPU kernels cannot be used" in err[-1]
    assert not out.exists()


@pytest.mark.parametrize("content", [None, "notes.txt"])
def test_a_folder_the_user_had_stays_with_its_content(tmp_path, capsys, content):
    out = tmp_path / "labels"
    out.mkdir()
    if content is not None:
        (out / content).write_text("the user's\n")
    code, _ = _predict(out, capsys, "--model", str(tmp_path / MISSING_MODEL))
    assert code == 2 and out.is_dir()
    assert [p.name for p in out.iterdir()] == ([] if content is None else [content])
    if content is not None:
        assert (out / content).read_text() == "the user's\n"


def test_a_made_parent_that_gained_a_file_stays(tmp_path, capsys, monkeypatch):
    """Removal stops at the first folder that is not empty (here a file appeared in a parent while
    predict ran): that folder and the ones above it stay."""
    from napari_e2enet import cli

    out = tmp_path / "new" / "labels"
    real = cli._predict_jobs

    def jobs_then_a_file_appears(args, created):
        result = real(args, created)
        (tmp_path / "new" / "other.txt").write_text("someone else's\n")
        return result

    monkeypatch.setattr(cli, "_predict_jobs", jobs_then_a_file_appears)
    code, _ = _predict(out, capsys, "--model", str(tmp_path / MISSING_MODEL))
    assert code == 2
    assert not out.exists() and (tmp_path / "new" / "other.txt").read_text() == "someone else's\n"
