"""A ``monkey_generate`` call's MONKEY objects are freed by reference counting when it returns
(as a WebUI generation's are: test_webui_cycles), not left in reference cycles, holding the
call's session, maps and masks, for the next full garbage collection."""

from __future__ import annotations

import gc

import pytest
from test_diffusers_pipeline import ON, call
from tiny_pipeline import tiny_pipeline

from monkey.diffusers.hooks import DiffusersMonkey
from monkey.diffusers.pipeline import PipelineRun, monkey_generate
from monkey.hooks import HookSet
from monkey.session import MonkeySession

pytestmark = pytest.mark.usefixtures("one_thread")

OURS = (MonkeySession, HookSet, PipelineRun, DiffusersMonkey)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("sd"))


def test_nothing_of_a_call_waits_for_the_garbage_collector(pipe):
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        output = monkey_generate(pipe, ON, **call())
        del output
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, OURS)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []
