"""npe2 sample data: the real MRI sample (MNI152 T1 + tissue labels) and the abdomen CT phantom."""

from __future__ import annotations

from typing import Any

from ..labels import LabelTable

LayerData = tuple[Any, dict[str, Any], str]


def mni152_sample() -> list[LayerData]:
    """MNI ICBM152 2009a T1 at 2 mm with its 3-class tissue labels (shipped in the package)."""
    from ..bundled import sample_files
    from .reader import read_layer_data

    files = sample_files()
    image = read_layer_data(files["image"], kind="image")
    labels = read_layer_data(files["labels"], kind="labels")
    table = LabelTable.from_json(files["table"])
    from .layers import label_colormap, label_features

    labels[1].update({"name": "mni152 tissue (reference)", "colormap": label_colormap(table),
                      "features": label_features(table), "opacity": 0.5, "visible": False})
    labels[1]["metadata"]["napari_e2enet"]["label_table"] = table.to_dict()
    image[1]["name"] = "mni152 T1"
    return [image, labels]


def abdomen_phantom(seed: int = 0) -> list[LayerData]:
    """A procedural abdominal CT (LPS voxel order, 1.5 × 1.5 × 3 mm) with AMOS organ labels."""
    from ..data.phantom import make_phantom
    from ..labels import AMOS
    from .layers import image_layer_data, labels_layer_data

    image, labels = make_phantom(seed)
    table = AMOS
    img = image_layer_data(image, name=f"phantom CT {seed}", contrast_limits=[-160.0, 240.0])
    lab = labels_layer_data(labels, table, name=f"phantom organs {seed} (reference)", opacity=0.5)
    return [img, lab]
