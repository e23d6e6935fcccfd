"""The settings model: one table drives UI order, API parsing, infotext and paste-back."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monkey import args as A
from monkey.args import ALL, AUTO, DEFAULT, MonkeyArgs, MonkeyArgsError

unit = st.floats(0.0, 1.0, allow_nan=False)
threshold = st.one_of(unit, st.just(AUTO))
ident = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
part = st.one_of(ident, st.integers(0, 11).map(str))
layer_name = st.builds(
    lambda head, rest: ".".join([head, *rest]), ident, st.lists(part, max_size=4)
)
window = st.tuples(unit, unit).filter(lambda w: w[0] < w[1])
unit_thresholds = st.dictionaries(st.integers(0, A.MAX_UNIT), threshold, max_size=3).map(
    lambda by_unit: [A.UnitThreshold(k, v) for k, v in by_unit.items()]
)


@st.composite
def monkey_args(draw) -> MonkeyArgs:
    record, apply = draw(window), draw(window)
    return MonkeyArgs(
        enabled=draw(st.booleans()),
        threshold=draw(unit),
        thresholds=tuple(
            draw(st.permutations(draw(st.lists(threshold, max_size=5)) + draw(unit_thresholds)))
        ),
        layers=tuple(draw(st.lists(layer_name, max_size=3))),
        token=draw(st.one_of(st.integers(0, A.MAX_TOKEN), st.sampled_from([AUTO, DEFAULT]))),
        record_start=record[0],
        record_end=record[1],
        apply_start=apply[0],
        apply_end=apply[1],
        ip_off_outside=draw(st.booleans()),
        outside_weight=draw(unit),
        dilate=draw(st.integers(0, 256)),
        feather=draw(st.integers(0, 256)),
        source_unit=draw(st.integers(0, 63)),
        preview=draw(st.booleans()),
        preview_pass1=draw(st.booleans()),
        save_masks=draw(st.booleans()),
        attention_scale=draw(st.sampled_from(["reference", "sdpa"])),
        record_steps=draw(st.one_of(st.integers(1, A.MAX_STEPS), st.just(ALL))),
        pass1_steps=draw(st.one_of(unit, st.integers(A.PASS1_MIN_STEPS, A.MAX_STEPS))),
        mask_mode=draw(st.sampled_from(A.MASK_MODES)),
    )


def test_table_covers_every_field_once_with_prefixed_unique_labels():
    fields = [f.name for f in dataclasses.fields(MonkeyArgs)]
    assert list(A.names()) == fields
    label_list = list(A.labels().values())
    assert len(set(label_list)) == len(label_list)
    assert all(label.startswith("MONKEY ") for label in label_list)
    assert A.VERSION_LABEL not in label_list


NOT_DEFAULT = MonkeyArgs(
    enabled=True,
    threshold=0.3,
    thresholds=(0.25, A.UnitThreshold(1, 0.4), AUTO),
    layers=("up_blocks.1.x", "mid.y"),
    token=AUTO,
    record_start=0.1,
    record_end=0.6,
    apply_start=0.0,
    apply_end=1.0,
    ip_off_outside=False,
    outside_weight=0.2,
    dilate=16,
    feather=4,
    source_unit=1,
    preview=False,
    preview_pass1=True,
    save_masks=True,
    attention_scale="sdpa",
    record_steps=ALL,
    pass1_steps=1.0,
    mask_mode="per_unit",
)


def test_every_field_round_trips_from_a_non_default_value():
    defaults = MonkeyArgs()
    assert all(getattr(NOT_DEFAULT, n) != getattr(defaults, n) for n in A.names())
    assert MonkeyArgs.from_infotext(NOT_DEFAULT.to_infotext()) == NOT_DEFAULT
    assert MonkeyArgs.from_ui([getattr(NOT_DEFAULT, n) for n in A.names()]) == NOT_DEFAULT


@given(monkey_args())
def test_infotext_round_trip_restores_every_field(settings):
    text = settings.to_infotext()
    assert set(text) == set(A.labels().values())
    assert all(isinstance(v, str) for v in text.values())
    assert MonkeyArgs.from_infotext(text) == settings


@given(monkey_args())
def test_ui_list_and_api_dict_give_the_same_settings(settings):
    values = [getattr(settings, name) for name in A.names()]
    assert MonkeyArgs.from_ui(values) == settings
    assert MonkeyArgs.from_dict(dataclasses.asdict(settings)) == settings
    assert MonkeyArgs.from_script_args([dataclasses.asdict(settings), *values[1:]]) == settings


def test_partial_ui_list_keeps_defaults_for_the_rest():
    defaults = MonkeyArgs(threshold=0.3, preview=False)
    parsed = MonkeyArgs.from_ui([True, 0.6], defaults)
    assert parsed == dataclasses.replace(defaults, enabled=True, threshold=0.6)


def test_api_dict_on_top_of_ui_defaults():
    parsed = MonkeyArgs.from_script_args([{"enabled": True, "thresholds": [0.2, "auto"]}, 0.5])
    assert parsed.enabled and parsed.thresholds == (0.2, AUTO)


def test_infotext_without_monkey_keys_is_none():
    assert MonkeyArgs.from_infotext({"Steps": "20", "Seed": "1"}) is None


def test_text_values_from_infotext_and_gradio_are_coerced():
    parsed = MonkeyArgs.from_infotext(
        {
            "MONKEY enabled": "True",
            "MONKEY threshold": "0.4",
            "MONKEY token": "auto",
            "MONKEY dilate": "8",
        }
    )
    assert parsed == MonkeyArgs(enabled=True, threshold=0.4, token=AUTO, dilate=8)
    assert MonkeyArgs(dilate=8.0).dilate == 8  # gradio sliders hand over floats
    assert MonkeyArgs(layers="default").layers == ()
    assert MonkeyArgs(layers=["default"]).layers == ()
    assert MonkeyArgs(thresholds="").thresholds == ()
    assert MonkeyArgs(record_steps=" ALL ").record_steps == ALL
    assert MonkeyArgs(record_steps="3").record_steps == 3
    assert MonkeyArgs(attention_scale="SDPA").attention_scale == "sdpa"
    assert MonkeyArgs(token="Default").token == DEFAULT


def test_new_settings_come_after_the_first_releases_so_old_api_lists_still_parse():
    first_release = [
        "enabled", "threshold", "thresholds", "layers", "token", "record_start", "record_end",
        "apply_start", "apply_end", "ip_off_outside", "outside_weight", "dilate", "feather",
        "source_unit", "preview", "preview_pass1", "save_masks",
    ]  # fmt: skip
    assert list(A.names()[: len(first_release)]) == first_release


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("threshold", 1.5, "0.0 to 1.0"),
        ("threshold", "high", "0.0 to 1.0"),
        ("threshold", True, "0.0 to 1.0"),
        ("threshold", float("nan"), "0.0 to 1.0"),
        ("enabled", "yes", "true or false"),
        ("enabled", 1, "true or false"),
        ("token", -1, "'auto'"),
        ("token", 1.5, "'auto'"),
        ("dilate", 300, "0 to 256"),
        ("thresholds", "0.2, 2", "'auto'"),
        ("thresholds", 0.5, "'auto'"),
        ("layers", "up_blocks.1;rm", "module paths"),
        ("source_unit", None, "0 to 63"),
        ("attention_scale", "exact", "'reference' or 'sdpa'"),
        ("attention_scale", 1.0, "'reference' or 'sdpa'"),
        ("record_steps", 0, "'all'"),
        ("record_steps", "most", "'all'"),
        ("pass1_steps", 1.5, "0.0 to 1.0 (1 is all of them), or a whole number of steps"),
        ("pass1_steps", 2, "shorter than the reference's 4"),
        ("pass1_steps", "3", "shorter than the reference's 4"),
        ("pass1_steps", 4.5, "a whole number of steps from 4 to 1000"),
        ("pass1_steps", -0.5, "a whole number of steps from 4 to 1000"),
        ("pass1_steps", "four", "a whole number of steps from 4 to 1000"),
        ("mask_mode", "both", "'shared' or 'per_unit'"),
        ("mask_mode", 1, "'shared' or 'per_unit'"),
        ("thresholds", "unit1=1.5", "'unit1=1.5': T must be from 0.0 to 1.0 or 'auto'"),
        ("thresholds", "unit64=0.5", "K from 0 to 63"),
        ("thresholds", "unit=0.5", "'unit=0.5' is not unitK=T"),
        ("thresholds", "unit1=0.5, unit1=auto", "unit1 is given more than once"),
        ("thresholds", "0.5; 0.4", "'0.5; 0.4' is no threshold"),
    ],
    ids=lambda v: str(v)[:12],
)
def test_bad_values_name_field_value_and_range(name, value, allowed):
    with pytest.raises(MonkeyArgsError) as caught:
        MonkeyArgs.from_dict({name: value})
    message = str(caught.value)
    assert f"'{name}'" in message
    assert repr(value) in message
    assert allowed in message
    assert caught.value.field == name


def test_windows_must_not_be_empty():
    with pytest.raises(MonkeyArgsError, match="record_start must be smaller than record_end"):
        MonkeyArgs(record_start=0.5, record_end=0.5)
    with pytest.raises(MonkeyArgsError, match="apply_start must be smaller"):
        MonkeyArgs.from_dict({"apply_start": 0.9, "apply_end": 0.1})


def test_unknown_api_names_and_overlong_lists_are_errors():
    with pytest.raises(MonkeyArgsError, match="'treshold'"):
        MonkeyArgs.from_dict({"treshold": 0.5})
    with pytest.raises(MonkeyArgsError, match="at most"):
        MonkeyArgs.from_ui([False] * (len(A.names()) + 1))


def test_per_image_thresholds_pick_by_image_index():
    settings = MonkeyArgs(threshold=0.5, thresholds=(0.2, AUTO))
    assert [settings.threshold_for(i) for i in range(4)] == [0.2, AUTO, 0.5, 0.5]


def test_unit_thresholds_replace_the_others_for_their_unit_and_parse_in_every_form():
    text = MonkeyArgs(threshold=0.5, thresholds="0.2, unit1=0.4, Unit 2 = auto, 0.3")
    listed = MonkeyArgs(threshold=0.5, thresholds=[0.2, "unit1=0.4", "unit2=auto", 0.3])
    named = MonkeyArgs(
        threshold=0.5,
        thresholds=[0.2, {"unit": 1, "threshold": 0.4}, {"unit": 2, "threshold": "auto"}, 0.3],
    )
    assert text == listed == named
    assert text.thresholds[1] == A.UnitThreshold(1, 0.4)
    assert text.to_infotext()["MONKEY per-image thresholds"] == "0.2, unit1=0.4, unit2=auto, 0.3"
    for unit in (None, 0, 3):  # plain entries are counted alone, per image
        assert [text.threshold_for(i, unit) for i in range(3)] == [0.2, 0.3, 0.5]
    assert [text.threshold_for(i, 1) for i in range(3)] == [0.4] * 3
    assert [text.threshold_for(i, 2) for i in range(3)] == [AUTO] * 3


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (0.5, 0.5),
        ("0.5", 0.5),
        (1, 1.0),  # all of the generation's steps, never a 1-step pass 1
        ("1", 1.0),
        (1.0, 1.0),
        (0, 0.0),
        (4, 4),
        ("4", 4),
        (4.0, 4),  # JSON numbers, XYZ's float axes and sliders give 4.0: still 4 steps
        ("4.0", 4),
        (30, 30),
    ],
    ids=repr,
)
def test_pass_one_steps_is_a_fraction_up_to_1_and_a_step_count_above(value, parsed):
    """One setting, two forms, told apart by value alone (never by type, which JSON, XYZ and the
    UI do not keep): fractions in [0, 1], step counts from 4; infotext writes each so that it
    reads back the same."""
    settings = MonkeyArgs(pass1_steps=value)
    assert settings.pass1_steps == parsed and type(settings.pass1_steps) is type(parsed)
    text = settings.to_infotext()["MONKEY pass 1 steps"]
    assert text == (repr(parsed) if isinstance(parsed, float) else str(parsed))
    assert MonkeyArgs.from_infotext({"MONKEY pass 1 steps": text}).pass1_steps == parsed
    assert A.parse_field("pass1_steps", text) == parsed


def test_parse_field_for_single_values():
    assert A.parse_field("threshold", "0.25") == 0.25
    with pytest.raises(MonkeyArgsError):
        A.parse_field("token", "first")


def test_core_components_keep_no_default_of_their_own_for_a_setting():
    """One default per setting: a core function or class taking a setting (``attention_scale``,
    ``token``, ``dilate_px`` ...) requires it or defaults to the settings model's value."""
    import importlib
    import inspect
    import pkgutil

    import monkey

    defaults = MonkeyArgs()
    aliases = {"dilate_px": "dilate", "feather_px": "feather"}
    checked = []
    for info in pkgutil.iter_modules(monkey.__path__):
        if info.ispkg or info.name.startswith("_"):  # the host wings, and the CLI entry point
            continue
        module = importlib.import_module(f"monkey.{info.name}")
        for obj in vars(module).values():
            if getattr(obj, "__module__", None) != module.__name__ or not callable(obj):
                continue
            functions = [obj]
            if inspect.isclass(obj):
                functions = [obj.__init__, *filter(inspect.isfunction, vars(obj).values())]
            for function in functions:
                try:
                    parameters = inspect.signature(function).parameters.values()
                except (TypeError, ValueError):
                    continue
                for parameter in parameters:
                    setting = aliases.get(parameter.name, parameter.name)
                    if setting not in A.names() or parameter.default is inspect.Parameter.empty:
                        continue
                    checked.append(f"{obj.__qualname__}({parameter.name})")
                    assert parameter.default == getattr(defaults, setting), checked[-1]
    assert "MaskSet(dilate_px)" in checked  # the scan reaches dataclass fields
