"""MONKEY in AUTOMATIC1111's WebUI 1.10 and in what runs its processing (Forge: A1111 1.10.1).

Per batch, ``process_batch`` wraps the *current* ``p.sample`` (with sd-webui-controlnet, its
``process_sample``, which marks cond/uncond prompts) with a wrapper that removes itself when the
batch's sampling ends. The wrapper runs pass 1 with hires fix off and IP-Adapter attention
recorded, stops it right after the last recorded step, rebuilds ``p.rng`` exactly as
``process_images_inner`` built it, and runs pass 2 with every IP-Adapter output multiplied by its
image's mask.

Where the IP-Adapter lives is the one thing that differs between WebUIs: an ``IPBackend``
(``backend``: sd-webui-controlnet's hooks in ``controlnet``, Forge's UNet patches in ``forge``)
finds the units and opens each batch's session and hooks; everything else here is shared.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import layers as layer_tables
from .. import status
from ..args import MAPS_LABEL, STATUS_LABEL, VERSION_LABEL, MonkeyArgs, MonkeyArgsError, labels
from ..fingerprint import Fingerprint
from ..hooks import AttrPatch, HookSet
from ..kept import STORE, KeptMaps
from ..maskset import MaskSet, UnitMasks
from ..rows import RowLayout
from ..session import MonkeySession, Phase, resolve_source_unit
from ..steps import pass1_length
from ..twopass import TwoPassResult, run_two_pass
from ..version import __version__
from . import fingerprint, progress, schedule
from .backend import IPBackend, IPBatch
from .images import pil_to_tensor, previews_of, samples_to_images
from .noise import reset_rng
from .options import opts_keeping, settings_for

logger = logging.getLogger("monkey")

RUN_ATTR = "_monkey_run"

LIVE_HOOKS: weakref.WeakSet[HookSet] = weakref.WeakSet()
"""Hooks of batches still sampling; removed on script unload if a reload interrupts one."""


@dataclass
class BatchOutcome:
    offset: int
    n_images: int
    masks: MaskSet | UnitMasks | None
    first_images: list = field(default_factory=list)
    kept: KeptMaps | None = None


class MonkeyRun:
    """One generation's MONKEY state, kept on ``p`` as ``p._monkey_run``."""

    def __init__(
        self, settings: MonkeyArgs, backend: IPBackend, error: MonkeyArgsError | None = None
    ):
        self.settings = settings
        self.backend = backend
        self.error = error
        self.skip_reason: str | None = None
        self.batches: list[BatchOutcome] = []
        self.statuses: dict[int, str] = {}
        self.map_ids: dict[int, str] = {}
        """Per image of the generation, the id of its batch's kept pass-1 maps."""
        self.keep, self.reuse = opts_keeping()
        STORE.capacity = self.keep
        self._sample_patch: AttrPatch | None = None
        self._live: IPBatch | None = None
        """The batch that is sampling now: its session and the hooks that end with it."""

    # -- messages -------------------------------------------------------------------------------

    def skip(self, p: Any, reason: str) -> None:
        """MONKEY does nothing for this generation; say so in the log, the UI and the infotext."""
        self.skip_reason = reason
        self.note(p, f"skipped: {reason}")

    def note(self, p: Any, message: str) -> None:
        logger.warning("MONKEY %s", message)
        comment = getattr(p, "comment", None)
        if callable(comment):
            comment(f"MONKEY {message}")

    def status_text(self, p: Any, index: int, all_seeds: list, **_: Any) -> str | None:
        """Per-image infotext value; ``create_infotext`` calls it with its locals."""
        if self.skip_reason:
            return f"skipped: {self.skip_reason}"
        if len(all_seeds) != len(getattr(p, "all_seeds", all_seeds)):  # per-batch infotext call
            index += getattr(p, "iteration", 0) * getattr(p, "batch_size", 1)
        return self.statuses.get(index)

    def maps_text(self, p: Any, index: int, all_seeds: list, **_: Any) -> str | None:
        """Per-image infotext value: the id of its kept maps (``POST /monkey/v1/masks``)."""
        if len(all_seeds) != len(getattr(p, "all_seeds", all_seeds)):
            index += getattr(p, "iteration", 0) * getattr(p, "batch_size", 1)
        return self.map_ids.get(index)

    # -- sampling -------------------------------------------------------------------------------

    def wrap_sample(self, p: Any) -> None:
        """Wrap the current ``p.sample`` for this batch; the wrapper removes itself when done."""
        self.unwrap_sample()  # a batch that never sampled must not leave a wrapper to nest

        def make(original: Callable) -> Callable:
            def monkey_sample(*args, **kwargs):
                if not patch.installed:  # left under someone else's wrapper: stay inert
                    return original(*args, **kwargs)
                try:
                    return self.sample_batch(p, original, args, kwargs)
                finally:
                    patch.remove()

            return monkey_sample

        patch = AttrPatch(p, "sample", make)
        patch.install()
        self._sample_patch = patch

    def unwrap_sample(self) -> None:
        patch = self._sample_patch
        if patch is not None:
            patch.remove()
            self._sample_patch = None

    def sample_batch(self, p: Any, original: Callable, args: tuple, kwargs: dict):
        if self.error is not None:
            raise self.error
        if self.skip_reason:
            return original(*args, **kwargs)
        batch = self.backend.open_batch(self, p, kwargs)
        if batch is None:
            return original(*args, **kwargs)
        session, hooks = batch.session, batch.hooks
        hooks.add(
            schedule.denoiser_callback(session, lambda params: self._identify(p, batch, params))
        )
        LIVE_HOOKS.add(hooks)
        self._live = batch
        try:
            result = run_two_pass(
                session,
                lambda phase: self._pass(p, original, args, kwargs, phase),
                reset_noise=lambda: reset_rng(p),
                hooks=hooks,
                cancelled=progress.cancelled,
                first_is_final=_pass_one_is_plain(p, self.settings),
                store=STORE if self.keep else None,
            )
        finally:
            self._live = None
            LIVE_HOOKS.discard(hooks)
            hooks.close()
        self._record(p, batch, result)
        return result.samples

    def _identify(self, p: Any, batch: IPBatch, params: Any) -> None:
        """Pass 1's first denoiser call: fingerprint what the UNet is about to see, so that the
        session reuses kept maps of the same fingerprint (reuse on) and keeps its own."""
        session = batch.session
        if not self.keep or getattr(batch, "fingerprinted", False):
            return
        batch.fingerprinted = True  # once per batch, whether or not it could be taken
        try:
            fp = Fingerprint()
            unet = self.backend.fingerprint(p, batch, fp)
            if unet is None:
                return
            pass_id = fingerprint.pass_one(p, params, session, unet, fp)
        except Exception:  # a fingerprint that cannot be taken costs reuse, not the image
            logger.exception("MONKEY: cannot fingerprint pass 1; it runs")
            return
        session.identify(pass_id, STORE, reuse=self.reuse)

    def source_index(self, n_units: int) -> int:
        """The unit that records in mask mode ``shared`` (the session notes a missing one)."""
        return resolve_source_unit(self.settings, n_units)[0]

    def new_session(
        self, p: Any, available: list[str], layout: RowLayout, units: int = 1
    ) -> MonkeySession:
        """A batch's session for ``units`` IP-Adapter units, recording at the settings' layers
        among ``available``; its notes (a missing source unit, unused unit thresholds) are the
        run's."""
        try:
            layers = layer_tables.source_layers(self.settings.layers, available)
        except KeyError as error:
            raise MonkeyArgsError(
                "layers", ", ".join(self.settings.layers) or "default", str(error)
            ) from None
        offset = getattr(p, "iteration", 0) * p.batch_size
        session = MonkeySession(self.settings, layers, layout, image_offset=offset, units=units)
        for note in session.notes:
            self.note(p, note)
        return session

    def watch_sampler(self, p: Any) -> None:
        """``process_before_every_sampling``: read the schedule this sampler run is handed, so the
        step of each denoiser call comes from its noise level (see ``steps.StepClock``)."""
        batch = self._live
        if batch is None:
            return
        session, hooks = batch.session, batch.hooks
        batch.before_sampling(p)
        sampler = getattr(p, "sampler", None)
        if not callable(getattr(sampler, "func", None)):
            session.use_schedule(None)
            return
        if any(
            isinstance(h, AttrPatch) and h.owner is sampler and h.installed for h in hooks.handles
        ):
            return  # img2img keeps one sampler for every pass and batch: already watched
        patch = AttrPatch(
            sampler, "func", lambda func: schedule.schedule_reader(func, sampler, p, session)
        )
        hooks.add(patch)
        patch.install()

    def _pass(self, p: Any, original: Callable, args: tuple, kwargs: dict, phase: Phase):
        progress.show_pass(phase, self._live is not None and self._live.session.reused)
        if phase is not Phase.RECORD:
            return original(*args, **kwargs)
        steps = pass1_length(p.steps, self.settings.pass1_steps)
        progress.extend_progress(p, self.settings, steps)
        scoped = HookSet()
        if _pass_one_skips_hires(p):
            scoped.add(AttrPatch(p, "enable_hr", lambda _: False))  # hires only in pass 2
        if steps != p.steps:  # pass 1 samples its own, shorter schedule from the same noise
            scoped.add(AttrPatch(p, "steps", lambda _: steps))
        with scoped:
            samples = original(*args, **kwargs)
        progress.end_pass_one()
        return samples

    def _record(self, p: Any, batch: IPBatch, result: TwoPassResult) -> None:
        session = batch.session
        n_images = session.layout.n_images
        reason = result.skipped_reason or batch.unmasked_reason()
        masks = result.masks if reason is None else None
        outcome = BatchOutcome(session.image_offset, n_images, masks)
        if masks is not None and result.kept is not None:
            outcome.kept = result.kept
            for image in range(n_images):
                self.map_ids[session.image_offset + image] = result.kept.id
        if masks is None:
            reason = self.backend.explain(p, reason)
            self.note(p, f"did not mask batch {getattr(p, 'iteration', 0) + 1}: {reason}")
        elif self.settings.preview_pass1 and result.first is not None:
            outcome.first_images = samples_to_images(p, result.first)
        steps_text = ""
        if masks is not None:
            silent = batch.silent_layers() & session.source_layers
            steps_text = status.schedule_text(session) + status.silent_text(silent)
        for image in range(n_images):
            self.statuses[session.image_offset + image] = (
                status.unit_status(masks, image)
                if isinstance(masks, UnitMasks)
                else status.status(masks, image, reason, session.token_count)
            ) + steps_text
        self.batches.append(outcome)

    # -- after the images -----------------------------------------------------------------------

    def finish(self, p: Any, processed: Any) -> None:
        """Append previews (masks, pass-1 images) after the images and save masks if asked."""
        from modules import images as webui_images

        previews, infotexts = [], []
        first = getattr(processed, "index_of_first_image", 0)
        for batch in self.batches:
            if batch.kept is not None:
                keep_images(batch.kept, processed.images[first + batch.offset :][: batch.n_images])
            for image in range(batch.n_images):
                index = batch.offset + image
                position = first + index
                if batch.masks is None or position >= len(processed.images):
                    continue
                info = processed.infotexts[position] if position < len(processed.infotexts) else ""
                shown, saved = previews_of(
                    batch.masks, image, processed.images[position], getattr(p, "is_api", False)
                )
                if self.settings.preview:
                    previews.extend(shown)
                    infotexts.extend([info] * len(shown))
                if self.settings.preview_pass1 and image < len(batch.first_images):
                    previews.append(batch.first_images[image])
                    infotexts.append(info)
                if self.settings.save_masks and p.save_samples():
                    for suffix, mask in saved.items():
                        # RGB: Forge's save_image hides the infotext in the pixels (its stealth
                        # pnginfo, on by default) and fails on a one-channel image
                        webui_images.save_image(
                            mask.convert("RGB"),
                            p.outpath_samples,
                            "",
                            p.all_seeds[index],
                            p.all_prompts[index],
                            "png",
                            info=info,
                            p=p,
                            suffix=suffix,
                        )
        processed.images.extend(previews)
        processed.infotexts.extend(infotexts)


# -- host glue ----------------------------------------------------------------------------------


def keep_images(kept: KeptMaps, images: list) -> None:
    """The generated images (small copies) and their size, for the preview and the API."""
    if images:
        kept.size = images[0].size
        kept.keep_images([pil_to_tensor(image) for image in images])


def _pass_one_is_plain(p: Any, settings: MonkeyArgs) -> bool:
    """Pass 1, run to its end, is the plain generation: same steps, and hires (if any) kept."""
    same_steps = pass1_length(p.steps, settings.pass1_steps) == p.steps
    return same_steps and not _pass_one_skips_hires(p)


def _pass_one_skips_hires(p: Any) -> bool:
    # with a first-pass image (the gallery's upscale button) the hires pass is all there is
    return bool(getattr(p, "enable_hr", False)) and getattr(p, "firstpass_image", None) is None


# -- the Script's hooks -------------------------------------------------------------------------


def _our_keys() -> list[str]:
    return [*labels().values(), VERSION_LABEL, STATUS_LABEL, MAPS_LABEL]


def start(p: Any, script_args: tuple, backend: IPBackend) -> MonkeyRun | None:
    """``Script.process``: parse the settings; when enabled, write them to the infotext."""
    params = p.extra_generation_params
    for key in _our_keys():  # XYZ cells share one dict: drop what an earlier cell wrote
        params.pop(key, None)
    settings, error = settings_for(p, script_args)
    if not settings.enabled:
        return None
    run = MonkeyRun(settings, backend, error)
    setattr(p, RUN_ATTR, run)
    if error is not None:
        logger.error("MONKEY: %s", error)
        return run
    params.update(settings.to_infotext())
    params[VERSION_LABEL] = __version__
    params[STATUS_LABEL] = run.status_text
    params[MAPS_LABEL] = run.maps_text
    reason = backend.unavailable(p)
    if reason is not None:
        run.skip(p, reason)
    elif getattr(p, "refiner_checkpoint", None) is not None:
        run.skip(p, "the refiner swaps models inside sampling; turn the refiner off to use MONKEY")
    return run


def before_batch(p: Any) -> None:
    """``Script.process_batch``."""
    run = getattr(p, RUN_ATTR, None)
    if run is not None:
        run.wrap_sample(p)


def before_sampling(p: Any) -> None:
    """``Script.process_before_every_sampling``."""
    run = getattr(p, RUN_ATTR, None)
    if run is not None:
        run.watch_sampler(p)


def finish(p: Any, processed: Any) -> None:
    """``Script.postprocess``."""
    run = getattr(p, RUN_ATTR, None)
    if run is None:
        return
    try:
        run.unwrap_sample()
        run.finish(p, processed)
    finally:
        delattr(p, RUN_ATTR)


def unload() -> None:
    """``on_script_unloaded``: nothing of ours may outlive the script."""
    for hooks in list(LIVE_HOOKS):
        hooks.remove()
    LIVE_HOOKS.clear()
