"""Mask mode ``per_unit``: each IP-Adapter unit masked to its own subject, in the host-free core."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from monkey.args import MonkeyArgs
from monkey.masks import MaskStatus, minmax_normalize
from monkey.maskset import MaskSet, UnitMasks
from monkey.rows import RowLayout
from monkey.session import MonkeySession, Phase

LAYER = "output_blocks.4.1.transformer_blocks.0.attn2"
LATENT = (16, 16)
N = 64  # the layer works at 8×8 of the 16×16 latent
HEADS, D, T = 2, 8, 4
STEPS = 8  # the default plan records steps 3 and 5
PER_UNIT = MonkeyArgs(mask_mode="per_unit", threshold=0.3)
SHARED = dataclasses.replace(PER_UNIT, mask_mode="shared")


def queries(images: int = 2, seed: int = 0) -> dict[int, torch.Tensor]:
    """Each recorded step's ``[rows, heads, N, d]`` queries (cond rows then uncond rows)."""
    gen = torch.Generator().manual_seed(seed)
    return {step: torch.randn(2 * images, HEADS, N, D, generator=gen) for step in (3, 5)}


def unit_key(seed: int, images: int = 2) -> torch.Tensor:
    """One unit's ``[rows, heads, T, d]`` IP keys: its own reference image's."""
    gen = torch.Generator().manual_seed(100 + seed)
    return torch.randn(1, HEADS, T, D, generator=gen).expand(2 * images, -1, -1, -1) * 1.5


def record(args: MonkeyArgs, keys: list[torch.Tensor], images: int = 2) -> MonkeySession:
    """Pass 1 of a session that sees every unit at every recorded step, as a host does."""
    session = MonkeySession(args, (LAYER,), RowLayout.webui([1] * images), units=len(keys))
    session.begin(Phase.RECORD)
    for step, query in queries(images).items():
        session.begin_step(step, STEPS)
        session.begin_unet_call(2 * images, LATENT)
        for unit, key in enumerate(keys):
            session.observe(LAYER, query, key, unit)
    session.end()
    session.build_masks()
    return session


def score(session: MonkeySession, unit: int, image: int) -> torch.Tensor:
    """The unit's normalised attention per pixel, computed here from its recorded maps."""
    maps = session.recorders[unit].result().maps[image].reshape(2, -1)
    return minmax_normalize(maps)[0].amax(dim=0).reshape(8, 8)


def test_two_units_get_disjoint_masks_covering_the_union_of_their_own():
    keys = [unit_key(1), unit_key(2)]
    per_unit = record(PER_UNIT, keys).masks
    alone = [record(dataclasses.replace(SHARED, source_unit=u), keys).masks for u in (0, 1)]
    assert isinstance(per_unit, UnitMasks) and all(isinstance(m, MaskSet) for m in alone)
    session = record(PER_UNIT, keys)
    for image in range(2):
        a, b = (per_unit.units[u].binary[image] for u in (0, 1))
        own_a, own_b = (alone[u].binary[image] for u in (0, 1))
        overlap = own_a & own_b
        assert overlap.any(), "the example must have overlapping subjects to resolve"
        assert a.any() and b.any() and not (a & b).any()
        assert torch.equal(a | b, own_a | own_b)
        assert torch.equal(a & ~overlap, own_a & ~overlap)  # outside overlaps: untouched
        higher = score(session, 0, image) >= score(session, 1, image)  # ties: the lower index
        assert torch.equal(a[overlap], higher[overlap])


def test_swapping_the_units_swaps_the_masks():
    keys = [unit_key(1), unit_key(2)]
    forward = record(PER_UNIT, keys).masks
    swapped = record(PER_UNIT, keys[::-1]).masks
    for unit in (0, 1):
        assert torch.equal(forward.units[unit].binary, swapped.units[1 - unit].binary)
        assert forward.units[unit].statuses == swapped.units[1 - unit].statuses


def test_one_unit_per_unit_is_the_shared_mask_exactly():
    keys = [unit_key(1)]
    shared = record(SHARED, keys).masks
    per_unit = record(PER_UNIT, keys).masks
    only = per_unit.units[0]
    assert torch.equal(only.binary, shared.binary)
    assert (only.statuses, only.thresholds, only.tokens) == (
        shared.statuses,
        shared.thresholds,
        shared.tokens,
    )


def test_unit_thresholds_reach_their_own_unit():
    keys = [unit_key(1), unit_key(2)]
    args = dataclasses.replace(PER_UNIT, thresholds=("unit1=0.8", 0.6))
    masks = record(args, keys).masks
    assert masks.units[0].thresholds == [0.6, 0.3]  # its per-image entry, then the threshold
    assert masks.units[1].thresholds == [0.8, 0.8]
    shared = record(dataclasses.replace(args, mask_mode="shared", source_unit=1), keys).masks
    assert shared.thresholds == [0.8, 0.8]  # shared: the source unit's entry


def test_a_unit_without_signal_keeps_plain_ip_adapter_and_leaves_the_others_alone():
    flat = torch.zeros_like(unit_key(2))  # every token alike: a flat map
    keys = [unit_key(1), flat]
    masks = record(PER_UNIT, keys).masks
    alone = record(SHARED, keys).masks
    assert masks.units[1].statuses == [MaskStatus.NO_SIGNAL] * 2
    assert masks.units[1].binary.all()
    assert torch.equal(masks.units[0].binary, alone.binary)


def test_a_unit_pass_one_never_saw_gets_plain_ip_adapter():
    session = MonkeySession(PER_UNIT, (LAYER,), RowLayout.webui([1, 1]), units=3)
    session.begin(Phase.RECORD)
    for step, query in queries().items():
        session.begin_step(step, STEPS)
        session.begin_unet_call(4, LATENT)
        session.observe(LAYER, query, unit_key(1), 0)
    session.end()
    masks = session.build_masks()
    assert len(masks.units) == 3
    assert masks.units[2].statuses == [MaskStatus.NO_SIGNAL] * 2
    assert masks.for_unit(7).binary.all()  # even one the host never named


def test_a_unit_that_would_lose_every_pixel_keeps_its_own_mask():
    key = unit_key(1)
    masks = record(PER_UNIT, [key, key.clone()]).masks  # the same reference twice
    assert masks.units[0].statuses != [MaskStatus.OVERLAP] * 2
    assert masks.units[1].statuses == [MaskStatus.OVERLAP] * 2
    assert torch.equal(masks.units[0].binary, masks.units[1].binary)


def test_weights_follow_each_units_mask_and_per_unit_needs_the_unit():
    session = record(PER_UNIT, [unit_key(1), unit_key(2)])
    session.begin(Phase.APPLY)
    session.begin_step(3, STEPS)
    session.begin_unet_call(4, LATENT)
    for unit in (0, 1):
        weights = session.weights(N, torch.device("cpu"), unit=unit)
        expected = session.masks.units[unit].binary.reshape(2, -1).float()
        assert torch.equal(weights[:, :, 0], expected[[0, 1, 0, 1]])  # cond rows, uncond rows
    with pytest.raises(ValueError, match="per_unit"):
        session.weights(N, torch.device("cpu"))
    session.end()
    session.begin(Phase.RECORD)
    session.begin_step(3, STEPS)
    session.begin_unet_call(4, LATENT)
    with pytest.raises(ValueError, match="per_unit"):
        session.observe(LAYER, queries()[3], unit_key(1))


def test_shared_mode_records_only_the_source_unit():
    keys = [unit_key(1), unit_key(2)]
    session = record(dataclasses.replace(SHARED, source_unit=1), keys)
    assert set(session.recorders) == {1}
    missing = MonkeySession(
        dataclasses.replace(SHARED, source_unit=5), (LAYER,), RowLayout.webui([1]), units=2
    )
    assert missing.source_unit == 0 and "source unit 5 does not exist" in missing.notes[0]


def test_unit_thresholds_naming_no_unit_are_reported():
    args = dataclasses.replace(PER_UNIT, thresholds=("unit1=0.4", "unit2=auto", 0.6))
    session = MonkeySession(args, (LAYER,), RowLayout.webui([1]), units=2)
    assert session.notes == [
        "per-image thresholds unit2=auto name no unit (2 IP-Adapter unit(s), counted from 0); unused"
    ]
    assert not MonkeySession(args, (LAYER,), RowLayout.webui([1]), units=3).notes
