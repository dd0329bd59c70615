"""The controller's config directory: the example loads; errors name file and path."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from controller.cli.anycastctl import main as anycastctl
from controller.config.desired import load_desired
from controller.config.desired_model import ApiTransport, api_transport, plain_http_refusal
from controller.config.errors import ConfigError

from tests.helpers.config_dirs import EXAMPLE, copy, edit, errors  # noqa: F401


def test_example_directory_loads() -> None:
    s = load_desired(str(EXAMPLE), "abc123")
    assert [p.name for p in s.pops] == ["sjc", "fra", "sin"]
    game = s.vip("game-global")
    assert game is not None and game.publish == ("sjc", "fra", "sin") and game.enabled
    api = s.vip("api-eu")
    assert api is not None and api.policy.failover.failback_hold_down == 120
    assert api.policy.safety == s.policy.safety  # overrides are per key; the rest is global
    assert [v.name for v in s.published_at("sin")] == ["game-global"]
    assert s.revision == "abc123"


def test_unknown_pop_in_publish(tmp_path: Path) -> None:
    d = copy(tmp_path)
    edit(d, "vips.yaml", lambda v: v["vips"][0]["publish"].append("lhr"))
    assert any(e.startswith("vips.yaml: vips[0].publish[3]: unknown POP 'lhr'") for e in errors(d))


def test_plain_token_instead_of_its_hash(tmp_path: Path) -> None:
    d = copy(tmp_path)
    edit(d, "pops.yaml", lambda p: p["pops"][1].__setitem__("token_sha256", "hunter2"))
    assert any(e.startswith("pops.yaml: pops[1].token_sha256: expected 64 lowercase hex digits")
               for e in errors(d))


def test_vip_outside_allowed_prefixes_and_bad_policy(tmp_path: Path) -> None:
    d = copy(tmp_path)
    edit(d, "vips.yaml", lambda v: v["vips"][1].__setitem__("address", "203.0.113.20"))
    edit(d, "controller.yaml", lambda c: c["policy"]["failover"].__setitem__("quorum", 1.5))
    errs = errors(d)
    assert any(e.startswith("vips.yaml: vips[1].address: 203.0.113.20/32 is outside the allowed") for e in errs)
    assert "controller.yaml: policy.failover.quorum: must be <= 1.0, got 1.5" in errs


def test_duplicate_vip_and_unknown_key(tmp_path: Path) -> None:
    d = copy(tmp_path)
    (d / "vips").mkdir()
    vip = yaml.safe_load((d / "vips.yaml").read_text())["vips"][0]
    (d / "vips" / "more.yaml").write_text(yaml.safe_dump({"vips": [dict(vip, name="other")]}))
    edit(d, "controller.yaml", lambda c: c["policy"]["safety"].__setitem__("max_withdraw_fractoin", 0.2))
    errs = errors(d)
    assert any("duplicate VIP address 198.51.100.10/32" in e for e in errs)
    assert any(e.startswith("controller.yaml: policy.safety.max_withdraw_fractoin: unknown key") for e in errs)


def test_missing_file_is_named(tmp_path: Path) -> None:
    d = copy(tmp_path)
    (d / "pops.yaml").unlink()
    assert errors(d) == ["pops.yaml: cannot read file: No such file or directory"]


def test_anycastctl_validate_accepts_a_controller_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert anycastctl(["validate", str(EXAMPLE)]) == 0
    d = copy(tmp_path)
    edit(d, "vips.yaml", lambda v: v["vips"][0]["publish"].append("lhr"))
    assert anycastctl(["validate", str(d)]) == 1
    out = capsys.readouterr().out
    assert f"{EXAMPLE}: OK" in out
    assert "vips.yaml: vips[0].publish[3]: unknown POP 'lhr'" in out


def test_a_reload_with_the_cache_reads_what_changed_and_refuses_what_is_wrong(tmp_path: Path) -> None:
    """The daemon's load cache: an unchanged VIP comes back as the same object, a changed one
    is read again; an edit that is wrong, or a context change (allowed prefixes) that makes an
    unchanged VIP wrong, is refused with its path exactly as without the cache."""
    from controller.config.desired import LoadCache

    d = copy(tmp_path)
    cache = LoadCache()
    first = load_desired(str(d), "r1", cache)
    edit(d, "vips.yaml", lambda data: data["vips"][1].__setitem__("publish", ["fra"]))
    second = load_desired(str(d), "r2", cache)
    assert second.vip("game-global") is first.vip("game-global")
    assert second.vip("api-eu").publish == ("fra",)  # type: ignore[union-attr]

    edit(d, "vips.yaml", lambda data: data["vips"][0].__setitem__("address", "10.9.9.9/32"))
    with pytest.raises(ConfigError) as info:
        load_desired(str(d), "r3", cache)
    assert any("vips.yaml: vips[0].address" in str(i) for i in info.value.issues)
    edit(d, "vips.yaml", lambda data: data["vips"][0].__setitem__("address", "198.51.100.10/32"))
    assert load_desired(str(d), "r4", cache).vip("game-global") is first.vip("game-global")

    edit(d, "controller.yaml", lambda data: data.__setitem__("allowed_prefixes", ["198.51.100.16/28"]))
    with pytest.raises(ConfigError) as info:
        load_desired(str(d), "r5", cache)
    assert [str(i) for i in info.value.issues] == errors(d)  # the same errors as an uncached load
    assert any("vips.yaml: vips[0].address" in str(i) for i in info.value.issues)


THREE_VIPS = """# three VIPs
vips:
  - name: a
    address: 198.51.100.1/32
    publish: [sjc]
    check: {type: tcp}
    origins: [{region: us-west, next_hop: 100.64.10.1, backends: ["100.64.10.1:8080"]}]

  # a comment between entries
  - name: b
    address: 198.51.100.2/32
    publish: [fra]
    check: {type: tcp}
    origins:
      - region: us-west
        next_hop: 100.64.10.1
        backends: ["100.64.10.1:8080"]
  - name: c
    address: 198.51.100.3/32
    publish: [sin]
    check: {type: tcp}
    origins: [{region: us-west, next_hop: 100.64.10.1, backends: ["100.64.10.1:8080"]}]
"""


def test_a_changed_vip_file_is_parsed_entry_by_entry_and_only_the_changed_entry_is_parsed(tmp_path: Path) -> None:
    from controller.config.desired import LoadCache

    d = copy(tmp_path)
    (d / "vips").mkdir(exist_ok=True)
    (d / "vips" / "more.yaml").write_text(THREE_VIPS)
    cache = LoadCache()
    first = load_desired(str(d), "r1", cache)
    raw = {name: cache.vips[name][0] for name in ("a", "b", "c")}
    (d / "vips" / "more.yaml").write_text(THREE_VIPS.replace("publish: [fra]", "publish: [fra, sjc]"))
    second = load_desired(str(d), "r2", cache)
    assert cache.vips["a"][0] is raw["a"] and cache.vips["c"][0] is raw["c"]  # not parsed again
    assert cache.vips["b"][0] is not raw["b"]
    assert second.vip("a") is first.vip("a") and second.vip("b").publish == ("fra", "sjc")  # type: ignore[union-attr]
    assert second == load_desired(str(d), "r2")  # the same as reading everything afresh


@pytest.mark.parametrize("broken", [
    THREE_VIPS.replace("publish: [fra]", "publish: [fra"),  # YAML syntax in one entry
    THREE_VIPS.replace("  - name: c\n", "  - name: c\n    name: d\n"),  # duplicate key in one entry
    THREE_VIPS + "other: 1\n",  # another top-level key: not splittable, parsed whole
    THREE_VIPS.replace("  - name: b", "  - &b\n    name: b").replace("  - name: c\n", "  - <<: *b\n    name: c\n"),
])
def test_an_entry_by_entry_reload_reports_exactly_what_a_whole_load_reports(tmp_path: Path, broken: str) -> None:
    from controller.config.desired import LoadCache

    d = copy(tmp_path)
    (d / "vips").mkdir(exist_ok=True)
    (d / "vips" / "more.yaml").write_text(THREE_VIPS)
    cache = LoadCache()
    load_desired(str(d), "r1", cache)
    (d / "vips" / "more.yaml").write_text(broken)
    try:
        cached = load_desired(str(d), "r2", cache)
    except ConfigError as exc:
        assert [str(i) for i in exc.issues] == errors(d)
    else:
        assert cached == load_desired(str(d), "r2")  # the anchors case is valid: parsed whole


def test_only_the_plain_shape_is_split() -> None:
    from controller.config.desired import _split_vips

    assert _split_vips(THREE_VIPS) is not None and len(_split_vips(THREE_VIPS) or []) == 3
    assert _split_vips("vips:\n- name: a\n  address: x\n- name: b\n") == ["- name: a\n  address: x\n", "- name: b\n"]
    for text in ("vips: []\n", "vips:\n  - name: a\n  x: 1\n", "vips:\n\t- name: a\n", "---\nvips:\n  - a\n",
                 "vips:\n  - name: a\n    d: \"two\n  lines\"\n", "other: 1\nvips:\n  - a\n"):
        assert _split_vips(text) is None, text


def test_two_pops_sharing_a_token_hash_are_refused(tmp_path: Path) -> None:
    d = copy(tmp_path)
    edit(d, "pops.yaml", lambda p: p["pops"][2].__setitem__("token_sha256", p["pops"][0]["token_sha256"]))
    assert errors(d) == ["pops.yaml: pops[2].token_sha256: the same token hash as POP 'sjc': "
                         "every POP needs a token of its own"]


def test_an_operator_token_equal_to_a_pops_is_refused(tmp_path: Path) -> None:
    d = copy(tmp_path)
    fra = yaml.safe_load((d / "pops.yaml").read_text())["pops"][1]["token_sha256"]
    edit(d, "controller.yaml", lambda c: c.__setitem__("operator_token_sha256", fra))
    assert errors(d) == ["controller.yaml: operator_token_sha256: the same hash as POP 'fra''s token_sha256 in "
                         "pops.yaml: the operator token must differ from every agent token"]


def test_the_api_section_reads_its_bounds_tls_and_signing_key(tmp_path: Path) -> None:
    d = copy(tmp_path)
    assert load_desired(str(d)).api.tls is not None  # the example: HTTPS
    edit(d, "controller.yaml", lambda c: c.__setitem__("api", {
        "header_timeout": 5, "body_timeout": 20, "max_unauthenticated_connections": 64,
        "tls": {"cert": "/etc/anycast/tls/controller.pem", "key": "/etc/anycast/tls/controller.key",
                "client_ca": "/etc/anycast/tls/ca.pem"},
        "signing_key": "/etc/anycast/plan.key"}))
    api = load_desired(str(d)).api
    assert (api.header_timeout, api.body_timeout, api.max_unauthenticated_connections) == (5, 20, 64)
    assert api.tls is not None and api.tls.client_ca == "/etc/anycast/tls/ca.pem"
    assert api.signing_key == "/etc/anycast/plan.key"


def test_plain_http_beyond_loopback_is_refused_naming_the_path_and_what_to_do(tmp_path: Path) -> None:
    d = copy(tmp_path)
    edit(d, "controller.yaml", lambda c: c.__setitem__("api", {"header_timeout": 5}))
    errs = errors(d)
    assert errs == ["controller.yaml: api.tls: the API would listen on 0.0.0.0 in plain HTTP (bearer tokens and "
                    "plans in clear): set api.tls (cert, key: README, Security) or, to accept that, "
                    "api.insecure_plain_http: true"], errs
    # Loopback only: nothing crosses a network, no setting needed.
    edit(d, "controller.yaml", lambda c: c.__setitem__("listen", "127.0.0.1:9800"))
    api = load_desired(str(d)).api
    assert (api.tls, api.insecure_plain_http) == (None, False)
    assert api_transport(api, "127.0.0.1") == ApiTransport.LOOPBACK_HTTP
    assert plain_http_refusal(api, "10.0.0.1") is not None and plain_http_refusal(api, "::1") is None
    # Asked for by name: accepted, and flagged as such.
    edit(d, "controller.yaml", lambda c: (c.__setitem__("listen", "0.0.0.0:9800"),
                                          c.__setitem__("api", {"insecure_plain_http": True})))
    api = load_desired(str(d)).api
    assert api.insecure_plain_http and api_transport(api, "0.0.0.0") == ApiTransport.INSECURE_HTTP
    assert api_transport(api, "127.0.0.1") == ApiTransport.INSECURE_HTTP  # the setting wins: flagged
    # Both: a contradiction, refused.
    edit(d, "controller.yaml", lambda c: c["api"].__setitem__("tls", {"cert": "/etc/c.pem", "key": "/etc/c.key"}))
    assert errors(d) == ["controller.yaml: api.insecure_plain_http: api.tls is set: remove insecure_plain_http "
                         "(HTTPS is served)"]


def test_api_mistakes_name_the_key(tmp_path: Path) -> None:
    d = copy(tmp_path)
    edit(d, "controller.yaml", lambda c: c.__setitem__("api", {
        "header_timeout": 0, "tls": {"cert": "tls/controller.pem"}, "signing_key": "plan.key", "tsl": {}}))
    errs = errors(d)
    assert "controller.yaml: api.header_timeout: must be >= 0.5, got 0.0" in errs
    assert "controller.yaml: api.tls.cert: expected an absolute path, got 'tls/controller.pem'" in errs
    assert "controller.yaml: api.tls.key: required" in errs
    assert "controller.yaml: api.signing_key: expected an absolute path, got 'plan.key'" in errs
    assert any(e.startswith("controller.yaml: api.tsl: unknown key") for e in errs)


def test_an_empty_allowed_list_and_a_hold_down_above_its_maximum_are_refused(tmp_path: Path) -> None:
    d = copy(tmp_path)
    edit(d, "controller.yaml", lambda c: c.__setitem__("allowed_prefixes", []))
    edit(d, "controller.yaml", lambda c: c["policy"]["dampening"].__setitem__("hold_down", 900))
    errs = errors(d)
    assert "controller.yaml: allowed_prefixes: at least one prefix is needed" in errs
    assert "controller.yaml: policy.dampening.hold_down: 900 is above max_hold_down 600" in errs


def test_the_vip_file_is_cut_as_the_line_by_line_definition_cuts_it() -> None:
    """_split_vips cuts with regular expressions; _split_vips_lines says what the cut is, line by
    line. Random texts of the shapes that matter (entries at one or several indentations,
    deeper lines, comments and blanks anywhere, a continuation at the entries' indentation,
    odd whitespace, no final newline) must be cut the same, or refused by both."""
    import random
    import time

    from controller.config.desired import _split_vips, _split_vips_lines

    entries = ["- name: a", "- x: 1", "-  spaced", "- - nested"]
    deeper = ["name: b", "address: 10.0.0.1/32", "publish: [sjc, fra]", "- listed", "d: \"two"]
    blanks = ["# a comment", "#", ""]
    breakers = ["-", "lines\"", "vips:", "other: 1", "x:\r", "caf\u00e9: 1", "\x0c", "name: c"]
    seed = time.time_ns() % 100_000
    cut = 0
    for s in [*range(400), seed]:
        rng = random.Random(s)
        head = rng.choice(["", "# top\n", "\n", "  \n# c\n"])
        base = rng.choice([0, 2, 4])
        lines = []
        for _ in range(rng.randint(0, 12)):
            kind = rng.random()
            if kind < 0.3 or not lines:
                lines.append(" " * base + rng.choice(entries))
            elif kind < 0.85:
                lines.append(" " * (base + rng.choice([2, 4, 1])) + rng.choice(deeper))
            elif kind < 0.95:
                lines.append(" " * rng.randint(0, base + 4) + rng.choice(blanks))
            else:
                lines.append(" " * rng.randint(0, base + 2) + rng.choice(breakers))
        text = head + rng.choice(["vips:", "vips:  # the VIPs", "vips: []"]) + "\n" + "\n".join(lines)
        if rng.random() < 0.7:
            text += "\n"
        got = _split_vips(text)
        assert got == _split_vips_lines(text), (s, text)
        cut += got is not None
    assert cut > 100  # the texts are mostly of the shape that is cut, not all refused


def test_the_load_cache_keeps_no_parsed_tree_and_reads_a_kept_entry_again_when_its_context_changes(
        tmp_path: Path) -> None:
    """The daemon's cache holds each VIP entry as its text (a _Read token), not as its parsed
    YAML tree; when what the entry means depends on changed (here the check defaults), it is
    read again from that text, exactly as an uncached load reads it."""
    from controller.config.desired import LoadCache, _Read

    d = copy(tmp_path)
    (d / "vips").mkdir(exist_ok=True)
    (d / "vips" / "more.yaml").write_text(THREE_VIPS)
    cache = LoadCache()
    first = load_desired(str(d), "r1", cache)
    assert all(isinstance(raw, _Read) for raw, _, _ in cache.vips.values())
    assert all(isinstance(item, _Read) for item in cache.files["vips/more.yaml"][1]["vips"])
    edit(d, "controller.yaml", lambda data: data["check_defaults"].__setitem__("interval", 0.7))
    second = load_desired(str(d), "r2", cache)
    assert second == load_desired(str(d), "r2")
    assert second.vip("a") != first.vip("a")  # read again: its check's interval is the new default
    assert all(isinstance(raw, _Read) for raw, _, _ in cache.vips.values())
