"""Pass 1's maps, kept so that a mask change costs pass 2 only.

After pass 1 a batch's recorded maps (every recording unit's), the plan pass 1 ran on and a
small copy of each image are kept under the batch's ``PassOneId`` in a bounded LRU store. A
later batch whose pass 1 would be the same (same fingerprint) skips pass 1 and builds its masks
from them with its own mask settings; the API and the preview build masks from them without
generating. The maps of one 512 px image are a few kB; the image copies dominate.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from . import maskset
from .args import PER_UNIT, MonkeyArgs
from .fingerprint import RECORD_FIELDS, PassOneId
from .maskset import MaskSet, UnitMasks
from .recorder import RecordedMaps
from .steps import StepPlan

DEFAULT_CAPACITY = 32
"""Batches kept (each one pass 1 of ``batch size`` images)."""
THUMBNAIL = 256
"""Longest side of the image copies kept for previews."""


@dataclass
class KeptMaps:
    pass_id: PassOneId
    recorded: dict[int, RecordedMaps]
    """Each recording unit's maps (mask mode ``shared``: the source unit's only)."""
    settings: MonkeyArgs
    """The settings pass 1 ran with (its record settings are part of ``pass_id``)."""
    units: int
    source_unit: int
    n_images: int
    image_offset: int
    """The batch's first image in its generation (per-image thresholds count from it)."""
    plan: StepPlan | None = None
    """What pass 1 recorded, on which schedule."""
    size: tuple[int, int] | None = None
    """The generated images' (width, height)."""
    images: list[torch.Tensor] = field(default_factory=list)
    """Per image, a ``[h, w, 3]`` uint8 copy of the generated image (at most ``THUMBNAIL``)."""

    @property
    def id(self) -> str:
        return self.pass_id.id

    @property
    def nbytes(self) -> int:
        tensors = [maps.maps for maps in self.recorded.values()] + list(self.images)
        return sum(t.numel() * t.element_size() for t in tensors)

    def masks(self, args: MonkeyArgs, image_offset: int | None = None) -> MaskSet | UnitMasks:
        """The masks ``args``' mask settings make from these maps (its record settings must be
        the ones pass 1 ran with)."""
        changed = [n for n in RECORD_FIELDS if getattr(args, n) != getattr(self.settings, n)]
        if changed:
            raise ValueError(
                f"kept maps {self.id} were recorded with other {', '.join(changed)}; "
                "only mask settings can change without a new pass 1"
            )
        offset = self.image_offset if image_offset is None else image_offset
        if args.mask_mode == PER_UNIT:
            return maskset.build_units(self.recorded, self.units, self.n_images, args, offset)
        if self.source_unit not in self.recorded:
            return MaskSet.full(self.n_images)
        return maskset.build(self.recorded[self.source_unit], args, offset, self.source_unit)

    def keep_images(self, images: list[torch.Tensor]) -> None:
        """``images``: per image ``[H, W, 3]`` uint8; kept shrunk to ``THUMBNAIL``."""
        self.images = [_thumbnail(image) for image in images]


def _thumbnail(image: torch.Tensor) -> torch.Tensor:
    height, width = image.shape[:2]
    scale = THUMBNAIL / max(height, width)
    if scale >= 1:
        return image.clone()
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    chw = image.permute(2, 0, 1)[None].float()
    small = torch.nn.functional.interpolate(chw, size=size, mode="area")
    return small[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)


class MapStore:
    """A bounded LRU of ``KeptMaps`` by id, safe to share between request threads."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self._items: OrderedDict[str, KeptMaps] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        with self._lock:
            self._capacity = max(0, int(value))
            self._trim()

    def _trim(self) -> None:
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def put(self, kept: KeptMaps) -> None:
        with self._lock:
            if self._capacity == 0:
                return
            self._items[kept.id] = kept
            self._items.move_to_end(kept.id)
            self._trim()

    def get(self, id: str) -> KeptMaps | None:
        with self._lock:
            kept = self._items.get(id)
            if kept is not None:
                self._items.move_to_end(id)
            return kept

    def latest(self) -> KeptMaps | None:
        with self._lock:
            return next(reversed(self._items.values()), None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, id: str) -> bool:
        return id in self._items

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(kept.nbytes for kept in self._items.values())


STORE = MapStore()
"""The process's kept maps (a WebUI server keeps one store for all its generations)."""
