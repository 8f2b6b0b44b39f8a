"""What ships inside the package: bundled models and the sample volumes (no download, ever).

Layout (``napari_e2enet/resources/``, a real folder of the package, so checkouts and wheels agree)::

    resources/models/<name>/model.safetensors   weights + masks + model card (metadata; see modelcard)
    resources/models/<name>/model_card.json     provenance, held-out Dice, sha256 of the weights
    resources/models/<name>/connectivity.json   DSFF connectivity history
    resources/models/<name>/metrics.csv         training log
    resources/sample/...                        the MNI152 sample and its tissue labels
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# The bundled-model lookup is part of the model-file contract (a bundled name is one kind of model
# spec); its names stay importable from here, where the package's resources are described.
from .data.intended_input import ScanStatistics, input_warnings, modality_fits, scan_statistics
from .modelcard import DEFAULT_MODEL, BundledModel, bundled_model, list_bundled_models, resources_dir

if TYPE_CHECKING:
    from pathlib import Path

    from .data.volume import Volume

__all__ = ["DEFAULT_MODEL", "BundledModel", "best_bundled_model", "bundled_model", "list_bundled_models",
           "rank_bundled_models", "resources_dir", "sample_files"]


def rank_bundled_models(scan: Volume | ScanStatistics) -> list[tuple[str, list[str]]]:
    """Every bundled model with the warnings it would give for ``scan``, the best fit first.

    Cheap: reads each model card's ``intended_input`` (no weights) and looks at the scan once
    (:func:`~napari_e2enet.data.intended_input.scan_statistics`). Order: models whose modality fits
    (a CT model for a scan with air in HU, an MR model for one without), then fewer warnings, then the
    default model, then by name. A card without ``intended_input`` comes last.
    """
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
