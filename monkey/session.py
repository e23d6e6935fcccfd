"""One batch's MONKEY state: which pass runs, which step it is at, and what each layer should do.

Hosts feed it the step clock (``begin_step``) and each UNet call's rows (``begin_unet_call``);
their per-layer wrappers ask it what to do (``ip_action``, ``wants_record``) and hand it tensors
(``observe``, ``weights``). It never touches a host object.

Several IP-Adapter units: a host passes each call's unit index (0 = first enabled unit) to
``wants_record``, ``observe`` and ``weights``; the session decides what that unit records and
which mask it gets (mask mode ``shared``: the source unit records, one mask for all; ``per_unit``:
every unit records its own map and gets its own mask). ``unit=None`` means "the source unit" in
``shared`` mode, for hosts that pick the source themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch

from . import maskset
from .args import PER_UNIT, MonkeyArgs, UnitThreshold
from .fingerprint import PassOneId
from .kept import KeptMaps, MapStore
from .masks import row_weights
from .maskset import MaskSet, UnitMasks
from .recorder import MapRecorder, RecordedMaps
from .rows import RowLayout, Rows, RowTracker
from .steps import StepClock, StepPlan


class Phase(str, Enum):
    IDLE = "idle"
    RECORD = "record"
    APPLY = "apply"


class IPAction(str, Enum):
    PLAIN = "plain"
    """Leave the IP-Adapter output as the host computed it."""
    MASKED = "masked"
    """Multiply the IP-Adapter output by the image's mask."""
    OFF = "off"
    """No IP-Adapter contribution at this step."""


_NO_PLAN = StepPlan(0, (), range(0))


def resolve_source_unit(args: MonkeyArgs, units: int) -> tuple[int, str | None]:
    """The unit that records in mask mode ``shared``: ``source_unit``, or unit 0 with a note
    when there are only ``units`` units."""
    if args.source_unit < units:
        return args.source_unit, None
    return 0, (
        f"source unit {args.source_unit} does not exist ({units} IP-Adapter unit(s)); using unit 0"
    )


class MonkeySession:
    def __init__(
        self,
        args: MonkeyArgs,
        source_layers: tuple[str, ...],
        layout: RowLayout,
        *,
        image_offset: int = 0,
        units: int = 1,
    ):
        self.args = args
        self.source_layers = frozenset(source_layers)
        self._layers = tuple(source_layers)
        self.layout = layout
        self.image_offset = image_offset
        self.rows = RowTracker(layout)
        self.per_unit = args.mask_mode == PER_UNIT
        self.units = max(1, units)
        """How many IP-Adapter units the host has (grows with the unit indices it passes)."""
        self.source_unit, note = resolve_source_unit(args, self.units)
        self.notes: list[str] = [note] if note else []
        """What the host should tell the user (a missing source unit, unused unit thresholds)."""
        unused = [
            str(entry)
            for entry in args.thresholds
            if isinstance(entry, UnitThreshold) and entry.unit >= self.units
        ]
        if unused:
            self.notes.append(
                f"per-image thresholds {', '.join(unused)} name no unit ({self.units} IP-Adapter "
                "unit(s), counted from 0); unused"
            )
        self.recorders: dict[int, MapRecorder] = {}
        """Each recording unit's maps (``shared``: the source unit's only)."""
        self.masks: MaskSet | UnitMasks | None = None
        self.phase = Phase.IDLE
        self.step = 0
        self.total = 0
        self.clock: StepClock | None = None
        """The sampler's own schedule, where the host can read it; else it counts steps itself."""
        self.plans: dict[Phase, StepPlan] = {}
        """The plan of each pass's current sampler run."""
        self.history: list[tuple[Phase, StepPlan]] = []
        """Every sampler run's plan in order: pass 1, pass 2 and its hires pass."""
        self._weights: dict[tuple, torch.Tensor] = {}
        self._uniform: dict[int, float | None] = {}
        """id of a cached weights tensor -> its value where it is the same everywhere (1 or 0)."""
        self._recording = False
        self._action = IPAction.PLAIN
        self.pass_id: PassOneId | None = None
        """Pass 1's fingerprint, once the host has told it (``identify``)."""
        self.kept: KeptMaps | None = None
        """The kept maps this batch reuses in place of its pass 1 (None: pass 1 records)."""
        self.missed: list[str] = []
        """Fingerprint parts that differed from the kept maps offered by the caller."""

    # -- clock ----------------------------------------------------------------------------------

    def begin(self, phase: Phase) -> None:
        if phase is Phase.APPLY and self.masks is None:
            raise RuntimeError("pass 2 needs masks; call build_masks() first")
        self.phase = phase
        self.step, self.total = 0, 0
        self.clock = None
        self._weights.clear()
        self._uniform.clear()
        self._decide()
        self.plans.pop(phase, None)
        self.rows.new_denoiser_call()

    def end(self) -> None:
        self.phase = Phase.IDLE
        self._decide()

    @property
    def active(self) -> bool:
        return self.phase is not Phase.IDLE

    def begin_step(self, step: int, total: int) -> None:
        """A new denoiser call at sampler step ``step`` of ``total`` (rows are counted from here)."""
        self.step, self.total = step, total
        if self.active and (self.phase not in self.plans or self.plan.total != total):
            self.plans[self.phase] = StepPlan.for_settings(total, self.args)
            self.history.append((self.phase, self.plan))
        self._decide()
        self.rows.new_denoiser_call()

    def use_schedule(self, clock: StepClock | None) -> None:
        """A sampler run starts on this schedule (None: the host counts steps itself)."""
        self.clock = clock
        self.plans.pop(self.phase, None)

    def begin_level(self, level: float) -> None:
        """A new denoiser call at noise level ``level`` of the schedule given to ``use_schedule``."""
        if self.clock is None:
            raise RuntimeError("no schedule: call use_schedule() first")
        self.begin_step(self.clock.step_at(level), self.clock.total)

    @property
    def plan(self) -> StepPlan:
        return self.plans.get(self.phase) or _NO_PLAN

    def begin_unet_call(self, n_rows: int, latent_hw: tuple[int, int]) -> Rows:
        return self.rows.unet_call(n_rows, latent_hw)

    def begin_unet_chunks(
        self, kinds: Sequence[bool], chunk: int, latent_hw: tuple[int, int]
    ) -> Rows:
        """A UNet call whose rows are described by the host (see ``RowTracker.chunks``)."""
        return self.rows.chunks(kinds, chunk, latent_hw)

    def should_stop(self) -> bool:
        """Pass 1 has recorded and passed its window, or reuses kept maps: the host may end it
        here."""
        if self.phase is not Phase.RECORD:
            return False
        if self.kept is not None:
            return True
        last = self.plan.last_record
        return self.has_data and last is not None and self.step > last

    # -- kept maps ------------------------------------------------------------------------------

    @property
    def reused(self) -> bool:
        return self.kept is not None

    def identify(
        self,
        pass_id: PassOneId,
        store: MapStore | None = None,
        *,
        reuse: bool = True,
        offered: KeptMaps | None = None,
    ) -> bool:
        """Pass 1's fingerprint, told by the host at pass 1's first denoiser call (before the
        UNet runs); with ``reuse``, kept maps of the same fingerprint (from ``store``, or the
        ``offered`` ones) replace pass 1, which the host then ends (``should_stop``). True when
        they do."""
        self.pass_id = pass_id
        if not reuse or self.phase is not Phase.RECORD:
            return False
        kept = offered if offered is not None else None
        if kept is None and store is not None:
            kept = store.get(pass_id.id)
        if kept is None:
            return False
        if kept.id != pass_id.id:
            self.missed = pass_id.changed(kept.pass_id)
            return False
        if kept.n_images != self.layout.n_images:
            return False  # equal fingerprints cannot differ in images; a guard, not a case
        self.kept = kept
        self.saw_units(kept.units)
        self._decide()
        return True

    @property
    def token_count(self) -> int | None:
        """The source unit's adapter's image-token count (None while nothing was recorded)."""
        if self.kept is not None:
            maps = self.kept.recorded.get(self.source_unit)
            return maps.tokens if maps is not None else None
        return self.recorder.token_count

    def recorded(self) -> dict[int, RecordedMaps]:
        """Each recording unit's maps: pass 1's, or the kept ones it reuses."""
        if self.kept is not None:
            return dict(self.kept.recorded)
        return {u: r.result() for u, r in sorted(self.recorders.items()) if r.has_data}

    def keep(self) -> KeptMaps | None:
        """What pass 1 recorded, to keep under its fingerprint (None: unidentified or nothing
        recorded, or already kept)."""
        if self.pass_id is None or self.kept is not None or not self.has_data:
            return None
        record = [plan for phase, plan in self.history if phase is Phase.RECORD]
        return KeptMaps(
            self.pass_id,
            self.recorded(),
            self.args,
            self.units,
            self.source_unit,
            self.layout.n_images,
            self.image_offset,
            plan=record[-1] if record else None,
        )

    # -- units ----------------------------------------------------------------------------------

    def saw_units(self, units: int) -> None:
        """The host has (at least) ``units`` IP-Adapter units."""
        self.units = max(self.units, units)

    def _recorder(self, unit: int) -> MapRecorder:
        if unit not in self.recorders:
            self.recorders[unit] = MapRecorder(
                self._layers,
                self.args.token,
                self.layout.n_images,
                attention_scale=self.args.attention_scale,
            )
        return self.recorders[unit]

    @property
    def recorder(self) -> MapRecorder:
        """The source unit's recorder (mask mode ``shared``)."""
        return self._recorder(self.source_unit)

    @property
    def has_data(self) -> bool:
        if self.kept is not None:
            return bool(self.kept.recorded)
        return any(recorder.has_data for recorder in self.recorders.values())

    def _recording_unit(self, unit: int | None) -> int | None:
        """The recorder a call of ``unit`` feeds, or None when that unit does not record."""
        if unit is None:
            if self.per_unit:
                raise ValueError(
                    "mask mode 'per_unit' needs the IP-Adapter unit of every recorded call; "
                    "this host passed none"
                )
            return self.source_unit
        self.saw_units(unit + 1)
        if self.per_unit or unit == self.source_unit:
            return unit
        return None

    # -- per layer ------------------------------------------------------------------------------

    def wants_record(self, layer: str, unit: int | None = None) -> bool:
        """Whether ``layer`` records now, for ``unit`` (None: for the source unit in ``shared``
        mode, for any unit in ``per_unit`` mode)."""
        if not (self._recording and layer in self.source_layers):
            return False
        return unit is None or self._recording_unit(unit) is not None

    def observe(
        self, layer: str, query: torch.Tensor, ip_key: torch.Tensor, unit: int | None = None
    ) -> None:
        """query ``[R, heads, N, d]`` and ip_key ``[R, heads, T, d]`` (``unit``'s own keys) of
        the current UNet call."""
        if not self.wants_record(layer, unit) or self.rows.current is None:
            return
        recording = self._recording_unit(unit)
        if recording is not None:
            self._recorder(recording).observe(self.step, layer, query, ip_key, self.rows.current)

    def ip_action(self) -> IPAction:
        return self._action

    def _decide(self) -> None:
        """This step's decisions, made once per denoiser call: every layer asks for them."""
        self._recording = (
            self.phase is Phase.RECORD and self.kept is None and self.step in self.plan.record
        )
        if self.phase is not Phase.APPLY:
            self._action = IPAction.PLAIN
        elif self.step in self.plan.apply:
            self._action = IPAction.MASKED
        else:
            self._action = IPAction.OFF if self.args.ip_off_outside else IPAction.PLAIN

    def weights(
        self,
        n_tokens: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        unit: int | None = None,
    ) -> torch.Tensor:
        """``[R, N, 1]`` IP weights of ``unit`` for the rows of the current UNet call at a layer
        of N positions, built once per pass for each unit, row layout, layer size, device and
        dtype, then only reused."""
        rows = self.rows.current
        if self.masks is None or rows is None:
            raise RuntimeError("no masks or no UNet call in progress")
        key = (rows.key, n_tokens, str(device), dtype, unit if self.per_unit else None)
        if key not in self._weights:
            per_image = self.masks.for_unit(unit).weights(n_tokens, rows.latent_hw, device)
            weights = row_weights(per_image, rows.images).to(dtype)
            self._weights[key] = weights
            uniform = None  # read once per pass here, so hosts can branch on it without a sync
            for value in (1.0, 0.0):
                if bool((weights == value).all()):
                    uniform = value
            self._uniform[id(weights)] = uniform
        return self._weights[key]

    def weights_are_ones(self, weights: torch.Tensor) -> bool:
        """``weights`` (from ``weights``) keep IP-Adapter everywhere: plain IP-Adapter."""
        return self._uniform.get(id(weights)) == 1.0

    def weights_are_zeros(self, weights: torch.Tensor) -> bool:
        """``weights`` (from ``weights``) drop IP-Adapter everywhere."""
        return self._uniform.get(id(weights)) == 0.0

    # -- between the passes ---------------------------------------------------------------------

    def build_masks(self) -> MaskSet | UnitMasks:
        """``shared``: one ``MaskSet`` from the source unit; ``per_unit``: ``UnitMasks``."""
        recorded = self.recorded()
        if self.per_unit:
            self.masks = maskset.build_units(
                recorded, self.units, self.layout.n_images, self.args, self.image_offset
            )
        elif self.source_unit in recorded:
            self.masks = maskset.build(
                recorded[self.source_unit], self.args, self.image_offset, self.source_unit
            )
        else:
            self.masks = MaskSet.full(self.layout.n_images)
        return self.masks
