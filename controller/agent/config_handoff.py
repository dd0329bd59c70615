"""The agent's config, parsed once per start.

``anycast-agent launch`` loads and validates the config before it execs ExaBGP (a bad
config fails the start, not the API process under ExaBGP's respawns), and ExaBGP's API
process, ``anycast-agent run``, loaded the same file again: at 10,000 VIPs ~0.5 CPU s as
JSON, ~1.4 s as YAML, before the first announcement of a cold start.

Now ``launch`` hands its typed config over in a file of the state directory: pickled
(with cyclic GC paused: ~0.1 s each way at 10,000 VIPs), with the SHA-256 of the config
text and of the command line's overrides it was built from, sealed with an HMAC. The key is
new at each launch and travels only in the environment ExaBGP passes to its API process
(``/proc/PID/environ`` is readable by the service's user and root alone), so a file that
anyone else wrote, or an earlier launch left, is refused before it is unpickled. ``run``
takes the config over only when the seal holds and the file it was told to load still has
the text the config was built from; otherwise it loads that file as before. So what ``run``
acts on is always what loading its file now would give. A reload (SIGHUP) reads the file.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle
from collections.abc import MutableMapping, Sequence

from ..config.model import AgentConfig
from ..config.reader import gc_paused

log = logging.getLogger("controller.agent")

ENV_KEY = "ANYCAST_AGENT_CONFIG_KEY"  # the seal's key (hex), from launch to the API process
ENV_FILE = "ANYCAST_AGENT_CONFIG_HANDOFF"  # the handoff's path (the config names the state directory)
FILE = "config.handoff"
_MAGIC = b"anycast-agent config handoff 1\n"
_MAC = hashlib.sha256().digest_size


def identity(text: str, overrides: Sequence[str]) -> bytes:
    """What a config is built from: its file's text and the overrides of the command line."""
    h = hashlib.sha256(text.encode("utf-8", "surrogatepass"))
    for arg in overrides:
        h.update(b"\0" + arg.encode("utf-8", "surrogatepass"))
    return h.digest()


def seal(config: AgentConfig, built_from: bytes, key: bytes) -> bytes:
    """The handoff's bytes: ``config``, built from ``built_from`` (``identity``), sealed with ``key``."""
    with gc_paused():  # ~500,000 objects at 10,000 VIPs: each collection would walk them again
        payload = pickle.dumps((built_from, config), protocol=pickle.HIGHEST_PROTOCOL)
    return _MAGIC + hmac.new(key, payload, hashlib.sha256).digest() + payload


def unseal(blob: bytes, built_from: bytes, key: bytes) -> AgentConfig | None:
    """The config in ``blob`` if ``key`` sealed it and it was built from ``built_from``, else
    None. Nothing is unpickled before the seal is checked."""
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + _MAC:
        return None
    mac, payload = blob[len(_MAGIC):len(_MAGIC) + _MAC], blob[len(_MAGIC) + _MAC:]
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()):
        return None
    with gc_paused():
        found, config = pickle.loads(payload)  # noqa: S301 - sealed by this start's launch (above)
    if found != built_from or not isinstance(config, AgentConfig):
        return None
    return config


def hand_over(state_dir: str, config: AgentConfig, built_from: bytes) -> dict[str, str]:
    """Write the handoff (launch); the environment ExaBGP must pass on to the API process.
    Nothing (the API process loads the file itself) if it cannot be written."""
    key = os.urandom(32)
    path = os.path.join(state_dir, FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(seal(config, built_from, key))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot hand the loaded config over in %s (%s): the agent process loads it again", path,
                    exc.strerror)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return {}
    return {ENV_KEY: key.hex(), ENV_FILE: path}


def take_over(built_from: bytes, environ: MutableMapping[str, str]) -> AgentConfig | None:
    """The config launch handed over for this text and these overrides (run), or None: load
    it. The key leaves ``environ`` (nothing the agent starts inherits it)."""
    text, path = environ.pop(ENV_KEY, ""), environ.pop(ENV_FILE, "")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        return None
    if not key or not path:
        return None
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError:
        return None
    try:
        return unseal(blob, built_from, key)
    except Exception as exc:  # noqa: BLE001 - sealed yet unreadable (another version's classes): load the file
        log.warning("the config handed over by launch cannot be read (%s): loading the file", exc)
        return None

