"""The one model of every user-facing MONKEY setting.

Each field carries its infotext label, its parser and a description of what it accepts in its
``metadata``; the UI order, the API (a list in UI order or a dict of named settings), the infotext
written under every image and the paste-back parser are all derived from that one table.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

ATTENTION_SCALES = ("reference", "sdpa")
"""How the recorded attention map is scaled (``monkey.attention``); here so that reading settings,
``python -m monkey --help`` and its argument errors need no torch."""

AUTO = "auto"
DEFAULT = "default"
ALL = "all"
INFOTEXT_PREFIX = "MONKEY"
VERSION_LABEL = f"{INFOTEXT_PREFIX} version"
STATUS_LABEL = f"{INFOTEXT_PREFIX} status"
MAPS_LABEL = f"{INFOTEXT_PREFIX} maps"
"""The id of a batch's kept pass-1 maps (``POST /monkey/v1/masks`` builds masks from it)."""

Threshold = float | str
"""A binarisation threshold in [0, 1], or ``"auto"`` for Otsu's threshold of that image's map."""

Token = int | str
"""An IP image-token index, ``"auto"`` for the token whose map separates best, or ``"default"``:
token 1 (the paper's) on 4-token adapters, ``"auto"`` on any other."""

PAPER_TOKEN = 1
PAPER_TOKENS = 4
"""The paper chose token 1 on ip-adapter_sd15, whose image embedding has 4 tokens."""

RecordSteps = int | str
"""How many pass-1 steps feed the mask: k spread over the record window, or ``"all"``."""

SHARED = "shared"
PER_UNIT = "per_unit"
MASK_MODES = (SHARED, PER_UNIT)
"""``shared``: one mask, recorded from the source unit, for every unit (several units of one
subject: face + style). ``per_unit``: each IP-Adapter unit gets its own mask from its own
attention (one subject per unit)."""

MAX_UNIT = 63


class MonkeyArgsError(ValueError):
    """A setting has the wrong type or is out of range; names the field, the value and what fits."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        self.field = field_name
        self.value = value
        self.allowed = allowed
        super().__init__(f"MONKEY setting '{field_name}' got {value!r}; allowed: {allowed}")


Parser = Callable[[Any], Any]


class Spec(NamedTuple):
    label: str
    parse: Parser
    allowed: str
    help: str


def _spec(default: Any, label: str, parse: Parser, allowed: str, help: str) -> Any:
    return field(
        default=default, metadata={"spec": Spec(f"{INFOTEXT_PREFIX} {label}", parse, allowed, help)}
    )


class _Reject(Exception):  # noqa: N818 - internal signal, never escapes
    """``detail`` (optional) says which part of a list value was wrong."""

    def __init__(self, detail: str = ""):
        super().__init__(detail)
        self.detail = detail


def _allowed(name: str, error: _Reject) -> str:
    allowed = spec(name).allowed
    return f"{allowed} ({error.detail})" if error.detail else allowed


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _Reject


def _as_number(value: Any) -> float:
    if isinstance(value, bool):
        raise _Reject
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _Reject from None
    else:
        raise _Reject
    if not math.isfinite(number):
        raise _Reject
    return number


def _float_in(lo: float, hi: float) -> Parser:
    def parse(value: Any) -> float:
        number = _as_number(value)
        if not lo <= number <= hi:
            raise _Reject
        return number

    parse.bounds = (lo, hi)  # read by UIs that draw a bounded widget (ComfyUI)
    return parse


def _int_in(lo: int, hi: int) -> Parser:
    def parse(value: Any) -> int:
        number = _as_number(value)
        if number != int(number) or not lo <= number <= hi:
            raise _Reject
        return int(number)

    parse.bounds = (lo, hi)
    return parse


_EMPTY_WORDS = ("", "default", "none")


def _split(value: Any) -> list[Any]:
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise _Reject
    if len(items) == 1 and isinstance(items[0], str) and items[0].lower() in _EMPTY_WORDS:
        return []
    return items


def _threshold(value: Any) -> Threshold:
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    return _float_in(0.0, 1.0)(value)


@dataclass(frozen=True)
class UnitThreshold:
    """A ``unitK=T`` entry of the per-image thresholds: unit K's threshold for every image."""

    unit: int
    threshold: Threshold

    def __str__(self) -> str:
        return f"unit{self.unit}={_format(self.threshold)}"


_UNIT_ENTRY = re.compile(r"^unit\s*(\d+)\s*=\s*(\S.*)$", re.IGNORECASE)


def _threshold_entry(item: Any) -> Threshold | UnitThreshold:
    if isinstance(item, UnitThreshold):
        return item
    if isinstance(item, Mapping) and set(item) == {"unit", "threshold"}:  # JSON, asdict
        item = f"unit{item['unit']}={item['threshold']}"
    if isinstance(item, str) and item.strip().lower().startswith("unit"):
        match = _UNIT_ENTRY.match(item.strip())
        if match is None or int(match.group(1)) > MAX_UNIT:
            raise _Reject(f"{item.strip()!r} is not unitK=T with K from 0 to {MAX_UNIT}")
        try:
            return UnitThreshold(int(match.group(1)), _threshold(match.group(2)))
        except _Reject:
            raise _Reject(f"{item.strip()!r}: T must be from 0.0 to 1.0 or 'auto'") from None
    try:
        return _threshold(item)
    except _Reject:
        raise _Reject(f"{item!r} is no threshold") from None


def _thresholds(value: Any) -> tuple[Threshold | UnitThreshold, ...]:
    entries = tuple(_threshold_entry(item) for item in _split(value))
    units = [entry.unit for entry in entries if isinstance(entry, UnitThreshold)]
    repeated = sorted({unit for unit in units if units.count(unit) > 1})
    if repeated:
        raise _Reject(f"unit{repeated[0]} is given more than once")
    return entries


_LAYER_NAME = re.compile(r"^[A-Za-z_]\w*(\.\w+)*$")


def _layers(value: Any) -> tuple[str, ...]:
    names = _split(value)
    if not all(isinstance(name, str) and _LAYER_NAME.match(name) for name in names):
        raise _Reject
    return tuple(names)


MAX_TOKEN = 1023


def _word_or(words: tuple[str, ...], parse: Parser) -> Parser:
    """``parse``, or one of ``words`` (case and surrounding spaces ignored)."""

    def parse_word(value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in words:
            return value.strip().lower()
        return parse(value)

    return parse_word


def _choice(words: tuple[str, ...]) -> Parser:
    def reject(_value: Any) -> Any:
        raise _Reject

    parse = _word_or(words, reject)
    parse.choices = words  # read by UIs that draw a drop-down (ComfyUI)
    return parse


_token = _word_or((AUTO, DEFAULT), _int_in(0, MAX_TOKEN))

MAX_STEPS = 1000
_record_steps = _word_or((ALL,), _int_in(1, MAX_STEPS))


PASS1_MIN_STEPS = 4
"""The reference's pass 1 is a fixed 4 steps (``initial_steps=4``); MONKEY's is never shorter,
unless the generation itself is."""

Pass1Steps = float | int
"""Pass 1's length: a fraction of the generation's steps (a number from 0 to 1; ``1`` is all of
them), or a step count (a whole number from ``PASS1_MIN_STEPS`` up). The value alone decides,
never its type: JSON, XYZ axes and sliders turn ``4`` into ``4.0`` and ``1.0`` into ``1``, and
neither changes its meaning, because no value is both a fraction and an allowed count."""


def _pass1_steps(value: Any) -> Pass1Steps:
    number = _as_number(value)
    if 0.0 <= number <= 1.0:
        return float(number)
    if number == int(number) and PASS1_MIN_STEPS <= number <= MAX_STEPS:
        return int(number)
    if 1.0 < number < PASS1_MIN_STEPS:
        raise _Reject(
            f"a pass 1 of {value} steps is shorter than the reference's {PASS1_MIN_STEPS}"
        )
    raise _Reject


_UNIT = "a number from 0.0 to 1.0"


@dataclass(frozen=True)
class MonkeyArgs:
    enabled: bool = _spec(
        False,
        "enabled",
        _as_bool,
        "true or false",
        "Run MONKEY's two passes on the IP-Adapter units.",
    )
    threshold: float = _spec(
        0.5,
        "threshold",
        _float_in(0.0, 1.0),
        _UNIT,
        "Pixels whose min-max normalised attention reaches this value are subject (paper: 0.5).",
    )
    thresholds: tuple[Threshold | UnitThreshold, ...] = _spec(
        (),
        "per-image thresholds",
        _thresholds,
        "a comma-separated list of numbers from 0.0 to 1.0 or 'auto', each either plain (one "
        f"per image) or unitK=T (unit K, 0 to {MAX_UNIT}, every image)",
        "One threshold per image of the generation, in order; 'auto' uses Otsu's threshold on "
        "that image's map. Images past the end of the list use the threshold above. 'unitK=T' "
        "gives IP-Adapter unit K (0 = first) threshold T on every image, in place of the others.",
    )
    layers: tuple[str, ...] = _spec(
        (),
        "layer",
        _layers,
        "'default' or comma-separated module paths such as output_blocks.4.1.transformer_blocks.0.attn2",
        "Cross-attention layer(s) whose IP attention builds the mask; several are averaged. "
        "'default' is the paper's layer (SD1.x) or its SDXL equivalent.",
    )
    token: Token = _spec(
        DEFAULT,
        "token",
        _token,
        f"'default', 'auto' or an integer from 0 to {MAX_TOKEN} (below the adapter's token count)",
        "IP image token whose attention is the mask. 'default': token 1 (the paper's) on 4-token "
        "adapters, 'auto' on others; 'auto' picks, per image, the token whose map splits into "
        "foreground and background most clearly.",
    )
    record_start: float = _spec(
        0.25,
        "record start",
        _float_in(0.0, 1.0),
        _UNIT,
        "Start of the pass-1 window the mask is recorded in, as a fraction of pass 1's steps.",
    )
    record_end: float = _spec(
        0.75,
        "record end",
        _float_in(0.0, 1.0),
        _UNIT,
        "End (exclusive) of the pass-1 record window; pass 1 stops right after its last recorded "
        "step.",
    )
    apply_start: float = _spec(
        0.25,
        "apply start",
        _float_in(0.0, 1.0),
        _UNIT,
        "Start of the pass-2 steps where the mask is applied, as a fraction of the schedule.",
    )
    apply_end: float = _spec(
        0.75, "apply end", _float_in(0.0, 1.0), _UNIT, "End (exclusive) of the masked pass-2 steps."
    )
    ip_off_outside: bool = _spec(
        True,
        "IP off outside window",
        _as_bool,
        "true or false",
        "Switch IP-Adapter off outside the apply window, as the reference code does; unchecked, "
        "plain IP-Adapter runs there.",
    )
    outside_weight: float = _spec(
        0.0,
        "outside weight",
        _float_in(0.0, 1.0),
        _UNIT,
        "IP-Adapter weight kept outside the mask (paper: 0).",
    )
    dilate: int = _spec(
        0,
        "dilate",
        _int_in(0, 256),
        "an integer from 0 to 256 (pixels)",
        "Grow the mask by this many image pixels.",
    )
    feather: int = _spec(
        0,
        "feather",
        _int_in(0, 256),
        "an integer from 0 to 256 (pixels)",
        "Soften the mask edge over about this many image pixels.",
    )
    source_unit: int = _spec(
        0,
        "source unit",
        _int_in(0, MAX_UNIT),
        f"an integer from 0 to {MAX_UNIT}",
        "Which enabled IP-Adapter unit (0 = first) records the mask; every unit is masked "
        "(mask mode 'shared').",
    )
    preview: bool = _spec(
        True, "preview", _as_bool, "true or false", "Show each image's mask after the images."
    )
    preview_pass1: bool = _spec(
        False,
        "preview pass 1",
        _as_bool,
        "true or false",
        "Also show the pass-1 image (its state at the last recorded step).",
    )
    save_masks: bool = _spec(
        False,
        "save masks",
        _as_bool,
        "true or false",
        "Save each mask next to its image with a -monkey-mask suffix.",
    )
    # Settings added after the first release go last, so API lists in UI order keep working.
    attention_scale: str = _spec(
        "reference",
        "attention scale",
        _choice(ATTENTION_SCALES),
        "'reference' or 'sdpa'",
        "'reference': the recorded map is softmax(q·kᵀ) without 1/√d, as the paper's code "
        "records it (its threshold was tuned on these sharper maps); 'sdpa': the attention the "
        "model actually uses, softmax(q·kᵀ/√d).",
    )
    record_steps: RecordSteps = _spec(
        2,
        "record steps",
        _record_steps,
        f"an integer from 1 to {MAX_STEPS}, or 'all'",
        "How many pass-1 steps feed the mask, spread evenly over the record window. 2 is the "
        "reference's count (its steps 1 and 2 of 4); keeping 2 on a longer pass 1 is our "
        "generalisation. 'all' unions every step of the window, the reference's rule read "
        "literally.",
    )
    pass1_steps: Pass1Steps = _spec(
        0.5,
        "pass 1 steps",
        _pass1_steps,
        "a fraction of the generation's steps from 0.0 to 1.0 (1 is all of them), or a whole "
        f"number of steps from {PASS1_MIN_STEPS} to {MAX_STEPS}",
        "Length of pass 1's own schedule: a fraction of the generation's steps (0.5: our "
        "generalisation of the reference's 4 steps against 8) or a step count (4: the "
        "reference's literal pass 1, and the fastest); never fewer than 4 steps, nor more than "
        "the generation's. 1.0 runs pass 1 on pass 2's schedule.",
    )
    mask_mode: str = _spec(
        SHARED,
        "mask mode",
        _choice(MASK_MODES),
        "'shared' or 'per_unit'",
        "'shared': one mask, recorded from the source unit, masks every unit (several units of "
        "one subject, e.g. face + style). 'per_unit': each IP-Adapter unit is masked to its own "
        "subject, found in its own attention; where subjects overlap, a pixel goes to the unit "
        "attending to it most.",
    )

    def __post_init__(self) -> None:
        for name in names():
            try:
                value = spec(name).parse(getattr(self, name))
            except _Reject as error:
                raise MonkeyArgsError(name, getattr(self, name), _allowed(name, error)) from None
            object.__setattr__(self, name, value)
        for start, end in (("record_start", "record_end"), ("apply_start", "apply_end")):
            if getattr(self, start) >= getattr(self, end):
                raise MonkeyArgsError(
                    f"{start}/{end}",
                    (getattr(self, start), getattr(self, end)),
                    f"{start} must be smaller than {end}",
                )

    # -- the WebUI surfaces ---------------------------------------------------------------------

    @classmethod
    def from_ui(cls, values: Sequence[Any], defaults: MonkeyArgs | None = None) -> MonkeyArgs:
        """Parse component values in UI order; a shorter list keeps ``defaults`` for the rest."""
        if len(values) > len(names()):
            raise MonkeyArgsError(
                "args", list(values), f"at most {len(names())} values in UI order"
            )
        return cls.from_dict(dict(zip(names(), values)), defaults)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], defaults: MonkeyArgs | None = None) -> MonkeyArgs:
        """Parse named settings (the API's dict form); unknown names are an error."""
        unknown = sorted(set(values) - set(names()))
        if unknown:
            raise MonkeyArgsError(unknown[0], values[unknown[0]], f"one of {', '.join(names())}")
        return dataclasses.replace(defaults or cls(), **dict(values))

    @classmethod
    def from_script_args(
        cls, args: Sequence[Any], defaults: MonkeyArgs | None = None
    ) -> MonkeyArgs:
        """The script's slice of ``p.script_args``: UI values in order, or a dict of named settings
        first (the API's ``{"args": [{...}]}``), whose later entries are the UI's defaults."""
        if args and isinstance(args[0], Mapping):
            return cls.from_dict(args[0], defaults)
        if args and isinstance(args[0], MonkeyArgs):
            return args[0]
        return cls.from_ui(args, defaults)

    def to_infotext(self) -> dict[str, str]:
        """Every setting under its ``MONKEY ...`` label, as strings the paste parser reads back."""
        return {spec(name).label: _format(getattr(self, name)) for name in names()}

    @classmethod
    def from_infotext(
        cls, params: Mapping[str, Any], defaults: MonkeyArgs | None = None
    ) -> MonkeyArgs | None:
        """Rebuild the settings from parsed infotext; None when it carries no MONKEY setting."""
        found = {name: params[spec(name).label] for name in names() if spec(name).label in params}
        if not found:
            return None
        return cls.from_dict(found, defaults)

    # -- per image ------------------------------------------------------------------------------

    def threshold_for(self, image_index: int, unit: int | None = None) -> Threshold:
        """The threshold of the image at ``image_index`` in the whole generation, for the mask
        of IP-Adapter unit ``unit``: its ``unitK=T`` entry, else the image's plain entry (plain
        entries are counted alone), else ``threshold``."""
        per_image = []
        for entry in self.thresholds:
            if not isinstance(entry, UnitThreshold):
                per_image.append(entry)
            elif entry.unit == unit:
                return entry.threshold
        if 0 <= image_index < len(per_image):
            return per_image[image_index]
        return self.threshold


def names() -> tuple[str, ...]:
    """Field names in UI order."""
    return _NAMES


def spec(name: str) -> Spec:
    return _SPECS[name]


def labels() -> dict[str, str]:
    """Field name -> infotext label."""
    return {name: spec(name).label for name in names()}


def parse_field(name: str, value: Any) -> Any:
    """Parse one value for ``name`` (used by paste-back of single fields and by XYZ axes)."""
    try:
        return spec(name).parse(value)
    except _Reject as error:
        raise MonkeyArgsError(name, value, _allowed(name, error)) from None


def _format(value: Any) -> str:
    if isinstance(value, UnitThreshold):
        return str(value)
    if isinstance(value, tuple):
        return ", ".join(_format(item) for item in value) if value else "default"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _fields() -> Iterable[dataclasses.Field]:
    return dataclasses.fields(MonkeyArgs)


_SPECS: dict[str, Spec] = {f.name: f.metadata["spec"] for f in _fields()}
_NAMES: tuple[str, ...] = tuple(_SPECS)
