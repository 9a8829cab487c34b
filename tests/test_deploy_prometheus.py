"""The Prometheus files in ``deploy/`` and the service's ``/metrics``, checked by Prometheus's own
``promtool`` and a real Prometheus server scraping a running service (both installed by
``scripts/install_prometheus.sh``; under ``CI=true`` these tests may not skip)."""

# ruff: noqa: F811  (fixtures imported from tests.test_service_common are re-bound as arguments)

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_service_common import (  # noqa: F401 (fixtures)
    AUTH,
    TOKEN,
    Samples,
    bench,
    detector,
    running_app,
    samples,
    service_model,
    serving,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SOURCES = ROOT / "src" / "diffqc"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
pytestmark = [pytest.mark.anyio, pytest.mark.prometheus,
              pytest.mark.skipif(PROMTOOL is None, reason="no promtool (scripts/install_prometheus.sh)")]


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
    assert loaded.returncode == 0 and "SUCCESS: 13 rules found" in said, said


def test_composes_prometheus_sends_one_token_the_service_takes_also_with_several() -> None:
    """compose.yaml gave Prometheus the service's ``DIFFQC_TOKEN`` as its secret; with several
    tokens (one per kiosk, as docs/API.md advises) Prometheus sent ``Bearer a,b``, was refused
    401, and with no scrape every alert rule but DiffqcDown went silent. Prometheus's secret is
    one token of its own, which the service accepts beside the others."""
    import yaml

    from diffqc.service.security import parse_tokens

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    env = {"DIFFQC_TOKEN": "kiosk-a,kiosk-b", "DIFFQC_METRICS_TOKEN": "prometheus-1",
           "POSTGRES_PASSWORD": "pw"}

    def interpolated(value: str) -> str:  # compose's ${VAR}, ${VAR:?message}, ${VAR:-default}
        return re.sub(r"\$\{(\w+)(?::[?-][^}]*)?\}", lambda m: env.get(m.group(1), ""), value)

    accepted = parse_tokens(interpolated(compose["services"]["diffqc"]["environment"]["DIFFQC_TOKEN"]))
    secret = next(iter(compose["services"]["prometheus"]["secrets"]))
    sent = env[compose["secrets"][secret]["environment"]]
    assert {"kiosk-a", "kiosk-b"} <= set(accepted)
    assert parse_tokens(sent) == (sent,) and sent in accepted, (sent, accepted)


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


def _query(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.load(answer)["data"]


def _until(check: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


@contextmanager
def _prometheus(folder: Path, port: int) -> Iterator[str]:
    """A Prometheus server on ``folder``'s ``prometheus.yml``, listening on ``port``: its URL."""
    assert PROMETHEUS is not None
    with (folder / "prometheus.log").open("w") as log:
        server = subprocess.Popen([PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={folder / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=30)


@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus (scripts/install_prometheus.sh)")
def test_prometheus_scrapes_the_service_with_composes_configuration(detector: Any, samples: Samples,
                                                                    tmp_path: Path) -> None:
    """compose.yaml's Prometheus, run for real: ``deploy/prometheus.yml`` as it stands (only the
    target, the token secret's path and the intervals changed) scrapes a running service with
    the token from a file written as ``echo`` writes it, evaluates ``deploy/alerts.yml`` on what it
    scraped (a decision's camera and type as the silent-camera rule's labels), and once the
    service stops, raises DiffqcDown."""
    from diffqc.service.app import ServiceSettings, create_app

    body, ftype = samples.one("PASS")
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    service_port = bench.free_port()
    config = ((DEPLOY / "prometheus.yml").read_text()
              .replace("/run/secrets/diffqc_token", str(token))
              .replace("diffqc:8000", f"127.0.0.1:{service_port}")
              .replace("scrape_interval: 15s", "scrape_interval: 1s")
              .replace("evaluation_interval: 15s", "evaluation_interval: 1s"))
    assert f":{service_port}" in config and str(token) in config and "interval: 15s" not in config
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(DEPLOY / "alerts.yml", tmp_path / "alerts.yml")
    app = create_app(ServiceSettings(db_url=str(tmp_path / "results.db"), tokens=(TOKEN,)), detector=detector)
    with _prometheus(tmp_path, bench.free_port()) as prometheus:
        with serving(app, port=service_port) as url:
            inspected = httpx.post(f"{url}/v1/inspect", content=body, headers=AUTH, timeout=60,
                                   params={"feature_type": ftype, "camera": "cam-1"})
            assert inspected.status_code == 200, inspected.text

            def up() -> list[Any]:
                try:
                    return [t for t in _query(prometheus, "/api/v1/targets")["activeTargets"]
                            if t["health"] == "up"]
                except OSError:  # not listening yet
                    return []

            targets = _until(up)
            assert targets, (tmp_path / "prometheus.log").read_text()[-2000:]
            assert targets[0]["labels"]["job"] == "diffqc"
            series = _query(prometheus, "/api/v1/query",
                            query="time() - diffqc_last_decision_timestamp_seconds")["result"]
            labels = [(s["metric"]["feature_type"], s["metric"]["camera"]) for s in series]
            assert labels == [(ftype, "cam-1")]
            evaluated = _until(lambda: [r for g in _query(prometheus, "/api/v1/rules")["groups"]
                                        for r in g["rules"] if r.get("lastEvaluation", "").startswith("2")])
            assert len(evaluated) == 13 and all(r["health"] == "ok" for r in evaluated), evaluated
            assert not [r["name"] for r in evaluated if r["state"] != "inactive"]
        # the service stopped: its target down, the alert pending its `for:`
        down = _until(lambda: [a for a in _query(prometheus, "/api/v1/alerts")["alerts"]
                               if a["labels"]["alertname"] == "DiffqcDown"])
        assert down and down[0]["state"] == "pending" and down[0]["labels"]["severity"] == "critical", down
