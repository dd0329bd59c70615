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


def test_garbage_made_after_a_freeze_is_collected_at_a_freeze_an_hour_later(freezing: None,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # A long-poll's request parked at a freeze and finished since: frozen, then garbage. Young
    # collections never see it; the hourly full one does, and not more often.
    monkeypatch.setattr(daemon, "_last_full", [])
    t = [1000.0]
    daemon._freeze_heap(lambda: t[0])
    node = _Node()
    alive = weakref.ref(node)
    gc.collect(1)
    gc.collect(1)  # (old enough: generation 2)
    daemon._freeze_heap(lambda: t[0])  # frozen while alive
    del node
    t[0] += daemon.FULL_COLLECTION_EVERY - 1
    daemon._freeze_heap(lambda: t[0])
    assert alive() is not None  # not yet: the whole heap is scanned at most once an hour
    t[0] += 1
    daemon._freeze_heap(lambda: t[0])
    assert alive() is None
