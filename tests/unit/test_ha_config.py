"""The ``ha`` section of controller.yaml and the agents' ``controller.urls``: typed values,
every error with its path, the old single ``url`` still working."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from prometheus_client import CollectorRegistry

from controller.config.agent import insecure_urls, load_agent_config
from controller.config.desired import load_desired
from controller.config.desired_model import HaSettings, StoreKind
from controller.config.errors import ConfigError
from controller.metrics.agent import AgentSnapshot, _SnapshotCollector

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "controller"
AGENT = ROOT / "configs" / "agent-sjc-controlled.yaml"


def with_ha(tmp_path: Path, ha: Any) -> Path:
    d = tmp_path / "desired"
    shutil.copytree(EXAMPLE, d)
    data = yaml.safe_load((d / "controller.yaml").read_text())
    data["ha"] = ha
    (d / "controller.yaml").write_text(yaml.safe_dump(data))
    return d


def errors(directory: Path) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_desired(str(directory))
    return [f"{i.path}: {i.message}" for i in exc.value.issues]


def test_no_ha_section_is_the_embedded_store() -> None:
    assert load_desired(str(EXAMPLE)).ha is None


def test_an_etcd_section_is_read_with_its_defaults(tmp_path: Path) -> None:
    ha = load_desired(str(with_ha(tmp_path, {"store": "etcd", "endpoints": ["http://10.0.0.1:2379/",
                                                                             "http://10.0.0.2:2379"]}))).ha
    assert ha == HaSettings(StoreKind.ETCD, ("http://10.0.0.1:2379", "http://10.0.0.2:2379"))


def test_tls_and_every_knob(tmp_path: Path) -> None:
    ha = load_desired(str(with_ha(tmp_path, {
        "store": "etcd", "endpoints": ["https://[2001:db8::1]:2379"], "prefix": "/prod/anycast/", "lease_ttl": 10,
        "request_timeout": 2, "tls": {"ca_file": "/etc/anycast/etcd-ca.pem", "cert_file": "/etc/anycast/c.pem",
                                      "key_file": "/etc/anycast/c.key"}}))).ha
    assert ha is not None and ha.lease_ttl == 10 and ha.prefix == "/prod/anycast/" and ha.request_timeout == 2.0
    assert (ha.ca_file, ha.cert_file, ha.key_file) == ("/etc/anycast/etcd-ca.pem", "/etc/anycast/c.pem",
                                                       "/etc/anycast/c.key")


@pytest.mark.parametrize("ha, expected", [
    ({"store": "etcd"}, "controller.yaml: ha.endpoints: required"),
    ({"store": "zookeeper", "endpoints": ["http://a:1"]}, "controller.yaml: ha.store: expected one of file, etcd"),
    ({"store": "etcd", "endpoints": ["a:2379"]}, "controller.yaml: ha.endpoints[0]: expected http(s)://HOST:PORT"),
    ({"store": "etcd", "endpoints": ["http://a:2379"], "lease_ttl": 1}, "controller.yaml: ha.lease_ttl: must be >= 2"),
    ({"store": "etcd", "endpoints": ["http://a:2379"], "prefix": "anycast"}, "controller.yaml: ha.prefix: must start"),
    ({"store": "etcd", "endpoints": ["http://a:2379"], "tls": {"ca_file": "/ca"}},
     "controller.yaml: ha.endpoints: tls is set: every endpoint must be https://"),
    ({"store": "etcd", "endpoints": ["https://a:2379"], "tls": {"cert_file": "/c"}},
     "controller.yaml: ha.tls: cert_file and key_file go together"),
    ({"store": "etcd", "endpoints": ["http://a:2379"], "ttl": 5}, "controller.yaml: ha.ttl: unknown key"),
])
def test_bad_ha_sections_name_the_path(tmp_path: Path, ha: Any, expected: str) -> None:
    assert any(e.startswith(expected) for e in errors(with_ha(tmp_path, ha))), errors(with_ha(tmp_path / "x", ha))


def agent_with(tmp_path: Path, controller: dict[str, Any]) -> Path:
    data = yaml.safe_load(AGENT.read_text())
    data["controller"] = {"token_file": "/etc/anycast/token", **controller}
    p = tmp_path / "agent.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_agents_take_a_list_of_controllers_and_the_single_url_still_works(tmp_path: Path) -> None:
    link = load_agent_config(str(agent_with(tmp_path, {"urls": ["https://c1:9800", "https://c2:9800/"]}))).controller
    assert link is not None and link.urls == ("https://c1:9800", "https://c2:9800") and link.url == "https://c1:9800"
    one = load_agent_config(str(agent_with(tmp_path, {"url": "https://c1:9800"}))).controller
    assert one is not None and one.urls == ("https://c1:9800",) and one.url == "https://c1:9800"


def test_an_agent_refuses_a_plain_http_controller_unless_asked_for_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_agent_config(str(agent_with(tmp_path, {"urls": ["https://c1:9800", "http://[2001:db8::1]:9800"]})))
    assert [f"{i.path}: {i.message}" for i in exc.value.issues] == [
        "controller.urls[1]: http://[2001:db8::1]:9800 is plain HTTP: the POP's token and plans would cross the "
        "network in clear; use https:// (with ca_file: README, Security) or, to accept that, "
        "insecure_plain_http: true"]
    # A controller on this host: nothing crosses a network.
    for local in ("http://127.0.0.1:9800", "http://[::1]:9800", "http://localhost:9800/"):
        link = load_agent_config(str(agent_with(tmp_path, {"url": local}))).controller
        assert link is not None and not link.insecure_plain_http
    link = load_agent_config(str(agent_with(tmp_path, {"url": "http://c1:9800", "insecure_plain_http": True}))).controller
    assert link is not None and link.insecure_plain_http and link.url == "http://c1:9800"
    assert insecure_urls(link) == ("http://c1:9800",)  # the WARNING at start and the metric's 1


def test_the_agent_metric_says_when_its_controller_link_is_plain_http(tmp_path: Path) -> None:
    def gauge(controller: dict[str, Any]) -> float | None:
        cfg = load_agent_config(str(agent_with(tmp_path, controller)))
        assert cfg.controller is not None
        registry = CollectorRegistry()
        registry.register(_SnapshotCollector(lambda: AgentSnapshot(
            pop="fra", controller_ok=True, controller_insecure_http=bool(insecure_urls(cfg.controller)))))
        return registry.get_sample_value("anycast_agent_controller_insecure_http")

    assert gauge({"url": "http://c1:9800", "insecure_plain_http": True}) == 1.0
    assert gauge({"url": "http://127.0.0.1:9800", "insecure_plain_http": True}) == 0.0  # nothing crosses a network
    assert gauge({"url": "https://c1:9800"}) == 0.0


@pytest.mark.parametrize("controller, expected", [
    ({"url": "http://c1:9800", "urls": ["http://c2:9800"]}, "controller.urls: give url or urls, not both"),
    ({"urls": []}, "controller.urls: must list at least one controller URL"),
    ({"urls": ["c2:9800"]}, "controller.urls[0]: expected an http:// or https:// URL"),
])
def test_bad_controller_lists_name_the_path(tmp_path: Path, controller: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_agent_config(str(agent_with(tmp_path, controller)))
    assert any(f"{i.path}: {i.message}".startswith(expected) for i in exc.value.issues), exc.value.summary()
