"""``napari-e2enet`` with test hooks that place a signal or a crash at an exact point.

Usage: ``python _driver.py SUBCOMMAND ARGS...`` — runs ``napari_e2enet.cli.main`` unchanged; hooks
come from environment variables, so one code path serves every reliability test:

- ``E2E_GATE_TILE=k``: before the k-th tile forward of this process, print ``GATE tile k`` on stderr
  and wait for a line on stdin (the test sends its signal while the process waits, then releases it).
- ``E2E_GATE_ITER=k``: the same before the k-th optimisation step of this process.
- ``E2E_LOG_TILES=1``: print ``TILE n`` on stderr as each tile forward starts.
- ``E2E_CRASH_WRITE=KIND:k`` with KIND ``nifti`` (nibabel.save), ``state`` (torch.save) or ``model``
  (safetensors save_file): the k-th such write of this process writes its (temporary) file, cuts it
  to half its size, and the process kills itself with SIGKILL — a ``kill -9`` landing mid-write.
"""

from __future__ import annotations

import os
import signal
import sys


def _gate(what: str) -> None:
    sys.stderr.write(f"GATE {what}\n")
    sys.stderr.flush()
    sys.stdin.readline()


def _crash_half_written(path) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    sys.stderr.write(f"CRASH writing {path}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_hooks() -> None:
    counts = {"tile": 0, "iter": 0, "write": 0}
    gate_tile = int(os.environ.get("E2E_GATE_TILE", "0"))
    gate_iter = int(os.environ.get("E2E_GATE_ITER", "0"))
    log_tiles = os.environ.get("E2E_LOG_TILES") == "1"
    crash = os.environ.get("E2E_CRASH_WRITE", "")

    if gate_tile or log_tiles:
        from napari_e2enet.inference import predictor

        original_tiles = predictor.Predictor._tile_predictor

        def tile_predictor(self, *args):
            run = original_tiles(self, *args)

            def counted(x):
                counts["tile"] += 1
                if log_tiles:
                    sys.stderr.write(f"TILE {counts['tile']}\n")
                    sys.stderr.flush()
                if counts["tile"] == gate_tile:
                    _gate(f"tile {gate_tile}")
                return run(x)

            return counted

        predictor.Predictor._tile_predictor = tile_predictor

    if gate_iter:
        from napari_e2enet.training import loop

        original_step = loop.train_step

        def train_step(*args, **kwargs):
            counts["iter"] += 1
            if counts["iter"] == gate_iter:
                _gate(f"iteration {gate_iter}")
            return original_step(*args, **kwargs)

        loop.train_step = train_step

    if crash:
        kind, _, nth = crash.partition(":")
        nth = int(nth or 1)

        def crashing(original, path_arg: int):
            def write(*args, **kwargs):
                result = original(*args, **kwargs)
                counts["write"] += 1
                if counts["write"] == nth:
                    _crash_half_written(args[path_arg])
                return result

            return write

        if kind == "nifti":
            import nibabel

            nibabel.save = crashing(nibabel.save, 1)
        elif kind == "state":
            import torch

            torch.save = crashing(torch.save, 1)
        elif kind == "model":
            from napari_e2enet import modelcard

            modelcard.save_file = crashing(modelcard.save_file, 1)
        else:
            raise SystemExit(f"unknown E2E_CRASH_WRITE kind {kind!r}")


if __name__ == "__main__":
    install_hooks()
    from napari_e2enet.cli import main

    sys.exit(main(sys.argv[1:]))
