"""The host-free two-pass orchestration, driven by a small ancestral sampler over a real UNet."""

from __future__ import annotations

import pytest
import torch
from tiny import Inputs, tiny_unet, with_ip_adapter

from monkey.args import MonkeyArgs
from monkey.diffusers.hooks import DiffusersMonkey
from monkey.masks import MaskStatus
from monkey.rows import RowLayout
from monkey.session import MonkeySession, Phase
from monkey.twopass import run_two_pass

SOURCE = "up_blocks.0.attentions.1.transformer_blocks.0.attn2"
STEPS = 8


@pytest.fixture(scope="module")
def unet():
    return with_ip_adapter(tiny_unet())


class Sampler:
    """Seeded initial and per-step noise from one generator, like the WebUI's ``p.rng``."""

    def __init__(self, unet, session: MonkeySession | None, images: int = 2):
        self.unet, self.session = unet, session
        self.inputs = Inputs(unet, images=images)
        self.images = images
        self.reset_noise()
        self.calls: list[tuple[str, int]] = []
        self.starts: list[torch.Tensor] = []
        self.fail_in: Phase | None = None

    def reset_noise(self) -> None:
        self.rng = torch.Generator().manual_seed(1234)

    def __call__(self, phase: Phase = Phase.IDLE) -> torch.Tensor:
        x = torch.randn(self.images, 4, 16, 16, generator=self.rng)
        self.starts.append(x.clone())
        for step in range(STEPS):
            if self.session is not None:
                self.session.begin_step(step, STEPS)
                if self.session.should_stop():
                    break
            if phase is self.fail_in and step == 3:
                raise RuntimeError(f"boom in {phase.value}")
            self.calls.append((phase.value, step))
            eps = self.inputs(self.unet, torch.cat([x, x]), torch.tensor(999 - 120 * step))
            uncond, cond = eps.chunk(2)
            x = (
                x
                - 0.1 * (uncond + 3.0 * (cond - uncond))
                + 0.05 * torch.randn(x.shape, generator=self.rng)
            )
        return x


def run(unet, settings: MonkeyArgs, **two_pass_kw):
    session = MonkeySession(settings, (SOURCE,), RowLayout.diffusers(2, cfg=True))
    sampler = Sampler(unet, session)
    monkey = DiffusersMonkey(unet, session)
    result = run_two_pass(
        session, sampler, reset_noise=sampler.reset_noise, hooks=monkey.hooks, **two_pass_kw
    )
    return result, sampler, monkey, session


def test_pass_one_stops_right_after_its_last_recorded_step(unet):
    result, sampler, _, session = run(unet, MonkeyArgs())
    record = [step for phase, step in sampler.calls if phase == "record"]
    apply = [step for phase, step in sampler.calls if phase == "apply"]
    assert record == [0, 1, 2, 3, 4, 5]  # window [0.25, 0.75) of 8 = steps 2..5
    assert apply == list(range(STEPS))
    assert session.recorder.steps() == (3, 5)  # two steps, at the window's quartiles
    assert result.masked and result.masks.binary.shape == (2, 8, 8)
    assert torch.equal(sampler.starts[0], sampler.starts[1])  # same seed, same noise
    assert session.phase is Phase.IDLE


def test_full_masks_without_the_schedule_reproduce_plain_ip_adapter(unet):
    plain = Sampler(unet, None)()
    # threshold 0 keeps every pixel; with IP kept outside the window pass 2 is plain IP-Adapter,
    # which it can only be if the noise (initial and per-step) was reset to pass 1's
    result, *_ = run(unet, MonkeyArgs(threshold=0.0, ip_off_outside=False))
    assert all(status is MaskStatus.FULL for status in result.masks.statuses)
    assert (result.samples - plain).abs().max() <= 1e-6


def test_masked_pass_two_differs_from_plain_and_from_pass_one(unet):
    plain = Sampler(unet, None)()
    result, *_ = run(unet, MonkeyArgs())
    assert not torch.allclose(result.samples, plain)
    assert result.first is not None and result.first.shape == result.samples.shape
    fractions = result.masks.binary.float().mean(dim=(1, 2))
    assert bool(((fractions > 0) & (fractions < 1)).all())


@pytest.mark.parametrize("phase", [Phase.RECORD, Phase.APPLY], ids=lambda p: p.value)
def test_an_error_inside_a_pass_leaves_nothing_patched(unet, phase):
    before = dict(unet.attn_processors)
    session = MonkeySession(MonkeyArgs(), (SOURCE,), RowLayout.diffusers(2, cfg=True))
    sampler = Sampler(unet, session)
    sampler.fail_in = phase
    monkey = DiffusersMonkey(unet, session)
    with pytest.raises(RuntimeError, match=f"boom in {phase.value}"):
        run_two_pass(session, sampler, reset_noise=sampler.reset_noise, hooks=monkey.hooks)
    assert not monkey.hooks.installed
    assert session.phase is Phase.IDLE
    assert all(a is b for a, b in zip(unet.attn_processors.values(), before.values()))
    assert not unet._forward_pre_hooks


def test_cancel_between_passes_returns_pass_one(unet):
    result, sampler, monkey, _ = run(unet, MonkeyArgs(), cancelled=lambda: True)
    assert result.skipped_reason == "interrupted after pass 1"
    assert result.samples is result.first
    assert {phase for phase, _ in sampler.calls} == {"record"}
    assert not monkey.hooks.installed


def nothing_observed(monkeypatch) -> None:
    """A pass 1 that records nothing (a unit whose start/end excludes the record window)."""
    monkeypatch.setattr(MonkeySession, "observe", lambda *_args, **_kwargs: None)


def test_nothing_recorded_returns_the_full_pass_one(unet, monkeypatch):
    nothing_observed(monkeypatch)
    result, sampler, monkey, _ = run(unet, MonkeyArgs())
    assert "no IP-Adapter attention was recorded" in result.skipped_reason
    assert [step for _, step in sampler.calls] == list(range(STEPS))
    assert not monkey.hooks.installed


def test_nothing_recorded_and_pass_one_not_final_samples_plainly_again(unet, monkeypatch):
    plain = Sampler(unet, None)()
    nothing_observed(monkeypatch)
    result, sampler, _, _ = run(unet, MonkeyArgs(), first_is_final=False)
    assert [phase for phase, _ in sampler.calls].count("idle") == STEPS
    assert torch.equal(result.samples, plain)
    assert result.masks is None and "no IP-Adapter attention" in result.skipped_reason
