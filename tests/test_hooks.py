"""Owned, reversible handles."""

from __future__ import annotations

import pytest
import torch

from monkey.hooks import AttrPatch, CallbackHook, HookSet, ListItemPatch, TorchHook


class Thing:
    def run(self):
        return "class"


def test_attr_patch_on_a_class_attribute_deletes_the_instance_override():
    thing = Thing()
    patch = AttrPatch(thing, "run", lambda original: lambda: f"wrapped {original()}")
    patch.install()
    patch.install()
    assert thing.run() == "wrapped class"
    patch.remove()
    patch.remove()
    assert "run" not in vars(thing)
    assert thing.run() == "class"


def test_attr_patch_restores_an_instance_attribute():
    thing = Thing()
    own = lambda: "own"  # noqa: E731
    thing.run = own
    with HookSet([AttrPatch(thing, "run", lambda original: lambda: "wrapped")]):
        assert thing.run() == "wrapped"
    assert thing.run is own


def test_attr_patch_leaves_a_wrapper_someone_put_on_top(caplog):
    thing = Thing()
    patch = AttrPatch(thing, "run", lambda original: lambda: "ours")
    patch.install()
    theirs = lambda: "theirs"  # noqa: E731
    thing.run = theirs
    patch.remove()
    assert thing.run is theirs
    assert "replaced by someone else" in caplog.text


def test_attr_patch_through_a_setter():
    store = {"value": 1}
    holder = type("Holder", (), {})()
    holder.value = 1

    def setter(value):
        store["value"] = value
        holder.value = value

    with HookSet([AttrPatch(holder, "value", lambda v: v + 10, setter=setter)]):
        assert holder.value == 11 and store["value"] == 11
    assert holder.value == 1 and store["value"] == 1


def test_list_item_patch_by_identity_and_after_the_host_cleared_its_list():
    first, second = (lambda: 1), (lambda: 2)
    items = [first, second]
    patch = ListItemPatch(items, second, lambda original: lambda: original() * 10)
    patch.install()
    assert items[0] is first and items[1]() == 20
    patch.remove()
    assert items == [first, second]
    patch.install()
    items.clear()  # ControlNet's clear_all_ip_adapter
    patch.remove()
    assert items == []
    with pytest.raises(LookupError):
        ListItemPatch([first], second, lambda o: o).install()


def test_torch_hook_and_callback_hook():
    linear = torch.nn.Linear(2, 2)
    seen = []
    registered = []
    hooks = HookSet(
        [
            TorchHook(lambda: linear.register_forward_hook(lambda *_: seen.append(1))),
            CallbackHook(lambda: registered.append("cb"), lambda: registered.remove("cb")),
        ]
    )
    with hooks:
        linear(torch.zeros(1, 2))
        assert registered == ["cb"]
    linear(torch.zeros(1, 2))
    assert seen == [1] and registered == [] and not linear._forward_hooks


def test_failed_install_rolls_back_what_was_installed():
    thing = Thing()

    def explode(_original):
        raise RuntimeError("cannot wrap")

    hooks = HookSet(
        [AttrPatch(thing, "run", lambda o: lambda: "x"), AttrPatch(thing, "missing_ok", explode)]
    )
    thing.missing_ok = 1
    with pytest.raises(RuntimeError, match="cannot wrap"):
        hooks.install()
    assert "run" not in vars(thing) and not hooks.installed


def test_remove_continues_past_a_failing_handle():
    removed = []

    class Bad:
        installed = True

        def install(self):
            pass

        def remove(self):
            raise RuntimeError("bad restore")

    hooks = HookSet([CallbackHook(lambda: None, lambda: removed.append(1)), Bad()])
    hooks.install()
    with pytest.raises(RuntimeError, match="bad restore"):
        hooks.remove()
    assert removed == [1]


def test_close_removes_and_forgets_every_handle_in_nested_sets_too():
    log = []
    inner = HookSet([CallbackHook(lambda: log.append("+in"), lambda: log.append("-in"))])
    outer = HookSet([CallbackHook(lambda: log.append("+out"), lambda: log.append("-out")), inner])
    outer.install()
    outer.close()
    assert log == ["+out", "+in", "-in", "-out"]
    assert outer.handles == [] and inner.handles == []  # nothing left to hold a callback's owner
