"""The ``napari-e2enet`` console script.

Each subcommand parses its options into config objects and calls the core; no maths here.
Bad input: one line on stderr, exit code 2. ``--json``: exactly one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from .errors import InputError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# name -> (add_arguments, run, help); each subcommand registers itself below its functions.
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def _triple(values: Sequence[int]) -> tuple[int, int, int]:
    return (int(values[0]), int(values[1]), int(values[2]))


def emit_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


# -- info ---------------------------------------------------------------------------------------
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="e2enet", help="registered model name (see --list)")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=16, help="output classes including background")
    p.add_argument("--sparsity", type=float, default=0.8, help="S = 1 - density of the fusion kernels")
    p.add_argument("--patch", type=int, nargs=3, default=(128, 128, 128), metavar=("D", "H", "W"))
    p.add_argument("--pools", type=int, nargs="+", metavar="P",
                   help="down-sampling factors, 3 per transition (D H W D H W ...)")
    p.add_argument("--seed", type=int, default=0, help="seed of the uniform random masks")
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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="napari-e2enet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"napari-e2enet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, _, help_text) in _COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _, run, _ = _COMMANDS[args.command]
    try:
        return run(args)
    except InputError as exc:
        sys.stderr.write(f"napari-e2enet {args.command}: error: {exc}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write(f"napari-e2enet {args.command}: interrupted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
