"""Property-based fuzzing: bad bytes and bad JSON end in a Volume/Dataset or an InputError, nothing else."""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_e2enet.data import Dataset, Volume, load_dataset, read_labels, read_volume
from napari_e2enet.errors import InputError

from .conftest import FLIPPED, make_nnunet_folder

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch():
    folder = Path(tempfile.mkdtemp(prefix="e2enet-fuzz-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _valid_nifti_bytes() -> bytes:
    img = nib.Nifti1Image(np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2), FLIPPED)
    img.header.set_sform(FLIPPED, code=1)
    img.header.set_qform(FLIPPED, code=1)
    return img.to_bytes()


VALID = _valid_nifti_bytes()


def _read_both_ways(path: Path) -> None:
    for fn, kwargs in ((read_volume, {}), (read_volume, {"allow_channels": True}), (read_labels, {})):
        try:
            vol = fn(path, **kwargs)
        except InputError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
        else:
            assert isinstance(vol, Volume)
            assert vol.array.ndim in (3, 4)


@FUZZ
@given(data=st.binary(max_size=1500), gz=st.booleans())
def test_any_bytes_read_as_volume_or_input_error(scratch, data, gz):
    path = scratch / ("any.nii.gz" if gz else "any.nii")
    path.write_bytes(data)
    _read_both_ways(path)


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=12),
    cut=st.one_of(st.none(), st.integers(0, len(VALID))),
    gz=st.booleans(),
    gz_cut=st.one_of(st.none(), st.integers(0, 200)),
)
def test_mutated_nifti_read_as_volume_or_input_error(scratch, edits, cut, gz, gz_cut):
    raw = bytearray(VALID)
    for pos, value in edits:
        raw[pos] = value
    if cut is not None:
        raw = raw[:cut]
    data = bytes(raw)
    if gz:
        data = gzip.compress(data)
        if gz_cut is not None:
            data = data[:gz_cut]
    path = scratch / ("mut.nii.gz" if gz else "mut.nii")
    path.write_bytes(data)
    _read_both_ways(path)


# ----------------------------------------------------------------------------- dataset.json

json_scalars = (
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
path_strings = st.sampled_from(
    [
        "imagesTr/case_a_0000.nii.gz",
        "./imagesTr/case_a_0000.nii.gz",
        "labelsTr/case_a.nii.gz",
        "./labelsTr/case_b.nii.gz",
        "../outside.nii.gz",
        "/etc/passwd",
        "imagesTr/../../x.nii.gz",
        "imagesTr/case_a.nii.gz",
        "imagesTr/missing.nii.gz",
        "",
        "\x00",
    ]
) | st.text(max_size=10)
label_tables = st.one_of(
    st.dictionaries(
        st.text(max_size=6), st.integers(-2, 40) | st.lists(st.integers(0, 3), max_size=2), max_size=4
    ),
    st.dictionaries(st.sampled_from(["0", "1", "2", "3", "x", "-1", " 2"]), st.text(max_size=6), max_size=4),
    json_values,
)
channel_tables = st.one_of(
    st.dictionaries(
        st.sampled_from(["0", "1", "a", "-1"]),
        st.sampled_from(["CT", "T1", "", "FLAIR"]) | json_scalars,
        max_size=3,
    ),
    st.lists(st.sampled_from(["CT", "T2"]), max_size=2),
    json_values,
)
structured = st.fixed_dictionaries(
    {},
    optional={
        "channel_names": channel_tables,
        "modality": channel_tables,
        "labels": label_tables,
        "file_ending": st.sampled_from([".nii.gz", ".nii", ".mha", ""]) | json_scalars,
        "training": st.lists(
            st.fixed_dictionaries(
                {},
                optional={"image": path_strings | st.lists(path_strings, max_size=2), "label": path_strings},
            ),
            max_size=3,
        )
        | json_values,
        "dataset": st.dictionaries(
            st.text(max_size=5),
            st.fixed_dictionaries(
                {},
                optional={"images": st.lists(path_strings, max_size=2) | json_values, "label": path_strings},
            ),
            max_size=2,
        ),
        "numTraining": json_scalars,
        "name": json_scalars,
    },
)
json_texts = st.one_of(
    st.text(max_size=200),
    json_values.map(json.dumps),
    structured.map(json.dumps),
    structured.map(lambda d: json.dumps(d)[: max(1, len(json.dumps(d)) // 2)]),  # truncated JSON
)


@pytest.fixture(scope="module")
def fuzz_folder(scratch):
    return make_nnunet_folder(scratch / "ds", shape=(4, 3, 3))


@FUZZ
@given(text=json_texts)
def test_any_dataset_json_gives_dataset_or_input_error(fuzz_folder, text):
    (fuzz_folder / "dataset.json").write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        ds = load_dataset(fuzz_folder)
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(ds, Dataset)
    assert 0 in ds.labels
    for i in range(len(ds)):
        try:
            image, label = ds.load(i)
        except InputError:
            continue
        assert image.spatial_shape == (4, 3, 3)
        assert label is None or label.spatial_shape == image.spatial_shape
