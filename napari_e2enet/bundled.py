"""What ships inside the package: bundled models and the sample volumes (no download, ever).

Layout (``resources/`` at the repository top, carried into the wheel as ``napari_e2enet/resources``)::

    resources/models/<name>/model.safetensors   weights + masks + plan + labels (metadata)
    resources/models/<name>/model_card.json     provenance, held-out Dice, sha256 of the weights
    resources/models/<name>/connectivity.json   DSFF connectivity history
    resources/models/<name>/metrics.csv         training log
    resources/sample/...                        the MNI152 sample and its tissue labels
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:
    from .data.intended_input import IntendedInput, ScanStatistics
    from .data.volume import Volume

DEFAULT_MODEL = "mni152-tissue"


def resources_dir() -> Path:
    return Path(__file__).resolve().parent / "resources"


@dataclass(frozen=True)
class BundledModel:
    name: str
    folder: Path
    card: dict[str, Any]

    @property
    def weights(self) -> Path:
        return self.folder / "model.safetensors"

    @property
    def sha256(self) -> str:
        return str(self.card["sha256"])

    @property
    def intended(self) -> IntendedInput | None:
        """The card's ``intended_input`` (what the model expects), None when the card has none."""
        from .data.intended_input import IntendedInput

        try:
            return IntendedInput.from_dict(self.card["intended_input"])
        except (KeyError, ValueError):
            return None


def list_bundled_models() -> list[str]:
    root = resources_dir() / "models"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "model_card.json").is_file())


def bundled_model(name: str = DEFAULT_MODEL) -> BundledModel:
    folder = resources_dir() / "models" / name
    card_path = folder / "model_card.json"
    if not card_path.is_file():
        available = ", ".join(list_bundled_models()) or "none"
        raise InputError(f"no bundled model {name!r} (available: {available})")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"unreadable model card ({exc})", card_path) from None
    return BundledModel(name, folder, card)


def rank_bundled_models(scan: Volume | ScanStatistics) -> list[tuple[str, list[str]]]:
    """Every bundled model with the warnings it would give for ``scan``, the best fit first.

    Cheap: reads each model card's ``intended_input`` (no weights) and looks at the scan once
    (:func:`~napari_e2enet.data.intended_input.scan_statistics`). Order: models whose modality fits
    (a CT model for a scan with air in HU, an MR model for one without), then fewer warnings, then the
    default model, then by name. A card without ``intended_input`` comes last.
    """
    from .data.intended_input import ScanStatistics, input_warnings, modality_fits, scan_statistics

    stats = scan if isinstance(scan, ScanStatistics) else scan_statistics(scan)
    ranked = []
    for name in list_bundled_models():
        intended = bundled_model(name).intended
        if intended is None:
            key: tuple = (2, 0, name != DEFAULT_MODEL, name)
            warnings = ["its model card does not say what input it expects"]
        else:
            warnings = input_warnings(intended, stats)
            key = (0 if modality_fits(intended, stats) else 1, len(warnings), name != DEFAULT_MODEL, name)
        ranked.append((key, name, warnings))
    return [(name, warnings) for _, name, warnings in sorted(ranked)]


def best_bundled_model(scan: Volume | ScanStatistics) -> str:
    """The bundled model that fits ``scan`` best (:func:`rank_bundled_models`); the default model
    when nothing is bundled but it, or on a tie (e.g. an all-background image)."""
    ranked = rank_bundled_models(scan)
    return ranked[0][0] if ranked else DEFAULT_MODEL


def sample_files() -> dict[str, Path]:
    """The real MRI sample: {'image': ..., 'labels': ..., 'table': ...}."""
    folder = resources_dir() / "sample"
    return {"image": folder / "mni152_t1_2mm.nii.gz", "labels": folder / "mni152_tissue_2mm.nii.gz",
            "table": folder / "labels.json"}
