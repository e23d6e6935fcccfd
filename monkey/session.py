"""One batch's MONKEY state: which pass runs, which step it is at, and what each layer should do.

Hosts feed it the step clock (``begin_step``) and each UNet call's rows (``begin_unet_call``);
their per-layer wrappers ask it what to do (``ip_action``, ``wants_record``) and hand it tensors
(``observe``, ``weights``). It never touches a host object.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch

from . import maskset
from .args import MonkeyArgs
from .masks import row_weights
from .maskset import MaskSet
from .recorder import MapRecorder
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


class MonkeySession:
    def __init__(
        self,
        args: MonkeyArgs,
        source_layers: tuple[str, ...],
        layout: RowLayout,
        *,
        image_offset: int = 0,
    ):
        self.args = args
        self.source_layers = frozenset(source_layers)
        self.layout = layout
        self.image_offset = image_offset
        self.rows = RowTracker(layout)
        self.recorder = MapRecorder(
            tuple(source_layers), args.token, layout.n_images, args.attention_scale
        )
        self.masks: MaskSet | None = None
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
        """Pass 1 has recorded and passed its window: the host may end it here."""
        last = self.plan.last_record
        return (
            self.phase is Phase.RECORD
            and self.recorder.has_data
            and last is not None
            and self.step > last
        )

    # -- per layer ------------------------------------------------------------------------------

    def wants_record(self, layer: str) -> bool:
        return self._recording and layer in self.source_layers

    def observe(self, layer: str, query: torch.Tensor, ip_key: torch.Tensor) -> None:
        """query ``[R, heads, N, d]`` and ip_key ``[R, heads, T, d]`` of the current UNet call."""
        if self.wants_record(layer) and self.rows.current is not None:
            self.recorder.observe(self.step, layer, query, ip_key, self.rows.current)

    def ip_action(self) -> IPAction:
        return self._action

    def _decide(self) -> None:
        """This step's decisions, made once per denoiser call: every layer asks for them."""
        self._recording = self.phase is Phase.RECORD and self.step in self.plan.record
        if self.phase is not Phase.APPLY:
            self._action = IPAction.PLAIN
        elif self.step in self.plan.apply:
            self._action = IPAction.MASKED
        else:
            self._action = IPAction.OFF if self.args.ip_off_outside else IPAction.PLAIN

    def weights(
        self, n_tokens: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``[R, N, 1]`` IP weights for the rows of the current UNet call at a layer of N positions,
        built once per pass for each row layout, layer size, device and dtype, then only reused."""
        rows = self.rows.current
        if self.masks is None or rows is None:
            raise RuntimeError("no masks or no UNet call in progress")
        key = (rows.key, n_tokens, str(device), dtype)
        if key not in self._weights:
            per_image = self.masks.weights(n_tokens, rows.latent_hw, device)
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

    def build_masks(self) -> MaskSet:
        if self.recorder.has_data:
            self.masks = maskset.build(self.recorder.result(), self.args, self.image_offset)
        else:
            self.masks = MaskSet.full(self.layout.n_images)
        return self.masks
