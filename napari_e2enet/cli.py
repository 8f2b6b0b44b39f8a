"""The ``napari-e2enet`` console script.

Each subcommand parses its options into config objects and calls the core; no maths here.
Bad input (a file or an option): one line on stderr, exit code 2. ``--json``: exactly one JSON object
on stdout. Ctrl-C (SIGINT) exits 130 and SIGTERM 143, after train/predict/finetune stopped cleanly.
Anything unforeseen: one line naming the exception and a log file holding its traceback, exit 1.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ._json import json_safe
from .config import MIRROR_MODES, OPTIMIZERS, VALIDATION_MODES
from .errors import InputError

if TYPE_CHECKING:  # imported where used: `napari-e2enet --help` stays fast
    from pathlib import Path

    from .config import TrainConfig

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what shells and schedulers expect

# name -> (add_arguments, run, help); each subcommand registers itself below its functions.
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def _triple(values: Sequence[int]) -> tuple[int, int, int]:
    return (int(values[0]), int(values[1]), int(values[2]))


def emit_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


# -- option types: a bad value is refused by argparse, in one line naming the option ---------------
def _whole(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {f'>= {low}' if high is None else f'in {low}..{high}'}, "
                                             f"got {value}")
        return value

    parse.__name__ = "whole number"
    return parse


def _real(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False
          ) -> Callable[[str], float]:
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or math.isinf(high) else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low) \
                or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


_POSITIVE = _whole(1)
_COUNT = _whole(0)
_SEED = _whole(0, 2**63 - 1)
_SPARSITY = _real(0.0, 1.0, high_open=True)
_FRACTION = _real(0.0, 1.0)
_OVERLAP = _real(0.0, 1.0, high_open=True)


class _Terminated(KeyboardInterrupt):
    """SIGTERM where the command has no clean stop of its own (and a second SIGTERM anywhere)."""


def _signal_exit(signum: int | None) -> int:
    """128 + the signal's number (shells' convention): 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP."""
    return EXIT_INTERRUPTED if signum in (None, signal.SIGINT) else 128 + int(signum)


# A closing terminal sends SIGHUP; schedulers and ``docker stop`` send SIGTERM.
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[dict[str, int | None]]:
    """Ctrl-C (SIGINT), SIGTERM (a scheduler, ``docker stop``) and SIGHUP (a closing terminal) set
    ``stop``: the work ends at its next safe point and saves; a second signal aborts at once. Yields a
    dict whose ``"signal"`` is the first signal's number (None when there was none)."""
    got: dict[str, int | None] = {"signal": None}

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise _Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        got["signal"] = signum
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    try:
        yield got
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -- info ---------------------------------------------------------------------------------------
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="e2enet", help="registered model name (see --list)")
    p.add_argument("--in-channels", type=_whole(1, 4096), default=1)
    p.add_argument("--classes", type=_whole(1, 32767), default=16, help="output classes including background")
    p.add_argument("--sparsity", type=_SPARSITY, default=0.8, help="S = 1 - density of the fusion kernels")
    p.add_argument("--patch", type=_POSITIVE, nargs=3, default=(128, 128, 128), metavar=("D", "H", "W"))
    p.add_argument("--pools", type=_POSITIVE, nargs="+", metavar="P",
                   help="down-sampling factors, 3 per transition (D H W D H W ...)")
    p.add_argument("--seed", type=_SEED, default=0, help="seed of the uniform random masks")
    p.add_argument("--list", action="store_true", help="list the registered models and exit")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _info(args: argparse.Namespace) -> int:
    from .models import create_model, list_models
    from .models.cost import model_cost

    if args.list:
        if args.json:
            emit_json({"models": list_models()})
        else:
            print("\n".join(list_models()))
        return 0
    overrides = {}
    if args.pools:
        if len(args.pools) % 3:
            raise InputError("--pools needs 3 numbers per transition")
        overrides["pools"] = tuple(tuple(args.pools[i:i + 3]) for i in range(0, len(args.pools), 3))
    try:
        model = create_model(args.model, in_channels=args.in_channels, num_classes=args.classes,
                             sparsity=args.sparsity, seed=args.seed, **overrides)
        cost = model_cost(model, _triple(args.patch))
    except ValueError as exc:
        raise InputError(str(exc)) from None
    result = {"model": args.model, "in_channels": args.in_channels, "classes": args.classes,
              "sparsity": args.sparsity, "patch": list(args.patch), **cost.to_dict()}
    if args.json:
        emit_json(result)
    else:
        print(f"{args.model}  in={args.in_channels} classes={args.classes} S={args.sparsity} "
              f"patch={'x'.join(map(str, args.patch))}")
        print(f"  params   dense {cost.params_dense / 1e6:9.2f} M   effective {cost.params_effective / 1e6:9.2f} M")
        print(f"  MACs     dense {cost.macs_dense / 1e9:9.2f} G   effective {cost.macs_effective / 1e9:9.2f} G")
        print(f"  FLOPs (paper convention) {cost.flops_paper / 1e9:9.2f} G")
    return 0


_COMMANDS["info"] = (_info_args, _info, "parameters, MACs and paper-convention FLOPs of a model")


# -- train --------------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="nnU-Net/MSD dataset folder, or phantom:N for N synthetic abdomen cases")
    p.add_argument("--out", required=True, help="run directory (created; holds model, metrics, state)")
    p.add_argument("--model", help="registered model name (default e2enet_small)")
    p.add_argument("--sparsity", type=_SPARSITY, help="DSFF sparsity S (0 = dense fusion)")
    p.add_argument("--iterations", type=_POSITIVE, help="total training iterations")
    p.add_argument("--iterations-per-epoch", type=_POSITIVE, help="iterations between validations/checkpoints")
    p.add_argument("--update-every", type=_COUNT, help="DSFF topology update every K iterations (0 = auto)")
    p.add_argument("--regrow", choices=("random", "gradient"), help="DSFF regrowth rule (paper: random)")
    p.add_argument("--patch", type=_POSITIVE, nargs=3, metavar=("D", "H", "W"))
    p.add_argument("--batch", type=_POSITIVE)
    p.add_argument("--lr", type=_real(0.0, low_open=True))
    p.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="sgd (the paper's, default) or adamw (learns a short CPU run faster; try --lr 0.003)")
    p.add_argument("--mirror", choices=MIRROR_MODES,
                   help="axes mirrored by augmentation and TTA (auto: none along left-right when labels are "
                        "lateralised)")
    p.add_argument("--foreground-oversample", type=_FRACTION, help="share of patches centred on a labelled voxel")
    p.add_argument("--validation", choices=VALIDATION_MODES,
                   help="validation Dice: auto (a fixed patch sample on CPU, whole volumes on a GPU), full, patches")
    p.add_argument("--validation-patches", type=_POSITIVE, help="patches in the validation sample (default 16)")
    p.add_argument("--seed", type=_SEED)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", choices=("fp32", "bf16", "amp"))
    p.add_argument("--num-validation", type=_COUNT, help="number of randomly held-out validation cases")
    p.add_argument("--validation-cases", nargs="+", metavar="CASE", help="explicit held-out case names")
    p.add_argument("--no-augment", action="store_true", help="switch training augmentation off")
    p.add_argument("--init-from", help="model file or run folder to fine-tune from")
    p.add_argument("--config", help="TrainConfig as JSON/YAML; command-line options override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds one: the old run's files move to --out/replaced-TIME/")
    p.add_argument("--checkpoint-every", type=_real(0.0), metavar="SECONDS",
                   help="also save the training state after this much training time (default 60; 0 = only "
                        "per epoch): a kill -9 loses at most this much work")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    from .config import TrainConfig, load_config, train_config
    from .pathcheck import require_file

    if args.config:  # a FIFO would block the reader; /dev/zero would fill the memory
        require_file(args.config, "config file not found")
    try:
        config = load_config(args.config, TrainConfig) if args.config else TrainConfig()
    except ValueError as exc:  # the message names the file
        raise InputError(str(exc)) from None
    return train_config(
        config, model=args.model, iterations=args.iterations, seed=args.seed, device=args.device,
        precision=args.precision, lr=args.lr, optimizer=args.optimizer, validation=args.validation,
        validation_patches=args.validation_patches, checkpoint_every_s=args.checkpoint_every,
        iterations_per_epoch=args.iterations_per_epoch,
        sparsity=args.sparsity, update_every=args.update_every, regrow=args.regrow,
        source=args.data, patch=_triple(args.patch) if args.patch else None, batch=args.batch,
        num_validation=args.num_validation, mirror=args.mirror, foreground_oversample=args.foreground_oversample,
        validation_cases=tuple(args.validation_cases) if args.validation_cases else None,
        augment=False if args.no_augment else None)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from .modelcard import STATE_FILE, model_file_in
    from .training import Trainer
    from .training.distributed import cleanup_distributed, init_distributed

    if not args.resume and not args.data and not args.config:
        raise InputError("--data is required (a dataset folder or phantom:N)")
    if args.resume and args.overwrite:
        raise InputError("--resume continues the run in --out and --overwrite replaces it: choose one")
    config = train_config_from_args(args)
    dist = init_distributed(config.device)
    stop = threading.Event()
    # first Ctrl-C or SIGTERM: stop at the next iteration and save; a second: abort
    signals = _stop_on_signals(stop)
    got = signals.__enter__()
    trainer = Trainer(config, args.out, resume=args.resume, stop=stop, rank=dist.rank, overwrite=args.overwrite,
                      world_size=dist.world_size, init_from=model_file_in(args.init_from) if args.init_from else None,
                      command=" ".join(["napari-e2enet", *sys.argv[1:]]))
    bar = None
    last_loss = float("nan")  # validation events carry no loss: show the last iteration's
    try:
        for event in trainer.iter_fit():
            if not dist.is_main:
                continue
            if event.kind == "iteration" and event.loss is not None:
                last_loss = event.loss
            if event.kind == "start":
                bar = tqdm(total=event.total, initial=event.iteration, unit="it", dynamic_ncols=True,
                           file=sys.stderr, desc="train")
                bar.write(event.message, file=sys.stderr)
            elif event.kind == "iteration" and bar is not None:
                bar.update(event.iteration - bar.n)
                bar.set_postfix(loss=f"{event.loss:.3f}", lr=f"{event.lr:.2g}", refresh=False)
            elif event.kind == "validation" and bar is not None and event.dice:
                mean = sum(event.dice.values()) / len(event.dice)
                bar.set_postfix(loss=f"{last_loss:.3f}", dice=f"{mean:.3f}")
            elif event.kind == "topology" and bar is not None and event.update is not None:
                bar.set_postfix(loss=f"{event.loss:.3f}", dsff=f"-{event.update.total_pruned}/+{event.update.total_regrown}")
    finally:
        if bar is not None:
            bar.close()
        signals.__exit__(None, None, None)
        cleanup_distributed()
    summary = trainer.summary
    if not dist.is_main or summary is None:
        return 0
    dice_mean = summary.mean_dice
    result = {"run_dir": str(summary.run_dir), "iterations": summary.iterations, "seconds": round(summary.seconds, 1),
              "final_loss": summary.final_loss, "dice": summary.dice, "dice_mean": dice_mean,
              "stopped": summary.stopped}
    if args.json:
        emit_json(result)
    else:
        verb = "done"
        if summary.stopped:
            resumable = (Path(args.out) / STATE_FILE).is_file()
            verb = "stopped (resume with --resume)" if resumable else "stopped before anything was saved"
        loss = summary.final_loss if summary.final_loss is not None else float("nan")
        sys.stderr.write(f"train {verb}: {summary.iterations} iterations in {summary.seconds:.0f} s, "
                         f"loss {loss:.4f}, validation Dice "
                         f"{'n/a' if dice_mean is None else f'{dice_mean:.4f}'} -> {summary.run_dir}\n")
    return _signal_exit(got["signal"]) if summary.stopped else 0


_COMMANDS["train"] = (_train_args, _train, "train E2ENet with DSFF on a dataset (torchrun for DDP)")


# -- predict ------------------------------------------------------------------------------------
def _output_suffix(name: str) -> str | None:
    """The writer's suffix that ``name`` ends in (any case), or None: then the output is a folder."""
    from .data.io import OUTPUT_FORMATS

    lower = name.lower()
    for suffix in sorted({*OUTPUT_FORMATS.values(), ".mhd"}, key=len, reverse=True):
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return suffix
    return None


def collect_cases(path: str | Path, *, channels: bool = True) -> list[tuple[str, list[Path]]]:
    """(case name, inputs) for a file (NIfTI, NRRD, MetaImage, a DICOM .zip), a DICOM series folder
    (one case) or a folder of NIfTI/NRRD/MetaImage cases.

    ``channels``: ``CASE_0000``, ``CASE_0001`` … are one case's channels, put in the order of their
    number (not of the file names); a missing number (``_0000`` and ``_0002`` only), a number given
    twice (``a_0000.nii.gz`` and ``a_0000.nrrd``) or a plain ``CASE`` file next to ``CASE_0000`` is
    refused in one line naming the case. With ``channels=False`` (label maps: ``evaluate``) every
    file is its own case, ``liver_0001`` included. Suffixes count in any case; hidden files
    (``.NAME.*.tmp`` leftovers) are skipped; an entry named like a volume that is not a regular file
    (a folder, a broken link, a FIFO) is refused rather than skipped.
    """
    import re
    from pathlib import Path

    from .data.io import case_name, is_volume_file
    from .pathcheck import special_kind

    path = Path(path)
    kind = special_kind(path)
    if kind is not None:
        raise InputError(f"not a regular file or folder ({kind})", path)
    if path.is_file():
        return [(case_name(path), [path])]
    if not path.is_dir():
        raise InputError("no such file or folder", path)
    groups: dict[str, dict[int | None, Path]] = {}
    for f in sorted(path.iterdir()):
        if f.name.startswith(".") or not is_volume_file(f.name):
            continue
        kind = special_kind(f)
        if kind is not None:
            raise InputError(f"not a regular file ({kind}); remove it or move it out of {path}", f)
        if not f.is_file():
            raise InputError(f"is a folder named like a volume file; rename it or move it out of {path}", f)
        stem = case_name(f)
        match = re.fullmatch(r"(.+)_(\d{4})", stem) if channels else None
        name, index = (match.group(1), int(match.group(2))) if match else (stem, None)
        slot = groups.setdefault(name, {})
        if index in slot:
            what = f"channel _{index:04d}" if index is not None else "it"
            raise InputError(f"case {name!r} has two files for {what}: {slot[index].name} and {f.name}", path)
        slot[index] = f
    if not groups:
        from .data.dicom import is_dicom_source

        if is_dicom_source(path):
            return [(case_name(path), [path])]
        raise InputError("folder contains no .nii, .nii.gz, .nrrd, .nhdr, .mha or .mhd files and no DICOM series",
                         path)
    cases = []
    for name, slot in sorted(groups.items()):
        numbers = sorted(i for i in slot if i is not None)
        if None in slot and numbers:
            raise InputError(f"case {name!r}: {slot[None].name} and the channel file(s) "
                             f"{', '.join(slot[i].name for i in numbers)} both claim it", path)
        if numbers != list(range(len(numbers))):
            missing = next(i for i in range(numbers[-1] + 1) if i not in slot)
            raise InputError(f"case {name!r}: channel files {', '.join(f'_{i:04d}' for i in numbers)}; _{missing:04d} "
                             "is missing (channels are matched by their _NNNN number, starting at _0000)", path)
        keys: list[int | None] = list(numbers) if numbers else [None]
        cases.append((name, [slot[i] for i in keys]))
    return cases


def _parts(num_parts: int | None, part_id: int | None, source: str = "--num-parts/--part-id") -> tuple[int, int] | None:
    """(num_parts, part_id) checked, or None for no sharding; before any folder is made."""
    if num_parts is None:
        if part_id is not None:
            raise InputError("--part-id needs --num-parts")
        return None
    if num_parts < 1:
        raise InputError(f"{source}: the number of parts must be >= 1 (got {num_parts})")
    part_id = 0 if part_id is None else part_id
    if not 0 <= part_id < num_parts:
        raise InputError(f"{source}: part {part_id} does not exist; with {num_parts} part(s) it must be in "
                         f"0..{num_parts - 1}")
    return num_parts, part_id


def shard(items: list, num_parts: int, part_id: int) -> list:
    """Every ``num_parts``-th item starting at ``part_id`` (nnU-Net's --num_parts/--part_id)."""
    checked = _parts(num_parts, part_id)
    assert checked is not None
    return items[checked[1]::checked[0]]


_OFFSET = _whole(-65536, 65536)


def _intensity_offset(text: str) -> int | str:
    """``--intensity-offset``: a whole number (CTs are stored with 1024, 1000 or 2048) or "auto"."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (e.g. -1024) or auto, got {text!r}") from None
    return _OFFSET(text)  # (refuses a number beyond the range in its own words)


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", required=True,
                   help="a NIfTI/NRRD/MHA file, a DICOM folder or .zip, or a folder of NIfTI/NRRD/MHA cases "
                        "(CASE_0000, CASE_0001 ... group as channels)")
    p.add_argument("-o", "--output", required=True,
                   help="output file for one input (.nii.gz, .nii, .nrrd, .seg.nrrd, .mha, .mhd, or .dcm = DICOM-SEG "
                        "of a DICOM input), else a folder")
    p.add_argument("--output-format", choices=("nii.gz", "nrrd", "seg.nrrd", "mha", "dcm"), default=None,
                   help="file format written into an output folder (default nii.gz; dcm needs DICOM input)")
    p.add_argument("--series", metavar="UID", help="the series to segment when a DICOM folder or zip holds several")
    p.add_argument("--model", help="bundled model name, model.safetensors file or run folder (default: bundled)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (up to 8 flips, one pass each; only the axes the model was trained to mirror)")
    p.add_argument("--overlap", type=_OVERLAP, default=0.5, help="sliding-window overlap in [0, 1)")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto",
                   help="auto: the fastest precision that passed the bundled models' Dice gate, timed on the "
                        "first tile (bf16 only where the CPU has it natively)")
    p.add_argument("--backend", choices=("auto", "sparse", "dense"), default="auto",
                   help="fast-path backend; auto: sparse kernels and dense oneDNN timed on the first tile, the "
                        "faster runs (--json says which and why)")
    p.add_argument("--no-accelerate", action="store_true", help="run the model as trained (no fast sparse path)")
    p.add_argument("--intensity-offset", type=_intensity_offset, default=None, metavar="N|auto",
                   help="add N to the voxel values before anything else, e.g. -1024 for a CT stored without its "
                        "rescale intercept (air near 0 instead of -1000 HU); auto: the offset detected in each case, "
                        "for a CT model only (default: none; a warning says when a CT looks offset)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    p.add_argument("--num-parts", type=int, default=None, help="split a folder into this many parts")
    p.add_argument("--part-id", type=int, default=None, help="which part this process predicts (0-based)")
    p.add_argument("--json", action="store_true", help="print a summary as one JSON object")


def _check_targets(targets: list, suffix: str) -> None:
    """Before any computing: no output path may be a folder, FIFO or device (a folder named
    ``case.nii.gz`` is not an existing prediction), and the folder must take a file now (probed
    with the longest name, as the atomic writer names its temporary)."""
    from .pathcheck import check_writable, special_kind

    for target in targets:
        kind = special_kind(target)
        if target.is_dir() or (kind is not None and not kind.startswith("a broken")):
            raise InputError(f"exists and is {kind or 'a folder'}, not a prediction file; remove it or choose "
                             "another output", target)
    if targets:
        check_writable(max(targets, key=lambda t: len(t.name)), suffix)


def _predict_jobs(args: argparse.Namespace, created: list) -> tuple[list, Any]:
    """Check the predict arguments and the output location before any model is loaded; the cases
    this process predicts (its shard) as ``CaseJob``s, and the output path. The folders it makes
    are appended to ``created`` (deepest first) as soon as they exist, so a failure after that,
    here or later, can remove them again."""
    import os
    from pathlib import Path

    from .data.io import OUTPUT_FORMATS, volume_format
    from .fileio import remove_stale_temporaries
    from .inference.batch import CaseJob

    if not 0 <= args.overlap < 1:
        raise InputError("--overlap must be in [0, 1)")
    parts = _parts(args.num_parts, args.part_id)  # before any folder is made
    if parts is None and "WORLD_SIZE" in os.environ:  # torchrun: shard by rank, no process group needed
        try:
            world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", 0))
        except ValueError:
            raise InputError("WORLD_SIZE and RANK must be integers") from None
        parts = _parts(world, rank, "WORLD_SIZE/RANK")
    cases = collect_cases(args.input)
    out = Path(args.output)
    one_input = Path(args.input).is_file() or [f for _, files in cases for f in files] == [Path(args.input)]
    out_suffix = _output_suffix(out.name)
    single_file = one_input and out_suffix is not None
    dicom_input = all(volume_format(files[0]) == "dicom" for _, files in cases)
    if args.series is not None and not dicom_input:
        raise InputError("--series only applies to DICOM input (a folder or .zip of DICOM files)", args.input)
    if single_file and args.output_format and OUTPUT_FORMATS[args.output_format] != out_suffix:
        raise InputError(f"--output-format {args.output_format} contradicts the output name (it ends in "
                         f"{out_suffix})", out)
    # (single_file implies out_suffix; the second test tells mypy so)
    suffix = out_suffix if single_file and out_suffix is not None else OUTPUT_FORMATS[args.output_format or "nii.gz"]
    if suffix == ".dcm" and not dicom_input:
        raise InputError("DICOM-SEG output (.dcm) needs DICOM input: it references the source series", out)
    _prepare_output(out, single_file, created)
    if parts is not None:
        cases = shard(cases, *parts)
    _refuse_output_on_input(cases, out, single_file, suffix)
    # a writer killed by kill -9 leaves a hidden temporary; only those of dead processes are deleted
    remove_stale_temporaries(out.parent if single_file else out, [out.name] if single_file else None)
    jobs = [CaseJob(name, files, out if single_file else out / f"{name}{suffix}") for name, files in cases]
    _check_targets([job.target for job in jobs], suffix)
    return jobs, out


def _prepare_output(out: Any, single_file: bool, created: list) -> None:
    """The output file's folder must exist; an output folder is made (the folders made, deepest
    first, are appended to ``created``). Either must be writable."""
    import os
    from pathlib import Path

    if single_file:
        folder = out.parent if str(out.parent) else Path(".")
        if not folder.is_dir():
            problem = "is not a folder" if folder.exists() else "does not exist"
            raise InputError(f"output folder {folder} {problem}", out)
    else:
        if out.exists() and not out.is_dir():
            raise InputError("output must be a folder when the input is a folder", out)
        missing = []
        folder = out
        while not os.path.lexists(folder) and folder != folder.parent:  # (a dangling link is not missing)
            missing.append(folder)  # deepest first: the order they can be removed in
            folder = folder.parent
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _remove_empty_folders([f for f in missing if f.is_dir()])  # a parent made before the failure
            raise InputError(f"cannot create output folder ({exc.strerror})", out) from None
        created.extend(missing)
    if not os.access(out if out.is_dir() else (out.parent if str(out.parent) else Path(".")), os.W_OK):
        raise InputError("output location is not writable", out)


def _remove_empty_folders(folders: list) -> None:
    """Remove ``folders`` (deepest first) while they are empty: a folder that holds anything, a
    prediction or a file someone put there meanwhile, stays, and so do the folders above it."""
    import os

    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


def _predict(args: argparse.Namespace) -> int:
    """Run predict; when it fails (an error, a stop) the output folders it made itself are removed
    again if they are still empty, so a failed run leaves no empty output folder behind. A folder
    the user had is never removed, nor anything in one."""
    created: list = []
    code = 1
    try:
        code = _predict_run(args, created)
        return code
    finally:
        if code != 0:
            _remove_empty_folders(created)


def _predict_run(args: argparse.Namespace, created: list) -> int:
    import time

    from tqdm import tqdm

    from .config import InferenceConfig
    from .inference import InputWarning, Predictor
    from .inference.batch import CaseResult, CaseStarted, iter_predict_cases

    jobs, out = _predict_jobs(args, created)
    config = InferenceConfig(overlap=args.overlap, tta=args.tta, precision=args.precision, device=args.device,
                             accelerate=not args.no_accelerate, backend=args.backend)
    predictor = Predictor.from_any(args.model, config)
    stop = threading.Event()
    signals = _stop_on_signals(stop)
    got = signals.__enter__()
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    cases_bar = tqdm(total=len(jobs), desc="cases", unit="case", file=sys.stderr, disable=len(jobs) < 2)
    bar, current = None, ""
    try:
        for event in iter_predict_cases(predictor, jobs, overwrite=args.overwrite, series=args.series, stop=stop,
                                        intensity_offset=args.intensity_offset):
            if isinstance(event, CaseStarted):
                current = event.name
                bar = tqdm(desc=current, unit="tile", file=sys.stderr, leave=False)
            elif isinstance(event, InputWarning):
                tqdm.write(f"napari-e2enet predict: warning: {current}: {event.message}", file=sys.stderr)
            elif isinstance(event, CaseResult):
                if bar is not None:
                    bar.close()
                results.append(event.to_dict())
                cases_bar.update(1)
            elif bar is not None:  # tile progress, always after its CaseStarted
                bar.total = event.total
                bar.update(event.done - bar.n)
        if len(results) < len(jobs):  # the generator ended early: stop was set
            raise KeyboardInterrupt
    except KeyboardInterrupt as exc:
        if bar is not None:
            bar.close()
        cases_bar.close()
        signum = signal.SIGTERM if isinstance(exc, _Terminated) else got["signal"]
        sys.stderr.write(f"napari-e2enet predict: {'interrupted' if signum in (None, signal.SIGINT) else 'terminated'}; "
                         f"{sum(r['status'] == 'ok' for r in results)} case(s) written, no partial output\n")
        return _signal_exit(signum)
    finally:
        if bar is not None:
            bar.close()  # an error line must not land on the end of a progress bar
        cases_bar.close()
        signals.__exit__(None, None, None)
    summary = {"model": predictor.describe(), "intensity_offset": args.intensity_offset, "cases": results,
               "seconds": round(time.perf_counter() - t0, 2)}
    if args.json:
        emit_json(summary)
    else:
        done = sum(r["status"] == "ok" for r in results)
        sys.stderr.write(f"predict: {done} case(s) segmented, {len(results) - done} skipped, "
                         f"{summary['seconds']:.1f} s -> {out}\n")
    return 0


def _refuse_output_on_input(cases: list[tuple[str, list[Path]]], out: Path, single_file: bool, suffix: str) -> None:
    """No output may be an input: ``predict -i a.nii.gz -o a.nii.gz --overwrite`` would replace the
    image with its labels (a hard link or symlink to an input counts as the input)."""
    import os
    from pathlib import Path

    inputs = {}
    for _, files in cases:
        for f in files:
            inputs[os.path.realpath(f)] = Path(f)
    for name, files in cases:
        target = Path(out) if single_file else Path(out) / f"{name}{suffix}"
        same = inputs.get(os.path.realpath(target))
        if same is None and target.exists():
            same = next((Path(f) for f in files if Path(f).exists() and os.path.samefile(f, target)), None)
        if same is not None:
            raise InputError(f"the output would replace the input image {same}; choose another output", target)


_COMMANDS["predict"] = (_predict_args, _predict,
                        "segment volumes (NIfTI, NRRD, MHA, a DICOM series; file or folder) with a trained model")


# -- finetune -----------------------------------------------------------------------------------
def _finetune_args(p: argparse.ArgumentParser) -> None:
    from .training.finetune import TRAINABLE, FinetuneConfig

    default = FinetuneConfig()
    p.add_argument("--model", help="bundled model name, model.safetensors file or run folder (default: bundled)")
    p.add_argument("--image", required=True, help="the image (any readable format, a DICOM folder too)")
    p.add_argument("--labels", required=True, help="the corrected labels on the image's grid")
    p.add_argument("--edited", help="mask of the voxels the user changed (1 = edited); without it every voxel of "
                                    "--labels is taken as correct")
    p.add_argument("--out", required=True, help="run folder to write (model.safetensors, finetune.json)")
    p.add_argument("--series", help="DICOM series UID when --image holds several")
    p.add_argument("--iterations", type=_POSITIVE, default=default.iterations)
    p.add_argument("--lr", type=_real(0.0, low_open=True), default=default.lr, help="AdamW learning rate")
    p.add_argument("--train", choices=TRAINABLE, default=default.train,
                   help="all: every layer (default); decoder: encoder frozen")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--intensity-offset", type=_intensity_offset, default=None, metavar="N|auto",
                   help="added to the image's voxels before fine-tuning, as predict adds it (auto: the detected "
                        "offset of a CT stored without its rescale intercept, for a CT model)")
    p.add_argument("--json", action="store_true", help="print a summary as one JSON object")


def _finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    from tqdm import tqdm

    from .data import read_image, read_labels, read_volume
    from .inference import Predictor
    from .modelcard import MODEL_FILE
    from .training.finetune import FinetuneConfig, iter_finetune

    out = Path(args.out)
    if (out / MODEL_FILE).exists() and not args.overwrite:
        raise InputError("already holds a model; choose another --out or add --overwrite", out)
    config = FinetuneConfig(iterations=args.iterations, lr=args.lr, train=args.train, device=args.device)
    model_file = Predictor.from_any(args.model).source  # resolves bundled names; verifies bundled checksums
    image = read_image(args.image, series=args.series)
    labels = read_labels(args.labels)
    edited = None
    if args.edited:
        mask = read_volume(args.edited)
        if mask.spatial_shape != image.spatial_shape:
            raise InputError(f"edit mask shape {mask.spatial_shape} differs from the image's {image.spatial_shape}",
                             args.edited)
        edited = np.asarray(mask.array) != 0
    stop = threading.Event()
    signals = _stop_on_signals(stop)
    got = signals.__enter__()
    bar = None  # made at "start": a refusal before it must not land on the end of a progress bar
    last = None
    try:
        for event in iter_finetune(model_file, image, labels, out, edited=edited, config=config, stop=stop,
                                   intensity_offset=args.intensity_offset):
            last = event
            if event.kind == "start":
                bar = tqdm(total=config.iterations, unit="it", desc="finetune", file=sys.stderr, dynamic_ncols=True)
                bar.write(event.message, file=sys.stderr)
            elif event.kind == "iteration" and bar is not None:
                bar.update(event.iteration - bar.n)
                bar.set_postfix(loss=f"{event.loss:.3f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        signals.__exit__(None, None, None)
    if last is None or last.kind == "stopped":
        sys.stderr.write("napari-e2enet finetune: stopped; nothing written\n")
        return _signal_exit(got["signal"])
    summary = {"run_dir": str(last.run_dir), "iterations": last.iteration, "seconds": round(last.seconds, 1),
               "final_loss": last.loss, "base_model": model_file}
    if args.json:
        emit_json(summary)
    else:
        sys.stderr.write(f"finetune done: {last.iteration} iterations in {last.seconds:.0f} s, loss {last.loss:.4f} "
                         f"-> {last.run_dir} (segment with: napari-e2enet predict --model {last.run_dir} ...)\n")
    return 0


_COMMANDS["finetune"] = (_finetune_args, _finetune,
                         "fine-tune a model on one volume's corrected labels (the edited slices)")


# -- evaluate -----------------------------------------------------------------------------------
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, help="predicted labels: NIfTI/NRRD/.seg.nrrd/MHA file or folder")
    p.add_argument("--ref", required=True,
                   help="reference labels: NIfTI/NRRD/.seg.nrrd/MHA file or folder (matched by case name)")
    p.add_argument("--labels", help="label table: dataset.json or labels.json (default: the ids found)")
    p.add_argument("--tolerance", type=float, default=1.0, help="NSD tolerance in mm")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _evaluate(args: argparse.Namespace) -> int:
    import math
    from pathlib import Path

    import numpy as np

    from .data import read_labels
    from .labels import LabelTable
    from .metrics import MetricAccumulator
    from .pathcheck import require_file, special_kind

    pred, ref = Path(args.pred), Path(args.ref)
    for path in (pred, ref):
        kind = special_kind(path)
        if kind is not None:
            raise InputError(f"not a regular file or folder ({kind})", path)
        if not path.exists():
            raise InputError("no such file or folder", path)
    if pred.is_file() != ref.is_file():
        what = {True: "a file", False: "a folder"}
        raise InputError(f"is {what[pred.is_file()]} but --ref {ref} is {what[ref.is_file()]}; give two label "
                         "files or two folders of them", pred)
    if not math.isfinite(args.tolerance) or args.tolerance < 0:
        raise InputError(f"--tolerance must be a finite number of mm >= 0 (got {args.tolerance:g})")
    if args.labels:
        require_file(args.labels)  # a FIFO would block the JSON reader
    pairs = [(pred, ref)] if pred.is_file() else []
    if not pairs:
        preds = dict(collect_cases(pred, channels=False))  # label maps: liver_0001 is a case, not a channel
        for name, files in collect_cases(ref, channels=False):
            if name not in preds:
                raise InputError(f"no prediction for reference case {name!r}", pred)
            pairs.append((preds[name][0], files[0]))
    volumes = [(read_labels(p), read_labels(r)) for p, r in pairs]
    for (p, _), (pv, rv) in zip(pairs, volumes):
        if pv.spatial_shape != rv.spatial_shape:
            raise InputError(f"shape {pv.spatial_shape} differs from the reference {rv.spatial_shape}", p)
        if not np.allclose(pv.affine, rv.affine, atol=1e-3):
            raise InputError("affine differs from the reference's (not on the same grid)", p)
    if args.labels:
        table = LabelTable.from_dataset_json(Path(args.labels)) if Path(args.labels).name == "dataset.json" \
            else LabelTable.from_json(args.labels)
        names = {k: v for k, v in table.names.items() if k != 0}
        if not names:
            raise InputError("the label table names no class besides background (0); nothing to score",
                             args.labels)
    else:
        ids = sorted({int(v) for pv, rv in volumes for v in np.union1d(np.unique(pv.array), np.unique(rv.array))} - {0})
        names = {k: str(k) for k in ids}
        if not names:
            raise InputError("every voxel is background (0) in the predictions and the references; nothing to score "
                             "(give --labels to score the classes anyway)", pred)
    try:
        acc = MetricAccumulator(names, tolerance=args.tolerance)
    except InputError as exc:  # e.g. two classes with one name: the table is at fault
        raise InputError(str(exc), args.labels or pred) from None
    for (p, _), (pv, rv) in zip(pairs, volumes):
        try:
            acc.update(pv.array, rv.array, rv.spacing, case=p.name)
        except InputError as exc:
            raise InputError(str(exc), p) from None
    result = json_safe(acc.aggregate())
    if args.json:
        emit_json(result)
    else:
        print(f"{'class':<24}{'Dice':>8}{'NSD@' + format(args.tolerance, 'g') + 'mm':>12}{'HD95 mm':>10}")
        for name in names.values():
            row = [result[m]["per_class"].get(name) for m in ("dice", "nsd", "hd95")]
            print(f"{name:<24}" + "".join(f"{'-' if v is None else format(v, '.4f'):>{w}}"
                                           for v, w in zip(row, (8, 12, 10))))
        means = [result[m]["mean"] for m in ("dice", "nsd", "hd95")]
        print(f"{'mean':<24}" + "".join(f"{'-' if v is None else format(v, '.4f'):>{w}}"
                                         for v, w in zip(means, (8, 12, 10))))
    return 0


_COMMANDS["evaluate"] = (_evaluate_args, _evaluate, "Dice, NSD and HD95 of predicted against reference labels")


# -- demo ---------------------------------------------------------------------------------------
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-output", help="output folder (created)")
    p.add_argument("--sample", choices=("mri", "ct"), default="mri",
                   help="mri: the MNI152 T1 sample (tissue); ct: the synthetic abdominal CT phantom (organs)")
    p.add_argument("--model", default=None, help="bundled model name (default: the bundled model that fits the sample)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--gui", action="store_true",
                   help="then open napari with the image and the labels (needs the gui extra and a display)")
    p.add_argument("--gui-close-after", type=float, default=None, help=argparse.SUPPRESS)  # tests close the window
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _gui_problem() -> str | None:
    """Why napari cannot open here (checked before the demo runs), or None."""
    import importlib.util
    import os

    if importlib.util.find_spec("napari") is None or importlib.util.find_spec("qtpy") is None:
        return "--gui needs napari and Qt: pip install 'napari-e2enet[gui]'"
    if (sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY")
            and os.environ.get("QT_QPA_PLATFORM", "") not in ("offscreen", "minimal")):
        return "--gui needs a display (DISPLAY is not set; on a server use xvfb-run)"
    return None


def _show_demo(out: str, close_after: float | None) -> int:
    """napari on the demo's results, in its own process: the CLI never imports Qt (the layers
    contract), and a crash in the window cannot touch the results already written."""
    import subprocess

    command = [sys.executable, "-m", "napari_e2enet._napari.demo_viewer", out]
    if close_after is not None:
        command += ["--close-after", str(close_after)]
    code = subprocess.run(command, check=False).returncode
    if code:
        sys.stderr.write(f"demo --gui: napari ended with exit code {code}; the results are in {out}/\n")
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .demo import run_demo

    if args.gui and (problem := _gui_problem()):
        raise InputError(problem)
    bar = tqdm(desc="segment", unit="tile", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        report = run_demo(args.out, model=args.model, sample=args.sample, device=args.device, progress=progress)
    finally:
        bar.close()
    if args.json:
        emit_json(json_safe(report))
    else:
        held = report.get("dice_heldout_region", {}).get("mean")
        where = ("a phantom it never trained on" if args.sample == "ct" else
                 f"held-out region {'n/a' if held is None else format(held, '.4f')}")
        sys.stderr.write(f"demo: {report['model']}: mean Dice {report['dice']['mean']:.4f} ({where}) in "
                         f"{report['seconds']:.1f} s on {report['device']} -> {args.out}/ (labels, overlay.png, "
                         "connectivity.png, report.json)\n")
    if args.gui:
        return _show_demo(args.out, args.gui_close_after)
    return 0


_COMMANDS["demo"] = (_demo_args, _demo,
                     "segment a sample (MRI tissue, or --sample ct: CT phantom organs) with the bundled model that "
                     "fits it (README demo)")


# -- bench --------------------------------------------------------------------------------------
def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", nargs="+", default=["patch", "volume", "train"], choices=["patch", "volume", "train"],
                   help="what to measure: per-patch latency, whole volumes (time, peak RSS), training steps")
    p.add_argument("--sizes", type=_POSITIVE, nargs="+", default=[64, 128], help="cubic patch sizes")
    p.add_argument("--repeats", type=_POSITIVE, default=5, help="interleaved rounds per candidate")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--models", nargs="+", default=None, help="candidates (default: all; see napari_e2enet.bench)")
    p.add_argument("--volume-shapes", nargs="+", default=["128x256x256", "300x512x512"], metavar="DxHxW")
    p.add_argument("--volume-models", nargs="+", default=None, help="whole-volume candidates")
    p.add_argument("--volume-patch", type=_POSITIVE, default=128, help="sliding-window tile (cube) for the volumes")
    p.add_argument("--volume-overlap", type=_OVERLAP, default=0.5)
    p.add_argument("--volume-precision", default="fp32", choices=["fp32", "bf16"],
                   help="precision of every whole-volume run (bf16: compare on a CPU with native bf16)")
    p.add_argument("--train-models", nargs="+", default=None,
                   help="plain, e2enet_sN, small_sN (S = N/10; default: plain e2enet_s08 small_s08)")
    p.add_argument("--train-patch", type=_POSITIVE, default=64)
    p.add_argument("--train-batch", type=_POSITIVE, default=2)
    p.add_argument("--train-iterations", type=_POSITIVE, default=6, help="timed training steps (after one warm-up)")
    p.add_argument("--threads", type=_POSITIVE, default=2)
    p.add_argument("--freed-memory", choices=["kept", "returned", "best"], default=None,
                   help="freed tensors' memory kept in the process for the next allocation, or returned at once "
                        "(glibc's default: every fresh tensor is faulted in again); default: as the project runs "
                        "them, returned for inference (the fast path pools its buffers) and kept for training; "
                        "best: the patch part runs returned, then kept, and each candidate is compared in its "
                        "faster mode (the other parts as by default)")
    p.add_argument("--json", action="store_true", help="print the machine line and results as one JSON object")


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"--volume-shapes: {text!r} is not DxHxW (e.g. 300x512x512)")
    return shape


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    unknown = sorted((set(args.models or ()) | set(args.volume_models or ())) - set(bench.MODELS))
    if unknown:
        raise InputError(f"unknown bench candidate(s) {unknown}; choose from {', '.join(bench.MODELS)}")
    if "train" in args.parts:  # checked before the patch part, which may run for an hour
        try:
            bench.check_training_candidates(args.train_models or bench.TRAIN_MODELS, args.train_patch)
        except ValueError as exc:
            raise InputError(f"--train-models/--train-patch: {exc}") from None
    shapes = [_parse_shape(t) for t in args.volume_shapes]
    def say(message: str) -> None:
        sys.stderr.write(message + "\n")

    machine = {**bench.machine_info(), "freed_memory": args.freed_memory or "returned in inference, kept in training"}
    keep_inference = args.freed_memory == "kept"  # default: as predict and train run
    keep_training = args.freed_memory != "returned"
    out: dict[str, Any] = {"machine": machine}
    text = []
    if "patch" in args.parts:
        # best: returned first, then kept (kept memory would also serve a later returned pass)
        modes = ["returned", "kept"] if args.freed_memory == "best" else [None]
        runs = {mode or "": bench.run_patch_benchmark(args.sizes, args.repeats, precisions=args.precisions,
                                                      models=args.models, threads=args.threads, progress=say,
                                                      keep_memory=keep_inference or mode == "kept")
                for mode in modes}
        out["results"] = [{**row, **({"freed_memory": mode} if mode else {})} for mode, rows in runs.items()
                          for row in rows]
        text.append(bench.format_table(out["results"], machine))
        if args.freed_memory == "best":
            out["best"] = bench.best_of_modes(runs)
            text.append(bench.format_best_table(out["best"]))
    else:
        text.append(bench.format_table([], machine))
    if "volume" in args.parts:
        out["volume"] = bench.run_volume_benchmark(shapes, args.volume_models or bench.VOLUME_MODELS,
                                                   patch=args.volume_patch, overlap=args.volume_overlap,
                                                   precision=args.volume_precision, threads=args.threads,
                                                   progress=say, keep_memory=keep_inference)
        text.append(bench.format_volume_table(out["volume"]))
    if "train" in args.parts:
        out["training"] = bench.run_training_benchmark(args.train_models or bench.TRAIN_MODELS,
                                                       patch=args.train_patch, batch=args.train_batch,
                                                       iterations=args.train_iterations, threads=args.threads,
                                                       progress=say, keep_memory=keep_training)
        text.append(bench.format_training_table(out["training"]))
    if args.json:
        emit_json(json_safe(out))
    else:
        print("\n".join(text))
    return 0


_COMMANDS["bench"] = (_bench_args, _bench, "latency, whole-volume memory and training speed against nnU-Net's PlainConvUNet")


class _Parser(argparse.ArgumentParser):
    """An option error is one line naming the option, like every other bad input (no usage block)."""

    def error(self, message: str) -> Any:  # argparse calls this on a bad option
        text = " ".join(message.split())
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="napari-e2enet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"napari-e2enet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, (add_arguments, _, help_text) in _COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _traceback_log(args: argparse.Namespace, exc: BaseException) -> str:
    """Write ``exc``'s traceback to a log and return its path: ``<run>/error.log`` (appended) for a
    train whose run folder exists, else ``napari-e2enet/logs/`` in the user's cache folder
    (``$XDG_CACHE_HOME`` or ``~/.cache``), else in the system's temporary folder."""
    import os
    import platform
    import tempfile
    import time
    import traceback
    from pathlib import Path

    from . import __version__

    text = (f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}  napari-e2enet {__version__}  python {platform.python_version()}"
            f"  {platform.platform()}\n$ napari-e2enet {' '.join(sys.argv[1:])}\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    name = f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "napari-e2enet" / "logs"
    candidates = [Path(tempfile.gettempdir()) / "napari-e2enet-logs" / name]
    candidates.insert(0, cache / name)
    run = getattr(args, "out", None)
    if args.command == "train" and run and Path(run).is_dir():
        from .modelcard import ERROR_LOG  # loaded already: train imported the Trainer

        candidates.insert(0, Path(run) / ERROR_LOG)
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(text)
            return str(path)
        except OSError:
            continue
    return "nowhere: no log folder is writable"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _, run, _ = _COMMANDS[args.command]

    def on_sigterm(signum: int, frame: Any) -> None:  # commands with a clean stop install their own
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        previous = None
    try:
        return run(args)
    except InputError as exc:
        sys.stderr.write(f"napari-e2enet {args.command}: error: {exc}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        sys.stderr.write(f"napari-e2enet {args.command}: {'terminated' if terminated else 'interrupted'}\n")
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except FloatingPointError as exc:  # training diverged: say so in one line, the last checkpoint stays
        sys.stderr.write(f"napari-e2enet {args.command}: error: {exc}; try a lower --lr "
                         "(the last checkpoint in the run folder is intact)\n")
        return 1
    except Exception as exc:  # a bug or an unforeseen failure: one line here, the traceback in a log
        log = _traceback_log(args, exc)
        detail = " ".join(str(exc).split())[:300] or ("out of memory" if isinstance(exc, MemoryError) else "")
        sys.stderr.write(f"napari-e2enet {args.command}: error: unexpected {type(exc).__name__}"
                         f"{': ' + detail if detail else ''} (traceback in {log})\n")
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
