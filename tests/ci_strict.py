"""Under ``CI=true`` a test that needs a service (PostgreSQL, Chromium, an MQTT broker, promtool, nginx) must
run: its skip is turned into a failure, so CI cannot be green without those tests.

Loaded by ``tests/conftest.py``; without ``CI=true`` such tests skip as usual (a local run
need not have every service).
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

SERVICE_MARKERS = ("postgres", "browser", "mqtt", "prometheus", "nginx")


def ci_strict() -> bool:
    return os.environ.get("CI") == "true"


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if not report.skipped or hasattr(report, "wasxfail") or not ci_strict():
        return report
    needs = [m for m in SERVICE_MARKERS if item.get_closest_marker(m) is not None]
    if needs:
        report.outcome = "failed"
        report.longrepr = (f"CI=true: this {'/'.join(needs)} test must run, not skip "
                           f"({_reason(report)}); .ci/run installs and starts the services")
    return report
