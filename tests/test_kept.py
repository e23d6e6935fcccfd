"""Kept maps: the fingerprint of pass 1, the bounded store, and a pass 2 that reuses them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from monkey import args as A
from monkey.args import MonkeyArgs
from monkey.fingerprint import (
    MASK_FIELDS,
    OUTPUT_FIELDS,
    RECORD_FIELDS,
    Fingerprint,
    record_settings,
    weights_probe,
)
from monkey.kept import KeptMaps, MapStore
from monkey.rows import RowLayout
from monkey.session import MonkeySession, Phase
from monkey.twopass import run_two_pass

LAYERS = ("a", "b")
STEPS = 8


def test_every_setting_is_a_record_a_mask_or_an_output_setting():
    groups = [set(RECORD_FIELDS), set(MASK_FIELDS), set(OUTPUT_FIELDS)]
    assert set().union(*groups) == set(A.names())
    assert sum(len(g) for g in groups) == len(A.names())  # no setting in two groups


def fingerprint(**parts) -> str:
    fp = Fingerprint()
    for name, value in parts.items():
        fp.add(name, value)
    return fp.finish()


def test_tensors_are_fingerprinted_bit_for_bit():
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    same = fingerprint(latent=x.clone(), cfg=7.0)
    assert fingerprint(latent=x, cfg=7.0) == same
    nudged = x.clone()
    nudged[1, 3, 7, 7] = torch.nextafter(nudged[1, 3, 7, 7], torch.tensor(1e9))
    assert fingerprint(latent=nudged, cfg=7.0).id != same.id
    assert fingerprint(latent=x.half(), cfg=7.0).id != same.id  # dtype counts
    assert fingerprint(latent=x.reshape(4, 2, 8, 8), cfg=7.0).id != same.id  # shape counts
    assert fingerprint(latent=x, cfg=7.5).changed(same) == ["cfg"]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"k": 1}, {"k": 1.0}),
        ([1, 2], (1, 2)),
        (None, "None"),
        ({"a": [1]}, {"a": [1, None]}),
        (0.0, -0.0),
    ],
    ids=["int-float", "list-tuple", "none-str", "nested", "signed-zero"],
)
def test_values_that_differ_hash_differently(a, b):
    assert fingerprint(v=a).id != fingerprint(v=b).id


def test_objects_are_hashed_by_their_fields_and_modules_by_their_weights():
    class Emb:
        def __init__(self, cond):
            self.cond, self._cache = cond, object()

    a = fingerprint(emb=Emb(torch.ones(3)))
    assert fingerprint(emb=Emb(torch.ones(3))) == a  # private caches ignored
    assert fingerprint(emb=Emb(torch.zeros(3))).id != a.id
    linear = torch.nn.Linear(4, 4)
    probe = weights_probe(linear)
    assert weights_probe(linear) == probe
    with torch.no_grad():
        linear.weight.mul_(1.01)  # a LoRA merged in place
    assert weights_probe(linear) != probe


def test_record_settings_are_exactly_the_record_fields():
    args = MonkeyArgs(enabled=True, threshold=0.3, token=2)
    assert record_settings(args) == {name: getattr(args, name) for name in RECORD_FIELDS}
    assert record_settings(dataclasses.replace(args, threshold=0.9)) == record_settings(args)


# -- the store ----------------------------------------------------------------------------------


def kept(id: str, maps=None) -> KeptMaps:
    from monkey.fingerprint import PassOneId
    from monkey.recorder import RecordedMaps

    maps = maps if maps is not None else torch.rand(1, 2, 4, 4)
    recorded = RecordedMaps(maps, (2, 4), (8, 8), 1, 4)
    return KeptMaps(PassOneId(id, {}), {0: recorded}, MonkeyArgs(enabled=True), 1, 0, 1, 0)


def test_the_store_is_a_bounded_lru():
    store = MapStore(2)
    store.put(kept("a"))
    store.put(kept("b"))
    assert store.get("a") is not None  # a is now the most recent
    store.put(kept("c"))
    assert "b" not in store and "a" in store and "c" in store
    store.capacity = 1
    assert len(store) == 1 and "c" in store
    store.capacity = 0
    store.put(kept("d"))
    assert len(store) == 0  # size 0 keeps nothing


def test_one_512px_images_maps_take_a_few_kb():
    # the paper's layer at 512 px is 16×16; two recorded steps, float32
    entry = kept("x", torch.rand(1, 2, 16, 16))
    assert entry.nbytes == 2 * 16 * 16 * 4
    entry.keep_images([torch.zeros(512, 512, 3, dtype=torch.uint8)])
    assert entry.images[0].shape == (256, 256, 3)
    assert entry.nbytes < 1 << 20


def test_kept_masks_refuse_other_record_settings_and_follow_mask_settings():
    entry = kept("x")
    low = entry.masks(MonkeyArgs(enabled=True, threshold=0.1))
    high = entry.masks(MonkeyArgs(enabled=True, threshold=0.9))
    assert low.binary.sum() > high.binary.sum()
    with pytest.raises(ValueError, match="token"):
        entry.masks(MonkeyArgs(enabled=True, token=0))


# -- reuse in the two passes ----------------------------------------------------------------------


class Sampler:
    """Feeds the session random attention like a UNet would; counts its calls."""

    def __init__(self, session: MonkeySession, seed: int = 0, images: int = 2):
        self.session, self.seed, self.images = session, seed, images
        self.calls: list[tuple[str, int]] = []
        self.pass_id = fingerprint(seed=seed, images=images)

    def __call__(self, phase: Phase):
        gen = torch.Generator().manual_seed(self.seed)
        session = self.session
        for step in range(STEPS):
            session.begin_step(step, STEPS)
            if phase is Phase.RECORD and step == 0:
                session.identify(self.pass_id, self.store, reuse=self.reuse)
            if session.should_stop():
                break
            self.calls.append((phase.value, step))
            session.begin_unet_call(2 * self.images, (8, 8))
            q = torch.randn(2 * self.images, 2, 16, 8, generator=gen)
            k = torch.randn(2 * self.images, 2, 4, 8, generator=gen)
            for layer in LAYERS:
                session.observe(layer, q, k, 0)
            if session.ip_action().value == "masked":
                self.weights = session.weights(16, torch.device("cpu"), unit=0)
        return torch.full((self.images,), float(step))


def two_pass(args: MonkeyArgs, store: MapStore, reuse: bool = True, seed: int = 0):
    session = MonkeySession(args, LAYERS, RowLayout.diffusers(2, True))
    sampler = Sampler(session, seed)
    sampler.store, sampler.reuse = store, reuse
    result = run_two_pass(session, sampler, reset_noise=lambda: None, store=store)
    return result, sampler, session


@pytest.mark.parametrize("mode", ["shared", "per_unit"])
def test_a_second_generation_with_other_mask_settings_skips_pass_one(mode):
    store = MapStore(4)
    args = MonkeyArgs(enabled=True, mask_mode=mode)
    first, _, _ = two_pass(args, store)
    assert not first.reused and first.kept is not None and first.kept.id in store
    tuned = dataclasses.replace(args, threshold=0.3, dilate=8)
    second, sampler2, session = two_pass(tuned, store)
    assert second.reused and second.first is None
    assert not [c for c in sampler2.calls if c[0] == "record"]  # no UNet call in pass 1
    fresh, sampler3, _ = two_pass(tuned, store, reuse=False)
    assert not fresh.reused and [c for c in sampler3.calls if c[0] == "record"]
    # reuse builds the very masks a fresh pass 1 builds
    for unit in range(1):
        a = second.masks.for_unit(unit if mode == "per_unit" else None)
        b = fresh.masks.for_unit(unit if mode == "per_unit" else None)
        assert torch.equal(a.binary, b.binary) and a.thresholds == b.thresholds
    assert torch.equal(sampler2.weights, sampler3.weights)
    assert session.token_count == 4


def test_another_fingerprint_or_record_setting_runs_pass_one():
    store = MapStore(4)
    args = MonkeyArgs(enabled=True)
    two_pass(args, store, seed=0)
    other, _, _ = two_pass(args, store, seed=1)
    assert not other.reused
    assert len(store) == 2


def test_an_offered_entry_that_does_not_match_says_what_changed():
    store = MapStore(4)
    args = MonkeyArgs(enabled=True)
    first, _, _ = two_pass(args, store, seed=0)
    session = MonkeySession(args, LAYERS, RowLayout.diffusers(2, True))
    session.begin(Phase.RECORD)
    assert not session.identify(fingerprint(seed=1, images=2), offered=first.kept)
    assert session.missed == ["seed"]
    assert session.identify(fingerprint(seed=0, images=2), offered=first.kept)
    assert session.should_stop()
