"""``predict`` over a folder interrupted by ``kill -9`` or Ctrl-C: every destination path holds a
complete file or nothing, and a rerun completes the rest (existing outputs are skipped).

Each phantom case is 9 tiles (32×32×16 → 16×32×32 on the network grid, patch 16³, overlap 0.5), so
the driver's global tile counter places a signal inside a chosen case.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from napari_e2enet.cli import collect_cases, main

from .conftest import Child, assert_valid_labels_file, screen_lines, write_phantom_cases

pytestmark = pytest.mark.slow

TILES_PER_CASE = 9


def _predict_argv(inputs: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["predict", "-i", str(inputs), "-o", str(out), "--model", str(model), "--device", "cpu", *extra]


def _outputs(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def test_kill_9_mid_folder_leaves_whole_files_and_a_rerun_completes(tmp_path, assets, capfd):
    inputs, out = tmp_path / "images", tmp_path / "segs"
    images = write_phantom_cases(inputs, range(5))
    argv = _predict_argv(inputs, out, assets.model3)

    # 1. kill -9 in the middle of case 3 (its 3rd tile): cases 1 and 2 are written, nothing else.
    child = Child(argv, driver=True, hooks={"E2E_GATE_TILE": str(2 * TILES_PER_CASE + 3)})
    child.wait_for(r"GATE tile 21")
    child.proc.send_signal(signal.SIGKILL)
    assert child.finish() == -signal.SIGKILL
    assert _outputs(out) == ["case000.nii.gz", "case001.nii.gz"]
    for name, image in zip(_outputs(out), images):
        assert_valid_labels_file(out / name, image)
    written = {name: (out / name).read_bytes() for name in _outputs(out)}

    # 2. rerun, killed -9 while it writes case 3: the destination stays absent (a hidden temp may stay).
    child = Child(argv, driver=True, hooks={"E2E_CRASH_WRITE": "nifti:1"})
    assert child.finish() == -signal.SIGKILL
    assert "CRASH writing" in child.text_err
    names = _outputs(out)
    assert [n for n in names if not n.startswith(".")] == ["case000.nii.gz", "case001.nii.gz"]
    leftovers = [n for n in names if n.startswith(".")]
    assert len(leftovers) == 1 and re.fullmatch(r"\.case002\.nii\.gz\..+\.tmp\.nii\.gz", leftovers[0]), names
    assert {name: (out / name).read_bytes() for name in written} == written  # untouched
    # a half-written temporary is never taken for a case (e.g. when OUT is later used as an input)
    assert [name for name, _ in collect_cases(out)] == ["case000", "case001"]

    # 3. rerun to the end (the console code in this process: no signal here, no child needed):
    # finished cases are skipped, the others written whole.
    capfd.readouterr()
    code = main([*argv, "--json"])
    shown = capfd.readouterr()
    assert code == 0, shown.err
    status = {c["case"]: c["status"] for c in json.loads(shown.out)["cases"]}
    assert status == {"case000": "skipped (exists)", "case001": "skipped (exists)",
                      "case002": "ok", "case003": "ok", "case004": "ok"}
    final = [n for n in _outputs(out) if not n.startswith(".")]
    assert final == [f"case{i:03d}.nii.gz" for i in range(5)]
    for name, image in zip(final, images):
        assert_valid_labels_file(out / name, image)
    assert {name: (out / name).read_bytes() for name in written} == written


def test_ctrl_c_stops_within_one_tile_and_leaves_no_partial_output(tmp_path, assets):
    inputs, out = tmp_path / "images", tmp_path / "segs"
    images = write_phantom_cases(inputs, range(3))
    gate = TILES_PER_CASE + 2  # case 2, tile 2: the signal arrives while that tile is in flight
    child = Child(_predict_argv(inputs, out, assets.model3), driver=True,
                  hooks={"E2E_GATE_TILE": str(gate), "E2E_LOG_TILES": "1"})
    child.wait_for(rf"GATE tile {gate}")
    child.proc.send_signal(signal.SIGINT)
    child.release_gate()
    assert child.finish() == 130, child.text_err
    started = [int(n) for n in re.findall(r"TILE (\d+)", child.text_err)]
    assert max(started) == gate, "a tile started after Ctrl-C"  # the one in flight ended, none began
    last = screen_lines(child.text_err)[-1]
    assert last == "napari-e2enet predict: interrupted; 1 case(s) written, no partial output", last
    assert "Traceback" not in child.text_err
    assert _outputs(out) == ["case000.nii.gz"]  # no temporary, no case001
    assert_valid_labels_file(out / "case000.nii.gz", images[0])

