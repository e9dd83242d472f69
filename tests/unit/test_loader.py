"""The app loader's pause of the garbage collector, in this process."""

from __future__ import annotations

import gc

import pytest

from forkserver.loader import collector_paused


@pytest.fixture(autouse=True)
def collector_restored():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()  # what the tests froze goes back to the oldest generation
    if enabled:
        gc.enable()
    else:
        gc.disable()


def test_the_collector_is_off_inside_and_on_again_after_with_what_was_made_frozen():
    gc.enable()
    frozen_before = gc.get_freeze_count()
    with collector_paused():
        assert not gc.isenabled()
        made = [[i] for i in range(1000)]  # tracked containers, as an import makes
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen_before + len(made)


def test_a_collector_that_was_off_stays_off():
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()


def test_the_collector_comes_back_when_the_import_fails():
    gc.enable()
    with pytest.raises(ImportError), collector_paused():
        raise ImportError("no module named 'missing'")
    assert gc.isenabled()
