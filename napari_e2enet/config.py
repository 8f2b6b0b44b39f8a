"""Frozen configuration dataclasses: the one home of defaults.

Every config round-trips through plain dicts (``to_dict`` / ``from_dict``) and therefore through
JSON and YAML files. Tuples are stored as lists in files and restored as tuples.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .errors import InputError
from .fileio import atomic_write_text

MIRROR_MODES = ("auto", "all", "none", "no-left-right")
OPTIMIZERS = ("sgd", "adamw")
VALIDATION_MODES = ("auto", "full", "patches")
PRECISIONS = ("fp32", "bf16", "amp")

T = TypeVar("T", bound="_DictMixin")

Triple = tuple[int, int, int]


def _whole(owner: str, name: str, value: Any, low: int, high: int | None = None) -> None:
    """Refuse ``value`` unless it is a whole number in [low, high] (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}: {name} must be a whole number, got {value!r}")
    if value < low or (high is not None and value > high):
        limit = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{owner}: {name} must be {limit}, got {value}")


def _real(owner: str, name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
          high_open: bool = False) -> None:
    """Refuse ``value`` unless it is a finite number in the interval (open ends as flagged)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or math.isinf(high) else ']'}"
        raise ValueError(f"{owner}: {name} must be in {interval}, got {value:g}")


def _triple_of(owner: str, name: str, value: Any, low: int = 1) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"{owner}: {name} must be three whole numbers, got {value!r}")
    for v in value:
        _whole(owner, name, v, low)


def _tupleize(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupleize(v) for v in value)
    return value


class _DictMixin:
    # Every subclass is a @dataclass; declaring the field table tells the checker so, which makes
    # dataclasses.asdict / fields / replace accept ``self`` and ``cls`` here.
    if TYPE_CHECKING:
        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        known = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
        kwargs = {}
        for name, value in data.items():
            sub = _NESTED.get((cls.__name__, name))
            if sub is not None and isinstance(value, dict):
                kwargs[name] = sub.from_dict(value)
            else:
                kwargs[name] = _tupleize(value)
        return cls(**kwargs)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ModelConfig(_DictMixin):
    """Architecture of an E2ENet (network of the E2ENet paper, Wu et al., NeurIPS 2024; README "Paper fidelity").

    ``widths[i]`` is the channel count of level i (0 = full resolution). ``pools[i]`` is the
    down-sampling factor (D, H, W) from level i to level i+1, so ``len(pools) == len(widths) - 1``.
    """

    in_channels: int = 1
    num_classes: int = 16
    widths: tuple[int, ...] = (48, 96, 192, 320, 320, 320)
    pools: tuple[Triple, ...] = ((2, 2, 2),) * 5
    kernel: Triple = (1, 3, 3)
    depth_shift: bool = True
    units_per_level: int = 2
    last_stage_units: int = 2
    num_heads: int = 4  # deep-supervision heads, levels 0..3 (fewer on shallow networks)
    name: str = "e2enet"

    def __post_init__(self) -> None:
        _whole("ModelConfig", "in_channels", self.in_channels, 1)
        _whole("ModelConfig", "num_classes", self.num_classes, 1, 32767)  # labels are stored as int16 at most
        if not isinstance(self.widths, (tuple, list)):
            raise ValueError(f"ModelConfig: widths must be a list of whole numbers, got {self.widths!r}")
        for w in self.widths:
            _whole("ModelConfig", "widths", w, 1)
        _whole("ModelConfig", "units_per_level", self.units_per_level, 1, 64)
        _whole("ModelConfig", "last_stage_units", self.last_stage_units, 0, 64)
        _triple_of("ModelConfig", "kernel", self.kernel)
        if not isinstance(self.pools, (tuple, list)):
            raise ValueError(f"ModelConfig: pools must be a list of (D, H, W) triples, got {self.pools!r}")
        if len(self.widths) < 2:
            raise ValueError("ModelConfig: at least two levels are needed")
        if len(self.pools) != len(self.widths) - 1:
            raise ValueError(
                f"ModelConfig: {len(self.widths)} levels need {len(self.widths) - 1} pools, "
                f"got {len(self.pools)}"
            )
        if any(not isinstance(p, (tuple, list)) or len(p) != 3 or min(p) < 1 for p in self.pools):
            raise ValueError(f"ModelConfig: pools must be positive (D, H, W) triples: {self.pools}")
        if any(k % 2 != 1 for k in self.kernel):
            raise ValueError(f"ModelConfig: kernel sizes must be odd: {self.kernel}")
        if self.num_heads < 1:
            raise ValueError("ModelConfig: num_heads must be >= 1")

    @property
    def levels(self) -> int:
        return len(self.widths)

    @property
    def head_count(self) -> int:
        """Deep-supervision heads actually built: ``num_heads``, at most one per decoder output."""
        return min(self.num_heads, self.levels - 1)

    def divisor(self) -> Triple:
        """The factor every input size must be a multiple of (product of the pools per axis)."""
        out = [1, 1, 1]
        for pool in self.pools:
            out = [o * p for o, p in zip(out, pool)]
        return (out[0], out[1], out[2])


# -- model variants (timm style): name -> ModelConfig factory; ``models.create_model`` builds them --
_REGISTRY: dict[str, Callable[..., ModelConfig]] = {}


def register_model(fn: Callable[..., ModelConfig]) -> Callable[..., ModelConfig]:
    """Register a function ``(in_channels, num_classes, **overrides) -> ModelConfig`` by its name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_config(name: str, *, in_channels: int = 1, num_classes: int = 16, **overrides: Any) -> ModelConfig:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _REGISTRY[name](in_channels=in_channels, num_classes=num_classes, **overrides)


def _cfg(name: str, in_channels: int, num_classes: int, overrides: dict[str, Any], **defaults: Any) -> ModelConfig:
    return ModelConfig(name=name, in_channels=in_channels, num_classes=num_classes, **{**defaults, **overrides})


@register_model
def e2enet(in_channels: int = 1, num_classes: int = 16, **overrides: Any) -> ModelConfig:
    """The paper's AMOS configuration: 6 levels, widths 48..320, (1,3,3) kernels with depth shift."""
    return _cfg("e2enet", in_channels, num_classes, overrides)


@register_model
def e2enet_small(in_channels: int = 1, num_classes: int = 16, **overrides: Any) -> ModelConfig:
    """CPU variant: 5 levels, widths 16, 32, 64, 128, 192.

    Why: a 64³ CPU patch reaches a 4³ bottleneck after 4 down-samplings (a fifth would leave 2³,
    too little context to be worth its cost); a base width of 16 (a third of the paper's) cuts the
    (1,3,3) conv MACs ~9× at the full-resolution levels that dominate cost, while the 192-wide
    bottleneck keeps enough capacity for ~16 organ classes. 10 fused nodes instead of 15.
    """
    return _cfg("e2enet_small", in_channels, num_classes, overrides,
                widths=(16, 32, 64, 128, 192), pools=((2, 2, 2),) * 4)


@register_model
def e2enet_noshift(in_channels: int = 1, num_classes: int = 16, **overrides: Any) -> ModelConfig:
    """Ablation: the paper's network without the depth shift (pure (1,3,3) convs)."""
    return _cfg("e2enet_noshift", in_channels, num_classes, overrides, depth_shift=False)


@register_model
def e2enet_k333(in_channels: int = 1, num_classes: int = 16, **overrides: Any) -> ModelConfig:
    """Ablation: (3,3,3) kernels instead of shift + (1,3,3)."""
    return _cfg("e2enet_k333", in_channels, num_classes, overrides, kernel=(3, 3, 3), depth_shift=False)


# The dense-fusion ablation (S = 0) is not a variant: create_model(name, sparsity=0).


@dataclass(frozen=True)
class SparsityConfig(_DictMixin):
    """Dynamic sparse feature fusion (DSFF of the E2ENet paper, Wu et al., NeurIPS 2024; README "Paper fidelity").

    ``update_every`` is ΔT in iterations; 0 means "scale to the run" (see ``resolved_update_every``).
    """

    sparsity: float = 0.8
    update_every: int = 0
    prune_fraction: float = 0.5
    prune_fraction_min: float = 0.001
    regrow: str = "random"  # "random" (paper) or "gradient" (RigL)
    stop_updates_at: float = 1.0  # fraction of the run after which the topology is frozen

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"SparsityConfig: sparsity must be in [0, 1), got {self.sparsity}")
        if self.regrow not in ("random", "gradient"):
            raise ValueError(f"SparsityConfig: regrow must be 'random' or 'gradient', got {self.regrow!r}")
        if not 0.0 <= self.prune_fraction_min <= self.prune_fraction <= 1.0:
            raise ValueError("SparsityConfig: need 0 <= prune_fraction_min <= prune_fraction <= 1")
        _whole("SparsityConfig", "update_every", self.update_every, 0)
        _real("SparsityConfig", "stop_updates_at", self.stop_updates_at, 0.0, 1.0)

    def resolved_update_every(self, total_iterations: int) -> int:
        """ΔT: the paper's share of the run (1200 of 250 000 iterations), but never below
        ``MIN_UPDATE_EVERY`` iterations, and at most a tenth of the run (>= 10 updates).

        Why the floor: a regrown kernel starts at zero weight and needs iterations to earn an L1
        norm; scaled proportionally, a 500-iteration run would update every 2 iterations and
        prune every regrown kernel again before it ever learned (measured in the updater's
        survival statistics).
        """
        if self.update_every > 0:
            return self.update_every
        paper = round(total_iterations * 1200 / 250_000)
        return max(1, min(max(paper, MIN_UPDATE_EVERY), total_iterations // 10))


MIN_UPDATE_EVERY = 40


@dataclass(frozen=True)
class DataConfig(_DictMixin):
    """Where the cases come from and how they are prepared (nnU-Net-style, as the E2ENet paper; docs/CONVENTIONS.md)."""

    source: str = "phantom:8"
    patch: Triple = (64, 64, 64)
    batch: int = 2
    target_spacing: tuple[float, float, float] | None = None  # None: from the dataset fingerprint
    foreground_oversample: float = 0.33
    augment: bool = True
    validation_fraction: float = 0.2
    num_validation: int | None = None
    validation_cases: tuple[str, ...] = ()  # explicit held-out case names (overrides the random split)
    # Mirroring in augmentation (and test-time augmentation): "auto" (all axes unless a label name is
    # lateralised, then none along the patient's left-right), "all" (nnU-Net), "none", "no-left-right".
    mirror: str = "auto"

    def __post_init__(self) -> None:
        if self.mirror not in MIRROR_MODES:
            raise ValueError(f"DataConfig: mirror must be one of {', '.join(MIRROR_MODES)}, got {self.mirror!r}")
        if not 0.0 <= self.foreground_oversample <= 1.0:
            raise ValueError(f"DataConfig: foreground_oversample must be in [0, 1], got {self.foreground_oversample}")
        if not isinstance(self.source, str):
            raise ValueError(f"DataConfig: source must be a folder path or phantom:N, got {self.source!r}")
        _triple_of("DataConfig", "patch", self.patch)
        _whole("DataConfig", "batch", self.batch, 1)
        if self.target_spacing is not None:
            if not isinstance(self.target_spacing, (tuple, list)) or len(self.target_spacing) != 3:
                raise ValueError(f"DataConfig: target_spacing must be three sizes in mm, got {self.target_spacing!r}")
            for v in self.target_spacing:
                _real("DataConfig", "target_spacing", v, 0.0, low_open=True)
        _real("DataConfig", "validation_fraction", self.validation_fraction, 0.0, 1.0, high_open=True)
        if self.num_validation is not None:
            _whole("DataConfig", "num_validation", self.num_validation, 0)
        if not isinstance(self.validation_cases, (tuple, list)) or \
                not all(isinstance(v, str) for v in self.validation_cases):
            raise ValueError(f"DataConfig: validation_cases must be case names, got {self.validation_cases!r}")


@dataclass(frozen=True)
class TrainConfig(_DictMixin):
    """A training run (the E2ENet paper's nnU-Net-style recipe; CPU scale: docs/phantom-benchmark.md)."""

    model: str = "e2enet_small"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    data: DataConfig = field(default_factory=DataConfig)
    iterations: int = 1000
    iterations_per_epoch: int = 50
    lr: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 3e-5
    grad_clip: float = 12.0
    # "sgd": the paper's SGD Nesterov (momentum below); "adamw": AdamW (betas 0.9, 0.999; momentum
    # unused) — learns a short CPU run several times faster (docs/phantom-benchmark.md).
    optimizer: str = "sgd"
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # "fp32", "bf16" (CPU autocast) or "amp" (CUDA fp16)
    validation_every_epochs: int = 1
    checkpoint_every_epochs: int = 1
    # Validation: "full" (a sliding window over every validation case: the real Dice, minutes a case on
    # CPU), "patches" (``validation_patches`` fixed patches, half centred on a labelled voxel, the same at
    # every validation, Dice pooled over them: nnU-Net's online "pseudo Dice", seconds), "auto" (patches
    # on CPU, full on a GPU). docs/validation-sample.md compares the two curves.
    validation: str = "auto"
    validation_patches: int = 16
    # Seconds of training between saves of the state (at an iteration boundary, besides the epoch
    # checkpoints), so that a kill -9 loses at most about this much work; the first save follows the
    # first iteration. 0 switches the timed saves off. Saving never changes the training result.
    checkpoint_every_s: float = 60.0

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        if self.model not in list_models():
            raise ValueError(f"{owner}: unknown model {self.model!r}; choose from {', '.join(list_models())}")
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"{owner}: model_overrides must be a mapping, got {self.model_overrides!r}")
        _whole(owner, "iterations", self.iterations, 1)
        _whole(owner, "iterations_per_epoch", self.iterations_per_epoch, 1)
        _real(owner, "lr", self.lr, 0.0, low_open=True)
        _real(owner, "momentum", self.momentum, 0.0, 1.0, high_open=True)
        _real(owner, "weight_decay", self.weight_decay, 0.0)
        _real(owner, "grad_clip", self.grad_clip, 0.0, low_open=True)
        _whole(owner, "seed", self.seed, 0, 2**63 - 1)
        if self.precision not in PRECISIONS:
            raise ValueError(f"{owner}: precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"{owner}: device must be a name such as cpu or cuda, got {self.device!r}")
        _whole(owner, "validation_every_epochs", self.validation_every_epochs, 1)
        _whole(owner, "checkpoint_every_epochs", self.checkpoint_every_epochs, 1)
        _real(owner, "checkpoint_every_s", self.checkpoint_every_s, 0.0)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig: optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.validation not in VALIDATION_MODES:
            raise ValueError(f"TrainConfig: validation must be one of {', '.join(VALIDATION_MODES)}, "
                             f"got {self.validation!r}")
        _whole(owner, "validation_patches", self.validation_patches, 1)

    def model_config(self, in_channels: int = 1, num_classes: int = 16) -> ModelConfig:
        """The architecture ``model`` and ``model_overrides`` describe (ValueError naming what is wrong)."""
        try:
            return model_config(self.model, in_channels=in_channels, num_classes=num_classes, **self.model_overrides)
        except TypeError as exc:  # an override that is no ModelConfig field
            raise ValueError(f"TrainConfig: model_overrides: {exc}") from None


def train_config(base: TrainConfig | None = None, **options: Any) -> TrainConfig:
    """``base`` (default: ``TrainConfig()``) with ``options`` replaced: the one mapping from the CLI's
    options and the Train widget's fields to a TrainConfig, so both mean the same by each name.

    Option names are flat: TrainConfig's own fields (``model``, ``iterations``, ``lr``, ...), then
    SparsityConfig's (``sparsity`` is the sparsity level, ``update_every``, ``regrow``, ...) and
    DataConfig's (``source``, ``patch``, ``batch``, ``mirror``, ...). ``None`` keeps the base value;
    lists become tuples. An unknown name or a bad value is one InputError line.
    """
    base = base if base is not None else TrainConfig()
    sections = {"sparsity": {f.name for f in fields(SparsityConfig)}, "data": {f.name for f in fields(DataConfig)}}
    top_level = {f.name for f in fields(TrainConfig)} - set(sections)
    changes: dict[str, dict[str, Any]] = {"top": {}, "sparsity": {}, "data": {}}
    for name, value in options.items():
        if value is None:
            continue
        where = next((s for s, names in sections.items() if name in names), "top" if name in top_level else None)
        if where is None:
            raise InputError(f"TrainConfig has no option {name!r}")
        changes[where][name] = _tupleize(value)
    try:
        return base.replace(**changes["top"], sparsity=base.sparsity.replace(**changes["sparsity"]),
                            data=base.data.replace(**changes["data"]))
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc)) from None


@dataclass(frozen=True)
class InferenceConfig(_DictMixin):
    """Sliding-window inference (nnU-Net-style, as the E2ENet paper; speed: README "Speed and memory on a CPU")."""

    overlap: float = 0.5
    tta: bool = False
    precision: str = "fp32"
    device: str = "auto"
    tiles_per_batch: int = 1
    accelerate: bool = True
    # "auto": the fast path's sparse and dense backends are timed on the first tile (where the
    # volume has enough tiles to repay it) and the faster runs; "sparse"/"dense" force one
    backend: str = "auto"

    def __post_init__(self) -> None:
        _real("InferenceConfig", "overlap", self.overlap, 0.0, 1.0, high_open=True)
        _whole("InferenceConfig", "tiles_per_batch", self.tiles_per_batch, 1)
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"InferenceConfig: precision must be fp32, bf16 or auto, got {self.precision!r}")
        if self.backend not in ("auto", "sparse", "dense"):
            raise ValueError(f"InferenceConfig: backend must be auto, sparse or dense, got {self.backend!r}")


_NESTED: dict[tuple[str, str], type[_DictMixin]] = {
    ("TrainConfig", "sparsity"): SparsityConfig,
    ("TrainConfig", "data"): DataConfig,
}


def load_config(path: str | Path, cls: type[T]) -> T:
    """Read a JSON or YAML file into ``cls``; raises InputError naming the file on bad content."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read config ({exc.strerror or exc})", path) from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise InputError(f"not valid {path.suffix.lstrip('.') or 'JSON'} ({exc})", path) from None
    if not isinstance(data, dict):
        raise InputError("expected a mapping at the top level", path)
    try:
        return cls.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc), path) from None
    except RecursionError:
        raise InputError("a value is nested too deeply", path) from None


def save_config(config: _DictMixin, path: str | Path) -> None:
    path = Path(path)
    atomic_write_text(path, json.dumps(config.to_dict(), indent=2) + "\n")
