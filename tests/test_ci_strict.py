"""The CI=true rule of tests/ci_strict.py, run on a small inner test suite with pytester."""

from __future__ import annotations

import pytest

INNER = """
import pytest

@pytest.mark.postgres
@pytest.mark.skipif(True, reason="DIFFQC_TEST_POSTGRES_URL is not set")
def test_needs_postgres():
    pass

@pytest.mark.browser
def test_needs_browser_skips_inside():
    pytest.skip("chromium not installed")

@pytest.mark.mqtt
def test_needs_mqtt_runs():
    pass

@pytest.mark.postgres
@pytest.mark.xfail(reason="a known failure, not a skip")
def test_postgres_xfail():
    assert False

@pytest.mark.skip(reason="an ordinary skip")
def test_plain_skip():
    pass
"""


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None) -> pytest.RunResult:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    pytester.makeini("[pytest]\nmarkers =\n    postgres: x\n    browser: x\n    mqtt: x\n")
    pytester.makepyfile(test_inner=INNER)
    return pytester.runpytest_inprocess("-p", "tests.ci_strict", "-p", "no:cacheprovider", "-rA")


def test_under_ci_a_skipped_service_test_fails(pytester: pytest.Pytester,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    result = _run(pytester, monkeypatch, "true")
    # the skipif one fails in setup (an error), the in-body skip in the call (a failure)
    result.assert_outcomes(passed=1, failed=1, errors=1, skipped=1, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*test_needs_postgres*CI=true: this postgres test must run, not skip*"
        "DIFFQC_TEST_POSTGRES_URL is not set*",
        "*test_needs_browser_skips_inside*CI=true: this browser test must run*chromium not installed*",
    ])


@pytest.mark.parametrize("ci", [None, "false", "1"])
def test_without_ci_true_service_tests_skip(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                            ci: str | None) -> None:
    result = _run(pytester, monkeypatch, ci)
    result.assert_outcomes(passed=1, skipped=3, xfailed=1)
    assert result.ret == pytest.ExitCode.OK
