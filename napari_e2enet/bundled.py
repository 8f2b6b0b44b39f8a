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
from typing import Any

from .errors import InputError

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


def sample_files() -> dict[str, Path]:
    """The real MRI sample: {'image': ..., 'labels': ..., 'table': ...}."""
    folder = resources_dir() / "sample"
    return {"image": folder / "mni152_t1_2mm.nii.gz", "labels": folder / "mni152_tissue_2mm.nii.gz",
            "table": folder / "labels.json"}
