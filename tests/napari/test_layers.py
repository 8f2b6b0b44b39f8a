"""The display convention (layers.py) and the reader/writer, on napari's ViewerModel (no canvas).

These need napari but no display: geometry must survive Volume → layer → file for every axis
order and flip, anisotropic spacing, and oblique affines.
"""

from __future__ import annotations

import itertools
import warnings

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")

from napari.components import ViewerModel

from napari_e2enet.data import Volume, read_volume, write_volume
from napari_e2enet.errors import InputError


def _signed_permutations():
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            yield perm, signs


def _affine(perm, signs, spacing=(0.8, 1.3, 3.5), origin=(10.0, -20.0, 30.0)):
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    for voxel_axis, world_axis in enumerate(perm):
        affine[world_axis, voxel_axis] = signs[voxel_axis] * spacing[voxel_axis]
    affine[:3, 3] = origin
    return affine


def _ras_to_lps_zyx(ras):
    return np.array([ras[2], -ras[1], -ras[0]])


@pytest.mark.parametrize(("perm", "signs"), list(_signed_permutations()))
def test_every_axis_order_shows_s_p_l_and_inverts_exactly(perm, signs):
    from napari_e2enet._napari.layers import image_layer_data, layer_to_volume

    rng = np.random.default_rng(0)
    array = rng.normal(size=(5, 6, 7)).astype(np.float32)
    volume = Volume(array, _affine(perm, signs), None, "v")
    data, kwargs, kind = image_layer_data(volume)
    assert kind == "image"
    assert np.shares_memory(data, array)  # a view, no copy
    assert all(s > 0 for s in kwargs["scale"])
    viewer = ViewerModel()
    layer = viewer.add_image(data, **kwargs)
    # napari's own data→world of a few voxels equals RAS→(S, P, L) of the source affine
    geometry = layer.metadata["napari_e2enet"]
    for ijk in [(0, 0, 0), (4, 5, 6), (1, 3, 2)]:
        display = [ijk[p] for p in geometry["perm"]]
        display = [geometry["shape"][p] - 1 - d if f else d
                   for d, p, f in zip(display, geometry["perm"], geometry["flip"], strict=True)]
        world = np.asarray(layer.data_to_world(display))
        ras = volume.affine @ [*ijk, 1]
        np.testing.assert_allclose(world, _ras_to_lps_zyx(ras), atol=1e-9)
        assert layer.data[tuple(display)] == array[ijk]
    # world axes increase towards S, P, L
    d = np.asarray(layer.data_to_world((1, 1, 1))) - np.asarray(layer.data_to_world((0, 0, 0)))
    assert np.all(d > 0)
    back = layer_to_volume(layer)
    assert np.array_equal(back.array, array)
    assert np.array_equal(back.affine, volume.affine)


def test_labels_painted_in_napari_land_in_the_source_voxel(tmp_path):
    from napari_e2enet._napari.layers import labels_layer_data, layer_to_volume

    labels = np.zeros((6, 5, 4), np.uint8)
    volume = Volume(labels, _affine((1, 0, 2), (-1.0, 1.0, -1.0)), None, "lab")
    data, kwargs, _ = labels_layer_data(volume)
    layer = ViewerModel().add_labels(data, **kwargs)
    layer.data_setitem(tuple(np.array([v]) for v in (1, 2, 3)), 7)
    back = layer_to_volume(layer)
    (i, j, k), = np.argwhere(back.array == 7)
    world = np.asarray(layer.data_to_world((1, 2, 3)))
    np.testing.assert_allclose(world, _ras_to_lps_zyx(volume.affine @ [i, j, k, 1]), atol=1e-9)


def test_oblique_affine_warns_and_saves_exactly(tmp_path):
    from napari_e2enet._napari.layers import ObliqueWarning, image_layer_data
    from napari_e2enet._napari.writer import write_image

    theta = np.radians(12.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.0, 1.5, 2.5])
    affine[:3, 3] = [3, 4, 5]
    src = write_volume(Volume(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6), affine, None, "o"),
                       tmp_path / "oblique.nii.gz")
    volume = read_volume(src)
    with pytest.warns(ObliqueWarning, match="oblique"):
        data, kwargs, _ = image_layer_data(volume)
    layer = ViewerModel().add_image(data, **kwargs)
    np.testing.assert_allclose(sorted(layer.scale), sorted([1.0, 1.5, 2.5]))
    out = write_image(str(tmp_path / "out.nii.gz"), layer.data, layer.as_layer_data_tuple()[1])[0]
    img, ref = nib.load(out), nib.load(src)
    assert np.array_equal(img.affine, ref.affine)
    assert img.shape == ref.shape
    assert np.array_equal(np.asarray(img.dataobj), np.asarray(ref.dataobj))


def test_reader_labels_heuristic_and_table(tmp_path):
    from napari_e2enet._napari.reader import napari_get_reader, read_nifti
    from napari_e2enet.bundled import sample_files

    files = sample_files()
    assert napari_get_reader(str(tmp_path / "x.png")) is None
    reader = napari_get_reader(str(files["labels"]))
    assert reader is not None
    (data, kwargs, kind), = reader(str(files["labels"]))
    assert kind == "labels" and data.dtype == np.uint8
    assert list(kwargs["features"]["name"]) == ["background", "CSF/other", "grey matter", "white matter"]
    (_data, kwargs, kind), = read_nifti(str(files["image"]))
    assert kind == "image"
    np.testing.assert_allclose(kwargs["scale"], [2, 2, 2])


def test_writer_refuses_moved_layer(tmp_path, phantom_files):
    from napari_e2enet._napari.reader import read_layer_data
    from napari_e2enet._napari.writer import write_labels

    data, kwargs, kind = read_layer_data(phantom_files["labels"])
    assert kind == "labels"
    layer = ViewerModel().add_labels(data, **kwargs)
    out = write_labels(str(tmp_path / "ok.nii.gz"), layer.data, layer.as_layer_data_tuple()[1])
    ref, img = nib.load(phantom_files["labels"]), nib.load(out[0])
    assert np.array_equal(img.affine, ref.affine)
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(ref.affine) == ("L", "P", "S")
    assert np.array_equal(np.asarray(img.dataobj), np.asarray(ref.dataobj))
    assert int(img.header["sform_code"]) == int(ref.header["sform_code"])
    layer.translate = np.asarray(layer.translate) + 5.0
    with pytest.raises(InputError, match="moved or rescaled"):
        write_labels(str(tmp_path / "moved.nii.gz"), layer.data, layer.as_layer_data_tuple()[1])
    assert not (tmp_path / "moved.nii.gz").exists()


def test_layer_without_plugin_metadata_gets_an_affine_from_its_transform(tmp_path):
    from napari_e2enet._napari.writer import write_labels

    layer = ViewerModel().add_labels(np.zeros((4, 5, 6), np.uint8), scale=(3.0, 2.0, 1.0), translate=(1, 2, 3))
    layer.data_setitem(tuple(np.array([v]) for v in (1, 2, 3)), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = write_labels(str(tmp_path / "plain.nii.gz"), layer.data, layer.as_layer_data_tuple()[1])[0]
    img = nib.load(out)
    (i, j, k), = np.argwhere(np.asarray(img.dataobj) == 4)
    world = np.asarray(layer.data_to_world((1, 2, 3)))
    np.testing.assert_allclose(_ras_to_lps_zyx(img.affine @ [i, j, k, 1]), world, atol=1e-6)


def test_channel_image_and_its_labels_share_the_spatial_grid():
    from napari_e2enet._napari.layers import (
        check_same_grid,
        image_layer_data,
        labels_layer_kwargs,
        layer_to_volume,
    )

    array = np.random.default_rng(1).normal(size=(2, 5, 6, 7)).astype(np.float32)
    volume = Volume(array, _affine((0, 1, 2), (-1.0, -1.0, 1.0)), None, "mc")
    data, kwargs, _ = image_layer_data(volume)
    viewer = ViewerModel()
    image = viewer.add_image(data, **kwargs)
    assert image.data.shape == (2, 7, 6, 5) and image.scale[0] == 1.0
    labels = viewer.add_labels(np.zeros(image.data.shape[1:], np.uint8), **labels_layer_kwargs(image))
    check_same_grid(image, labels)
    back = layer_to_volume(image)
    assert np.array_equal(back.array, array) and np.array_equal(back.affine, volume.affine)
    assert layer_to_volume(labels).array.shape == (5, 6, 7)
