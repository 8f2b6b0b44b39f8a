"""Where should napari's training run: on a worker thread (as it did) or in a child process (as now)?

    .venv/bin/python benchmarks/napari_training_process.py --model e2enet --sparsity 0.8 --iterations 5

The same phantom run (``Trainer.iter_fit`` through ``training.isolated.fit_events``) is consumed
(a) on a ``threading.Thread``, as napari's worker did, and (b) through ``iter_in_subprocess``, as
the Train widget does now, alternating, a fresh run folder each; reported per run: the median time
between iteration events after the first (the steady step), the first step, and the time to the
first event (the child's start-up: spawning, importing torch and the package). Nothing else should
run meanwhile (2 cores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from napari_e2enet.bench import machine_info
from napari_e2enet.config import DataConfig, SparsityConfig, TrainConfig
from napari_e2enet.training.isolated import fit_events, iter_in_subprocess


def _timed(events: Any) -> dict[str, float]:
    start = time.perf_counter()
    stamps = []
    first = None
    for event in events:
        now = time.perf_counter()
        if first is None:
            first = now - start
        if event.kind == "iteration":
            stamps.append(now)
    if not stamps:
        raise SystemExit("the run ended before its first iteration: nothing to time")
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"first_event_s": round(first or 0.0, 2), "first_step_s": round(stamps[0] - start, 2),
            "median_step_s": round(statistics.median(steps), 2) if steps else float("nan")}


def on_thread(config: TrainConfig, run_dir: Path) -> dict[str, float]:
    result: dict[str, float] = {}

    def work() -> None:
        result.update(_timed(fit_events(threading.Event(), config, run_dir)))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return result


def in_process(config: TrainConfig, run_dir: Path) -> dict[str, float]:
    return _timed(iter_in_subprocess(fit_events, config, run_dir, stop=threading.Event()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="e2enet")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    config = TrainConfig(model=args.model, sparsity=SparsityConfig(sparsity=args.sparsity),
                         data=DataConfig(source="phantom:4", patch=(args.patch,) * 3, batch=args.batch,
                                         num_validation=1),
                         iterations=args.iterations, iterations_per_epoch=args.iterations + 1,
                         validation="patches", checkpoint_every_s=0.0, device="cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, run in (("worker thread", on_thread), ("child process", in_process)):
                row = {"where": name, "round": r, **run(config, Path(tmp) / f"{name.split()[0]}-{r}")}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "config": config.to_dict(), "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
