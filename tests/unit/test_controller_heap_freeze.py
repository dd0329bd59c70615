"""The controller's heap freeze (server.daemon._freeze_heap) keeps no recent cyclic garbage."""

import gc
import weakref

import pytest

from controller.server import daemon


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture
def freezing(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(daemon, "FREEZE_HEAP", True)
    yield
    gc.unfreeze()


def test_recent_cyclic_garbage_is_collected_not_frozen(freezing: None) -> None:
    node = _Node()
    alive = weakref.ref(node)
    del node  # garbage now, in a cycle, in a young generation
    daemon._freeze_heap()
    assert alive() is None, "a freeze kept a cycle that was already garbage"
    assert gc.get_freeze_count() > 0


def test_live_objects_are_frozen_and_kept(freezing: None) -> None:
    node = _Node()
    alive = weakref.ref(node)
    daemon._freeze_heap()
    assert alive() is node
