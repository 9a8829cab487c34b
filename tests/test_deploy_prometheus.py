"""The Prometheus files in ``deploy/`` and the service's ``/metrics``, checked by Prometheus's own
``promtool`` (``scripts/install_promtool.sh``; under ``CI=true`` these tests may not skip)."""

# ruff: noqa: F811  (fixtures imported from tests.test_service_common are re-bound as arguments)

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.test_service_common import AUTH, Samples, detector, running_app, samples, service_model  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SOURCES = ROOT / "src" / "diffqc"
PROMTOOL = shutil.which("promtool")
pytestmark = [pytest.mark.anyio, pytest.mark.prometheus,
              pytest.mark.skipif(PROMTOOL is None, reason="no promtool (scripts/install_promtool.sh)")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _promtool(*args: str, stdin: str | None = None, cwd: Path = DEPLOY) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], input=stdin, cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


def test_the_alert_rules_load_and_pass_their_unit_tests(tmp_path: Path) -> None:
    checked = _promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", "alerts.test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    # compose's Prometheus configuration with its rule file (the token file: compose's secret)
    token = tmp_path / "token"
    token.write_text("t" * 32)
    config = (DEPLOY / "prometheus.yml").read_text().replace("/run/secrets/diffqc_token", str(token))
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(DEPLOY / "alerts.yml", tmp_path / "alerts.yml")
    loaded = _promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    said = loaded.stdout + loaded.stderr
    assert loaded.returncode == 0 and "SUCCESS: 12 rules found" in said, said


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests can fail: the silent-camera rule at an hour instead of 15 minutes."""
    for name in ("alerts.yml", "alerts.test.yml"):
        shutil.copy(DEPLOY / name, tmp_path / name)
    rules = tmp_path / "alerts.yml"
    rules.write_text(rules.read_text().replace("> 900", "> 3600", 1))
    tested = _promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert tested.returncode != 0 and "DiffqcCameraSilent" in tested.stdout + tested.stderr


def test_every_metric_the_rules_name_is_one_the_service_exports() -> None:
    named = set(re.findall(r"\bdiffqc_[a-z_]+", (DEPLOY / "alerts.yml").read_text()))
    assert len(named) >= 10
    source = "\n".join(p.read_text(encoding="utf-8") for p in SOURCES.rglob("*.py"))
    # the metrics the code declares: a "# TYPE name" line, head("name", ...) or ("name", "gauge", ...)
    declared = (r'# TYPE (diffqc_[a-z_]+)|head\(\s*"(diffqc_[a-z_]+)"'
                r'|\("(diffqc_[a-z_]+)", "(?:gauge|counter)"')
    exported = {next(g for g in found if g) for found in re.findall(declared, source)}
    assert {"diffqc_decisions_total", "diffqc_sink_up", "diffqc_drift_alarm"} <= exported
    assert named <= exported, sorted(named - exported)


async def test_the_metrics_text_passes_promtools_lint(detector: Any, samples: Samples,
                                                      tmp_path: Path) -> None:
    body, ftype = samples.one("REVIEW")
    async with running_app(detector, tmp_path, retention_max_age_s=3600.0,
                           part_timeout_s=30.0) as (client, _):
        r = await client.post("/v1/inspect", content=body, headers=AUTH,
                              params={"feature_type": ftype, "camera": 'cam "1"\\'})
        assert r.status_code == 200, r.text
        text = (await client.get("/metrics", headers=AUTH)).text
    assert 'diffqc_last_decision_timestamp_seconds{feature_type="' in text
    assert 'diffqc_parts_overdue_total{feature_type="' in text
    linted = _promtool("check", "metrics", stdin=text)
    assert linted.returncode == 0 and not linted.stdout.strip(), linted.stdout + linted.stderr
