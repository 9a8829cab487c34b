"""Retention of kept images and heat maps: by age and by disk budget, never a record, never a
file the service did not write."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from diffqc.errors import ConfigError
from diffqc.service.retention import RetentionPolicy, RetentionWorker, apply_retention
from diffqc.service.store import ArtifactStore, ResultRecord, ResultStore


def _store_parts(store: ResultStore, artifacts: ArtifactStore, ages_s: list[float],
                 now: float) -> list[ResultRecord]:
    recs = []
    for i, age in enumerate(ages_s):
        heat = artifacts.save_png("heatmaps", np.full((16, 16, 3), i, np.uint8))
        image = artifacts.save_bytes("images", bytes(1000 + i), "png")
        recs.append(ResultRecord(created_at=now - age, source="t", decision="REJECT", part_id=f"p{i}",
                                 feature_type="stripes", heatmap=heat, image=image))
    return store.insert_many(recs)


@pytest.fixture
def stores(tmp_path: Path):  # type: ignore[no-untyped-def]
    with ResultStore(str(tmp_path / "r.db")) as store:
        yield store, ArtifactStore(tmp_path / "data")


def test_max_age_expires_files_and_keeps_records_with_a_note(stores, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, artifacts = stores
    now = time.time()
    old, young = _store_parts(store, artifacts, [10 * 86400, 60], now)
    foreign = tmp_path / "data" / "images" / "operator-notes.png"  # not written by the service
    foreign.write_bytes(b"keep me")
    out = apply_retention(store, artifacts, RetentionPolicy(max_age_s=86400), now=now)
    assert out["expired"] == 2 and out["kept"] == 2
    assert store.count() == 2  # no record deleted
    got_old, got_young = store.get(old.id), store.get(young.id)  # type: ignore[arg-type]
    assert got_old is not None and got_young is not None
    assert got_old.heatmap is None and got_old.image is None
    assert got_old.heatmap_expired_at == pytest.approx(now) and got_old.image_expired_at == pytest.approx(now)
    assert got_young.heatmap == young.heatmap and got_young.heatmap_expired_at is None
    assert artifacts.path("heatmaps", old.heatmap) is None and artifacts.path("images", old.image) is None
    assert artifacts.path("heatmaps", young.heatmap) is not None
    assert foreign.read_bytes() == b"keep me"
    # a second pass finds nothing more to do
    assert apply_retention(store, artifacts, RetentionPolicy(max_age_s=86400), now=now)["expired"] == 0


def test_disk_budget_expires_the_oldest_first(stores) -> None:  # type: ignore[no-untyped-def]
    store, artifacts = stores
    now = time.time()
    recs = _store_parts(store, artifacts, [400, 300, 200, 100], now)
    sizes = {r.id: artifacts.path("heatmaps", r.heatmap).stat().st_size  # type: ignore[union-attr]
             + artifacts.path("images", r.image).stat().st_size for r in recs}  # type: ignore[union-attr]
    budget = sizes[recs[2].id] + sizes[recs[3].id]  # room for the two youngest parts exactly
    out = apply_retention(store, artifacts, RetentionPolicy(max_bytes=budget), now=now)
    assert out["kept_bytes"] <= budget and out["expired"] == 4
    kept = [store.get(r.id) for r in recs]  # type: ignore[arg-type]
    assert [k.image is not None for k in kept if k] == [False, False, True, True]
    assert [k.heatmap is not None for k in kept if k] == [False, False, True, True]
    assert store.count() == 4


def test_a_file_already_gone_is_noted_and_nothing_else_breaks(stores) -> None:  # type: ignore[no-untyped-def]
    store, artifacts = stores
    now = time.time()
    (rec,) = _store_parts(store, artifacts, [5000], now)
    artifacts.path("images", rec.image).unlink()  # type: ignore[union-attr]
    out = apply_retention(store, artifacts, RetentionPolicy(max_age_s=1000), now=now)
    assert out["expired"] == 2
    got = store.get(rec.id)  # type: ignore[arg-type]
    assert got is not None and got.image is None and got.image_expired_at is not None


def test_worker_and_policy_validation(stores) -> None:  # type: ignore[no-untyped-def]
    store, artifacts = stores
    with pytest.raises(ConfigError, match="max age"):
        RetentionPolicy(max_age_s=0).validate()
    with pytest.raises(ConfigError, match="budget"):
        RetentionPolicy(max_bytes=-1).validate()
    _store_parts(store, artifacts, [10, 20], time.time())
    worker = RetentionWorker(store, artifacts, RetentionPolicy(max_bytes=0))
    assert worker.run_once()["expired"] == 4
    assert "diffqc_artifacts_expired_total 4" in worker.metrics_lines()
    assert "diffqc_artifacts_kept_bytes 0" in worker.metrics_lines()
