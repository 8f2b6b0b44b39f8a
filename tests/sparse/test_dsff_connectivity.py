"""Connectivity snapshots and the connectivity.json record."""

from __future__ import annotations

import json
import math

import pytest
import torch

from napari_e2enet.errors import InputError
from napari_e2enet.sparse import ConnectivityRecord, TopologyUpdate, snapshot


def test_snapshot_shares_sum_to_one_and_match_the_masks(helpers) -> None:
    model = helpers.tiny_model(0.8)
    snap = snapshot(model)
    assert list(snap) == [info.key for info in model.decoder.node_info] == ["x0_1", "x1_1", "x0_2"]
    fuse = {mw.node.key: mw for mw in model.maskable() if mw.role == "fuse"}
    up = {mw.node.key: mw for mw in model.maskable() if mw.role == "up"}
    for key, node in snap.items():
        info = fuse[key].node
        assert (node["level"], node["stage"]) == (info.level, info.stage)
        assert set(node["directions"]) == set(info.inputs)
        assert ("down" in node["directions"]) == (info.level > 0)
        dirs = node["directions"].values()
        assert sum(d["active_share"] for d in dirs) == pytest.approx(1.0)
        assert sum(d["l1_share"] for d in dirs) == pytest.approx(1.0)
        assert sum(d["active"] for d in dirs) == node["active"]
        mask = fuse[key].module.kernel_mask
        weight = fuse[key].weight.detach()
        for direction, (a, b) in info.inputs.items():
            d = node["directions"][direction]
            assert d["active"] == int(mask[:, a:b].sum())
            assert d["kernels"] == mask.shape[0] * (b - a)
            assert d["l1"] == pytest.approx(float(weight[:, a:b].abs().sum()), rel=1e-5)
        assert node["up_density"] == pytest.approx(float(up[key].module.kernel_mask.float().mean()))


def test_snapshot_of_a_dense_model_counts_every_kernel(helpers) -> None:
    model = helpers.tiny_model(0.0)
    node = snapshot(model)["x1_1"]  # inputs: forward 8, up 8, down 4 channels
    assert node["density"] == 1.0 and node["up_density"] == 1.0
    shares = {d: v["active_share"] for d, v in node["directions"].items()}
    assert shares == pytest.approx({"forward": 0.4, "up": 0.4, "down": 0.2})


def test_record_json_round_trip_through_a_short_run(make_run, helpers, tmp_path) -> None:
    model, optimizer, updater = make_run(update_every=2, total=6)
    record = ConnectivityRecord.for_model(model, seed=0, update_every=updater.update_every)
    record.record(model, "epoch", iteration=0, epoch=0)

    def each(it, update) -> None:
        if update is not None:
            record.record(model, "update", iteration=it, epoch=it // 3, update=update, loss=0.5)
        if it % 3 == 0:
            record.record(model, "epoch", iteration=it, epoch=it // 3, loss=float("nan"))

    helpers.run(model, optimizer, updater, 0, 6, each=each)
    path = record.to_json(tmp_path / "connectivity.json")
    record.to_json(path)  # overwriting is fine, and leaves no temporary files
    assert [p.name for p in tmp_path.iterdir()] == ["connectivity.json"]

    data = json.loads(path.read_text())
    assert data["format"] == "napari-e2enet/connectivity" and data["version"] == 1
    assert data["levels"] == 3 and data["directions"] == ["forward", "up", "down"]
    assert [n["key"] for n in data["nodes"]] == ["x0_1", "x1_1", "x0_2"]
    assert data["nodes"][1]["inputs"] == {"forward": [0, 8], "up": [8, 16], "down": [16, 20]}
    assert data["meta"]["update_every"] == 2
    kinds = [(e["kind"], e["iteration"]) for e in data["entries"]]
    assert kinds == [("epoch", 0), ("update", 2), ("epoch", 3), ("update", 4), ("epoch", 6)]
    assert data["entries"][2]["loss"] is None  # NaN is not JSON
    assert data["entries"][1]["update"]["total_regrown"] > 0

    back = ConnectivityRecord.from_json(path)
    assert back.to_dict() == data
    assert [u.iteration for u in back.updates()] == [2, 4]
    assert isinstance(back.updates()[0], TopologyUpdate)
    xs, ys = back.series("x1_1", "down", "active_share")
    assert xs == [0, 3, 6] and all(0 < y < 1 for y in ys)
    for entry in back.entries:
        for node in entry["nodes"].values():
            assert math.isclose(sum(d["active_share"] for d in node["directions"].values()), 1.0)


def test_record_rejects_bad_kinds_and_bad_files(helpers, tmp_path) -> None:
    record = ConnectivityRecord.for_model(helpers.tiny_model(0.8))
    with pytest.raises(ValueError, match="kind"):
        record.record(helpers.tiny_model(0.8), "batch", iteration=1)
    missing = tmp_path / "missing.json"
    with pytest.raises(InputError, match=r"missing\.json"):
        ConnectivityRecord.from_json(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match=r"bad\.json: not valid JSON"):
        ConnectivityRecord.from_json(bad)
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**record.to_dict(), "version": 99}))
    with pytest.raises(InputError, match="version"):
        ConnectivityRecord.from_json(newer)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(InputError, match="not a connectivity record"):
        ConnectivityRecord.from_json(other)


def test_snapshot_ignores_stale_values_under_the_mask(helpers) -> None:
    model = helpers.tiny_model(0.8)
    before = snapshot(model)
    with torch.no_grad():  # what an optimizer step does to inactive kernels before re-masking
        for mw in model.maskable():
            mw.weight.add_((~mw.module.kernel_mask)[..., None, None, None].float())
    assert json.dumps(snapshot(model), sort_keys=True) == json.dumps(before, sort_keys=True)
