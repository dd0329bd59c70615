"""debian/ stays in step with the project (pure checks; tests/integration/test_deb.py builds,
installs and purges the package)."""

from __future__ import annotations

import re
from pathlib import Path

from controller import __version__

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "debian"


def test_the_package_version_is_the_projects() -> None:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    m = re.fullmatch(r"anycast-controller \(([^)]+)\) \w+; urgency=\w+", first)
    assert m, first
    assert m.group(1) == __version__, f"debian/changelog says {m.group(1)}, controller.__version__ {__version__}: " \
                                      "add a changelog entry (dch -v VERSION)"


def test_everything_the_package_installs_exists_in_the_checkout() -> None:
    for line in (DEBIAN / "anycast-controller.install").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            source, _dest = line.split()
            assert (ROOT / source).exists(), f"debian/anycast-controller.install: {source} does not exist"


def test_the_units_point_at_the_packages_paths() -> None:
    for unit in sorted((ROOT / "systemd").glob("*.service")):
        text = unit.read_text()
        assert "/opt/anycast/bin/" in text, unit.name
        docs = re.search(r"^Documentation=(.+)$", text, re.M)
        assert docs, unit.name
        for url in docs.group(1).split():
            # /opt/anycast/doc mirrors the checkout (debian/anycast-controller.install).
            assert url.startswith("file:///opt/anycast/doc/"), url
            assert (ROOT / url.removeprefix("file:///opt/anycast/doc/")).is_file(), url


def test_the_virtualenv_is_built_where_the_units_look() -> None:
    rules = (DEBIAN / "rules").read_text()
    assert "DH_VIRTUALENV_INSTALL_ROOT = /opt" in rules and "--install-suffix anycast" in rules
    assert "--python /usr/bin/python3" in rules  # Debian's interpreter, the one the package depends on


def test_both_units_raise_the_descriptor_limit() -> None:
    """systemd's default soft limit (1,024) is what 1,100 slow connections exhausted (issue 15)."""
    for unit in sorted((ROOT / "systemd").glob("*.service")):
        assert "\nLimitNOFILE=65536\n" in unit.read_text(), unit.name
