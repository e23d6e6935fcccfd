"""``POST /monkey/v1/masks``: the masks given mask settings make from kept pass-1 maps.

An API user generates once, reads the id from the ``MONKEY maps`` infotext entry, tunes the
threshold (and dilate, feather, outside weight, per-image thresholds) against the masks this
returns, then generates again paying for pass 2 only. The route is a thin shell over
``masks_for``, which is plain Python so it is tested without a server.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

from .. import status as status_text
from ..args import MonkeyArgs, MonkeyArgsError
from ..fingerprint import MASK_FIELDS, OUTPUT_FIELDS
from ..kept import STORE, MapStore
from ..maskset import PX_PER_LATENT, MaskSet, UnitMasks
from .images import mask_image

ROUTE = "/monkey/v1/masks"


class MapsGoneError(LookupError):
    """The id names no kept maps (evicted, never kept, or the server restarted): a 404."""

    def __init__(self, id: str, store: MapStore):
        self.id = id
        super().__init__(
            f"MONKEY maps {id!r} are not kept (the last {store.capacity} batches are, while the "
            "server runs; Settings → MONKEY → kept maps): generate again to get a new id"
        )


def _png(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def masks_for(body: Mapping[str, Any], store: MapStore = STORE) -> dict[str, Any]:
    """``{"id": ..., "settings": {mask settings}}`` -> every image's mask (base64 PNG at the
    image size; per unit in mask mode ``per_unit``) and status. Raises ``MapsGoneError`` for an
    unknown id and ``MonkeyArgsError`` for a bad or non-mask setting."""
    id = body.get("id")
    if not isinstance(id, str) or not id:
        raise MonkeyArgsError("id", id, "the id from a MONKEY maps infotext entry")
    settings = body.get("settings") or {}
    if not isinstance(settings, Mapping):
        raise MonkeyArgsError("settings", settings, "an object of MONKEY mask settings")
    allowed = set(MASK_FIELDS) | set(OUTPUT_FIELDS)
    for name, value in settings.items():
        if name not in allowed and name in MonkeyArgs.__dataclass_fields__:
            raise MonkeyArgsError(
                name, value, f"only mask settings ({', '.join(MASK_FIELDS)}) without a new pass 1"
            )
    kept = store.get(id)
    if kept is None:
        raise MapsGoneError(id, store)
    args = MonkeyArgs.from_dict(settings, kept.settings)
    masks = kept.masks(args)
    width, height = kept.size or _latent_size(kept)
    images = []
    for image in range(kept.n_images):
        entry: dict[str, Any] = {"index": kept.image_offset + image}
        if isinstance(masks, UnitMasks):
            entry["units"] = [
                _png(mask_image(unit, image, (width, height))) for unit in masks.units
            ]
            entry["status"] = status_text.unit_status(masks, image)
        else:
            entry["mask"] = _png(mask_image(masks, image, (width, height)))
            entry["status"] = status_text.status(masks, image, None, _tokens(kept, masks))
        images.append(entry)
    return {"id": id, "size": [width, height], "images": images}


def _latent_size(kept: Any) -> tuple[int, int]:
    latent_hw = next(iter(kept.recorded.values())).latent_hw
    return latent_hw[1] * PX_PER_LATENT, latent_hw[0] * PX_PER_LATENT


def _tokens(kept: Any, masks: MaskSet) -> int | None:
    maps = kept.recorded.get(kept.source_unit)
    return maps.tokens if maps is not None else None


def masks_route(body: dict) -> dict:
    """The route: FastAPI reads a ``dict`` parameter from the JSON body."""
    from fastapi import HTTPException

    try:
        return masks_for(body)
    except MapsGoneError as error:
        raise HTTPException(status_code=404, detail=str(error)) from None
    except ValueError as error:  # MonkeyArgsError, or record settings that differ
        raise HTTPException(status_code=422, detail=str(error)) from None


def add_routes(app: Any) -> None:
    """Register the route on the WebUI's FastAPI app (``on_app_started``)."""
    app.add_api_route(ROUTE, masks_route, methods=["POST"])
