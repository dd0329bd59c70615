"""The Debian package, as an operator gets it: ``make deb`` builds it (dh-virtualenv, about
1 min on an idle 2-core machine, 6-8 min beside CPU burners: the Python dependencies come
from the package index and are byte-compiled),
apt installs it on this machine, its installed binaries run, validate the example configs,
its units pass ``systemd-analyze verify``, everything the units and the alerts point to is
there, and a purge removes it all. Slow for a test, and it installs into /opt/anycast: it
refuses to run over an /opt/anycast that the package did not make."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from controller import __version__
from lab.ops import load_rules

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "anycast-controller"
OPT = Path("/opt/anycast")
BIN = OPT / "bin"
DOC = OPT / "doc"
UNITS = [Path("/lib/systemd/system/anycast-agent.service"), Path("/lib/systemd/system/anycast-controller.service")]
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=600"]  # another apt/dpkg may hold the lock: wait


def installed() -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", PACKAGE], capture_output=True, text=True)
    return r.returncode == 0 and "installed" in r.stdout and "not-installed" not in r.stdout


def run(argv: list[str], timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload, no-any-return]


def purge() -> None:
    r = run([*APT, "purge", PACKAGE], timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def deb() -> Iterator[Path]:
    if installed():
        purge()  # left over from an interrupted run
    if OPT.exists():
        pytest.fail(f"{OPT} exists but is not the package's: refusing to install over it")
    build = run(["make", "deb"], timeout=1800, cwd=ROOT)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    (path,) = (ROOT / "build" / "deb").glob(f"{PACKAGE}_{__version__}_*.deb")
    r = run([*APT, "install", str(path)], timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        yield path
    finally:
        purge()
        assert not OPT.exists(), f"{OPT} left behind by the purge"
        assert not any(u.exists() for u in UNITS), "units left behind by the purge"


def test_the_package_holds_the_daemons_units_config_dir_license_and_docs(deb: Path) -> None:
    info = run(["dpkg-deb", "-f", str(deb), "Package", "Version", "Depends"]).stdout
    assert f"Version: {__version__}" in info and "python3 (>= 3.11)" in info
    for name in ("anycast-agent", "anycast-controller", "anycastctl", "exabgp"):
        assert (BIN / name).is_file(), name
    assert (DOC / "LICENSE").read_text().startswith((ROOT / "LICENSE").read_text()[:200])
    assert Path("/usr/share/doc/anycast-controller/copyright").is_file()
    assert Path("/etc/anycast").is_dir() and "agent.yaml" in Path("/etc/anycast/README").read_text()
    for unit in UNITS:
        assert unit.is_file(), unit
        # Every file the unit's Documentation= names is installed.
        docs = re.search(r"^Documentation=(.+)$", unit.read_text(), re.M)
        assert docs, unit
        for url in docs.group(1).split():
            assert url.startswith("file://") and Path(url.removeprefix("file://")).is_file(), (unit.name, url)


def test_every_runbook_url_resolves_on_the_installed_host(deb: Path) -> None:
    urls = [r["annotations"]["runbook_url"] for r in load_rules() if "alert" in r]
    assert urls
    for url in urls:
        assert Path(url.removeprefix("file://")).is_file(), url


def test_each_installed_binary_tells_its_version(deb: Path) -> None:
    for name in ("anycastctl", "anycast-agent", "anycast-controller"):
        r = run([str(BIN / name), "--version"], cwd="/")
        assert (r.returncode, r.stdout.strip()) == (0, f"{name} {__version__}"), r.stderr


def test_the_installed_anycastctl_validates_the_example_configs(deb: Path) -> None:
    examples = [DOC / "configs" / "agent-sjc.yaml", DOC / "configs" / "agent-sjc-controlled.yaml",
                DOC / "configs" / "controller"]
    r = run([str(BIN / "anycastctl"), "validate", "--json", *map(str, examples)], cwd="/")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [x["ok"] for x in yaml.safe_load(r.stdout)] == [True, True, True]


def test_the_installed_agent_renders_an_exabgp_config_its_exabgp_accepts(deb: Path, tmp_path: Path) -> None:
    out = tmp_path / "exabgp.conf"
    r = run([str(BIN / "anycast-agent"), "exabgp-config", "--config", str(DOC / "configs" / "agent-sjc.yaml"),
             "--state-dir", "/var/lib/anycast-agent", "--out", str(out)], cwd="/")
    assert r.returncode == 0, r.stderr
    assert f"run {BIN}/python" in out.read_text()  # the API process runs from the package's venv
    v = run([str(BIN / "exabgp"), "validate", str(out)], cwd="/")
    assert v.returncode == 0, v.stdout + v.stderr


def test_the_installed_units_pass_systemd_analyze_verify(deb: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian: apt-get install systemd)"
    for unit in UNITS:
        r = run([analyze, "verify", str(unit)], env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
        assert r.returncode == 0 and not r.stderr.strip(), f"{unit.name}: {r.stderr}"


def test_the_wheel_ships_only_what_a_pop_needs(deb: Path) -> None:
    for module in ("lab", "bench", "tests"):
        r = run([str(BIN / "python"), "-c", f"import {module}"], cwd="/")
        assert r.returncode != 0, f"{module} is installed in the package's virtualenv"
    r = run([str(BIN / "python"), "-c", "import controller.agent.daemon, controller.server.daemon, exabgp"], cwd="/")
    assert r.returncode == 0, r.stderr


def test_the_installed_venv_sees_python3_systemd_and_nothing_else_of_debians(deb: Path) -> None:
    # journald logging with VIP/POP/REASON fields (controller/logs.py) needs Debian's python3-systemd,
    # which the package depends on; the venv sees that one package, not all of dist-packages.
    assert "python3-systemd" in run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
    probe = ("import json, systemd.journal, yaml, controller.logs as logs; "
             "print(json.dumps([systemd.journal.__file__, yaml.__file__, logs._journal_handler('t') is not None]))")
    r = run([str(BIN / "python"), "-c", probe], cwd="/")
    assert r.returncode == 0, r.stderr
    journal_file, yaml_file, handler = yaml.safe_load(r.stdout)
    assert Path(journal_file).resolve().is_relative_to("/usr/lib/python3/dist-packages/systemd"), journal_file
    assert Path(yaml_file).is_relative_to(OPT), yaml_file
    assert handler is True
