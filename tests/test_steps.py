"""Step arithmetic: windows, recorded steps, pass-1 length, and the sampler-step clock."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from monkey.args import ALL, PASS1_MIN_STEPS, MonkeyArgs
from monkey.steps import StepClock, StepPlan, pass1_length, spread, window


@pytest.mark.parametrize("n", range(4, 151))
def test_default_window_is_the_reference_codes_middle_half(n):
    assert list(window(n, 0.25, 0.75)) == list(range(n))[n // 4 : -(n // 4)]


@pytest.mark.parametrize(
    ("n", "expected"), [(10, range(2, 8)), (25, range(6, 19)), (30, range(7, 23))]
)
def test_window_examples_from_the_issue(n, expected):
    assert window(n, 0.25, 0.75) == expected


def test_window_end_one_includes_the_last_step_and_fractions_round_exactly():
    assert window(8, 0.0, 1.0) == range(8)
    assert window(10, 0.3, 0.7) == range(3, 7)  # 0.3 * 10 is 3.0000000000000004 in floats


def test_two_recorded_steps_at_four_steps_are_the_references_1_and_2():
    assert spread(window(4, 0.25, 0.75), 2) == (1, 2)


@given(st.integers(1, 200), st.integers(1, 12))
def test_spread_picks_distinct_steps_inside_the_window(n, count):
    steps = window(n, 0.25, 0.75)
    picked = spread(steps, count)
    assert len(picked) == min(count, len(steps))
    assert all(step in steps for step in picked) and list(picked) == sorted(set(picked))
    assert spread(steps, ALL) == tuple(steps)


@given(st.integers(1, 300), st.floats(0.0, 1.0))
def test_pass_one_length_is_the_fraction_half_up_never_under_four_nor_over_n(steps, fraction):
    length = pass1_length(steps, fraction)
    assert length == min(steps, max(4, math.floor(fraction * steps + 0.5)))
    assert pass1_length(steps, 1.0) == steps
    assert pass1_length(8, 0.5) == 4  # the reference's 4 against 8


@given(st.integers(1, 300), st.integers(PASS1_MIN_STEPS, 1000))
def test_a_step_count_is_pass_ones_length_up_to_the_generations(steps, count):
    assert pass1_length(steps, count) == min(steps, count)


@pytest.mark.parametrize("n", range(1, 151))
def test_every_step_count_gets_the_references_pass_one_where_it_can(n):
    """Pass 1 runs at least the reference's 4 steps (all n when n < 4): 4 to 8 steps record
    exactly steps 1 and 2 of a 4-step pass 1, as the reference does; no n ≥ 4 records the
    pure-noise step 0; a 4-step pass 1 (``pass1_steps: 4``) does so at every n ≥ 4."""
    defaults = MonkeyArgs()
    length = pass1_length(n, defaults.pass1_steps)
    plan = StepPlan.for_settings(length, defaults)
    assert length == (n if n < 4 else max(4, math.floor(n / 2 + 0.5)))
    assert plan.record and all(0 <= step < length for step in plan.record)
    if 4 <= n <= 8:
        assert (length, plan.record) == (4, (1, 2))
    if n >= 4:
        assert 0 not in plan.record
        fixed = pass1_length(n, 4)
        assert (fixed, StepPlan.for_settings(fixed, defaults).record) == (4, (1, 2))
    assert StepPlan.for_settings(n, defaults).apply  # pass 2 masks at least one step


def test_plan_stops_pass_one_after_its_last_recorded_step():
    plan = StepPlan.of(15, (0.25, 0.75), 2, (0.25, 0.75))
    assert plan.record == (5, 9) and plan.last_record == 9
    assert plan.apply == range(3, 12)


# -- the clock ---------------------------------------------------------------------------------------

SIGMAS = torch.linspace(10.0, 0.5, 8).tolist()


def euler(levels):
    return [(i, s) for i, s in enumerate(levels)]


def heun(levels):
    """Evaluations at the step's sigma and at the next one (none after the last step)."""
    calls = []
    for i, s in enumerate(levels):
        calls.append((i, s))
        if i + 1 < len(levels):
            calls.append((i, levels[i + 1]))
    return calls


def dpm2(levels):
    nxt = [*levels[1:], 0.0]
    calls = []
    for i, s in enumerate(levels):
        calls.append((i, s))
        if nxt[i] > 0:
            calls.append((i, math.sqrt(s * nxt[i])))
    return calls


def plms(levels):
    """Pseudo improved Euler on the first step only: it evaluates the second step's level too."""
    return [(0, levels[0]), (0, levels[1]), *[(i, s) for i, s in enumerate(levels) if i >= 1]]


@pytest.mark.parametrize(
    ("calls", "end_evals"),
    [(euler, 0), (heun, 1 << 30), (dpm2, 0), (plms, 1)],
    ids=["euler", "heun", "dpm2", "plms"],
)
def test_every_evaluation_of_a_step_gets_that_step(calls, end_evals):
    clock = StepClock(SIGMAS, end_evals)
    expected = calls(SIGMAS)
    assert [(clock.step_at(level), level) for _, level in expected] == expected


def test_heun_without_its_kind_would_put_the_second_evaluation_in_the_next_step():
    clock = StepClock(SIGMAS)
    assert [clock.step_at(level) for _, level in heun(SIGMAS)][:4] == [0, 1, 1, 2]


@given(st.lists(st.floats(0.01, 12.0), min_size=1, max_size=60))
def test_any_number_of_calls_maps_each_level_to_one_step(levels):
    clock = StepClock(SIGMAS)
    steps = [clock.step_at(level) for level in sorted(levels, reverse=True)]
    assert steps == sorted(steps) and all(0 <= step < len(SIGMAS) for step in steps)
    for level, step in zip(sorted(levels, reverse=True), steps):
        assert level <= SIGMAS[step] * (1 + 1e-4) or step == 0
        if step + 1 < len(SIGMAS):
            assert level > SIGMAS[step + 1]


def test_calls_past_the_nominal_end_count_as_the_last_step():
    clock = StepClock(SIGMAS)
    assert clock.step_at(0.01) == len(SIGMAS) - 1
    assert clock.step_at(50.0) == 0


def test_levels_must_descend():
    with pytest.raises(ValueError, match="must not increase"):
        StepClock([1.0, 2.0])
