"""Fixtures for lab-based integration tests: a `lab` that is always torn down.

Lab tests need root, iproute2, FRR and the venv's exabgp. If any is missing they FAIL
with the reason (CI must run them, not skip them), and only when such a test is
selected, because the check lives in a fixture.

Override `lab_prefix` in a test module to name its namespaces (e.g. "t-bgp-").
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator

import pytest

from lab.exabgp import exabgp_bin
from lab.frr import frr_available
from lab.netns import Lab

_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember whether the test body failed, so the lab keeps its files for a post-mortem."""
    report: pytest.TestReport = yield
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.fixture(scope="session")
def lab_preflight() -> None:
    """Fail (never skip) when this machine cannot run the lab."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (network namespaces, FRR)")
    if shutil.which("ip") is None:
        problems.append("iproute2 `ip` is missing (apt-get install iproute2)")
    reason = frr_available()
    if reason:
        problems.append(reason)
    if not os.access(exabgp_bin(), os.X_OK):
        problems.append(f"{exabgp_bin()} is missing (pip install -e '.[test]' in the venv)")
    if problems:
        pytest.fail("lab tests cannot run here: " + "; ".join(problems) + " (run `make test` as root)", pytrace=False)


@pytest.fixture
def lab_prefix() -> str:
    """Namespace-name prefix for this module's labs; override per module."""
    return "t-lab-"


@pytest.fixture
def lab(lab_preflight: None, lab_prefix: str, request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A fresh Lab; everything it created is removed after the test, pass or fail."""
    the_lab = Lab(lab_prefix)
    try:
        yield the_lab
    finally:
        if request.node.stash.get(_FAILED, False) and the_lab.root.exists():
            the_lab.keep_files = True
            print(f"\nlab files kept for inspection in {the_lab.root}")
        the_lab.teardown()
