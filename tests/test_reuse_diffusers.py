"""``monkey_generate(..., reuse=previous)``: pass 1 skipped only when it would be the same, and
the images then equal a call that runs it."""

from __future__ import annotations

import pytest
import torch
from test_diffusers_pipeline import ON, assert_unhooked, call, reference
from tiny_pipeline import tiny_pipeline

from monkey.diffusers.pipeline import monkey_generate

pytestmark = pytest.mark.usefixtures("one_thread")

TUNED = {**ON, "threshold": 0.3, "dilate": 8, "outside_weight": 0.1}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("sd"))


class Calls:
    """Counts the UNet's calls that ran (a forward hook: after the forward)."""

    def __init__(self, unet):
        self.count = 0
        self.handle = unet.register_forward_hook(lambda *_: setattr(self, "count", self.count + 1))

    def close(self):
        self.handle.remove()


def test_reuse_skips_pass_one_and_equals_running_it(pipe):
    first = monkey_generate(pipe, ON, **call())
    assert first.kept is not None and not first.reused
    calls = Calls(pipe.unet)
    try:
        reused = monkey_generate(pipe, TUNED, reuse=first, **call())
        reused_calls, calls.count = calls.count, 0
        fresh = monkey_generate(pipe, TUNED, **call())
        fresh_calls = calls.count
    finally:
        calls.close()
    assert reused.reused and reused.first_images is None
    assert "pass 1 reused (recorded steps 1, 2 of 4)" in reused.statuses[0]
    assert torch.equal(reused.images, fresh.images)
    assert torch.equal(reused.mask_set.binary, fresh.mask_set.binary)
    assert reused_calls == 8 and fresh_calls > reused_calls  # pass 2's calls only
    assert_unhooked(pipe)
    again = monkey_generate(pipe, ON, reuse=first.kept, **call())  # .kept works too
    assert again.reused


CHANGES = {
    "seed": {"generator": torch.Generator().manual_seed(8)},
    "prompt": {"prompt": "a cat in the snow"},
    "negative prompt": {"negative_prompt": "blurry"},
    "reference image": {"ip_adapter_image": reference(1)},
    "steps": {"num_inference_steps": 10},
    "cfg": {"guidance_scale": 5.0},
    "size": {"width": 48},
}


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
def test_a_change_to_what_pass_one_sees_runs_it_and_says_what_changed(pipe, change):
    first = monkey_generate(pipe, ON, **call())
    extra = dict(CHANGES[change])
    if "generator" in extra:
        extra["generator"] = torch.Generator().manual_seed(8)
    out = monkey_generate(pipe, TUNED, reuse=first, **call(**extra))
    assert not out.reused
    assert "pass 1 ran: its" in out.statuses[0]


def test_record_settings_ip_scale_and_fused_weights_run_pass_one(pipe):
    first = monkey_generate(pipe, ON, **call())
    assert not monkey_generate(pipe, {**TUNED, "token": 2}, reuse=first, **call()).reused
    pipe.set_ip_adapter_scale(0.7)
    try:
        out = monkey_generate(pipe, TUNED, reuse=first, **call())
    finally:
        pipe.set_ip_adapter_scale(1.0)
    assert not out.reused and "ip-adapter" in out.statuses[0]
    weight = pipe.unet.conv_in.weight
    saved = weight.detach().clone()
    with torch.no_grad():  # a LoRA fused into the weights
        weight.mul_(1.01)
    try:
        out = monkey_generate(pipe, TUNED, reuse=first, **call())
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert not out.reused and "model" in out.statuses[0]
    assert monkey_generate(pipe, TUNED, reuse=first, **call()).reused  # the control


def test_reuse_takes_only_a_result(pipe):
    with pytest.raises(TypeError, match="reuse="):
        monkey_generate(pipe, ON, reuse="abc", **call())
