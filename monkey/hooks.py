"""Every patch MONKEY makes is an owned, reversible handle.

A handle records what it replaced, installs idempotently, and on removal puts the original back
only if the slot still holds *our* wrapper: if someone wrapped on top of us, their wrapper stays
and ours stays under it, inert once its session has ended.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

logger = logging.getLogger("monkey")

_MISSING = object()


class Handle(Protocol):
    installed: bool

    def install(self) -> None: ...

    def remove(self) -> None: ...


class AttrPatch:
    """Replace ``owner.name`` with ``make(original)``.

    ``setter`` lets hosts route the assignment through their own API (diffusers'
    ``Attention.set_processor``). An attribute that lived on the class is restored by deleting
    the instance attribute, so the instance ends exactly as it started.
    """

    def __init__(
        self,
        owner: Any,
        name: str,
        make: Callable[[Any], Any],
        setter: Callable[[Any], None] | None = None,
    ):
        self.owner, self.name, self.make, self.setter = owner, name, make, setter
        self.installed = False
        self.original: Any = None
        self.wrapper: Any = None
        self._own = _MISSING

    def install(self) -> None:
        if self.installed:
            return
        self.original = getattr(self.owner, self.name)
        instance_dict = getattr(self.owner, "__dict__", {})
        self._own = instance_dict.get(self.name, _MISSING)
        self.wrapper = self.make(self.original)
        self._set(self.wrapper)
        self.installed = True

    def remove(self) -> None:
        if not self.installed:
            return
        self.installed = False
        if getattr(self.owner, self.name, None) is not self.wrapper:
            logger.warning(
                "MONKEY: %s.%s was replaced by someone else; leaving it",
                type(self.owner).__name__,
                self.name,
            )
            return
        if self.setter is None and self._own is _MISSING:
            delattr(self.owner, self.name)
        else:
            self._set(self.original)

    def _set(self, value: Any) -> None:
        if self.setter is not None:
            self.setter(value)
        else:
            setattr(self.owner, self.name, value)


class ListItemPatch:
    """Replace one entry of a host-owned list (ControlNet's ``attn2.ipadapter_hacks``) by identity."""

    def __init__(self, items: list, original: Any, make: Callable[[Any], Any]):
        self.items, self.original, self.make = items, original, make
        self.installed = False
        self.wrapper: Any = None

    def install(self) -> None:
        if self.installed:
            return
        index = _index_of(self.items, self.original)
        if index is None:
            raise LookupError("the entry to wrap is no longer in its list")
        self.wrapper = self.make(self.original)
        self.items[index] = self.wrapper
        self.installed = True

    def remove(self) -> None:
        if not self.installed:
            return
        self.installed = False
        index = _index_of(self.items, self.wrapper)
        if index is not None:  # the host may have cleared its list already
            self.items[index] = self.original


class TorchHook:
    """A ``register_forward_*hook`` call and the handle it returned."""

    def __init__(self, register: Callable[[], Any]):
        self.register = register
        self.handle: Any = None
        self.installed = False

    def install(self) -> None:
        if not self.installed:
            self.handle = self.register()
            self.installed = True

    def remove(self) -> None:
        if self.installed:
            self.installed = False
            self.handle.remove()


class CallbackHook:
    """A host callback registration with its matching unregistration."""

    def __init__(self, register: Callable[[], None], unregister: Callable[[], None]):
        self.register, self.unregister = register, unregister
        self.installed = False

    def install(self) -> None:
        if not self.installed:
            self.register()
            self.installed = True

    def remove(self) -> None:
        if self.installed:
            self.installed = False
            self.unregister()


class HookSet:
    """Handles installed together and removed together, newest first, in ``finally``.

    Used as a context manager; a failed install removes what was already installed.
    """

    def __init__(self, handles: list[Handle] | None = None):
        self.handles: list[Handle] = list(handles or [])

    def add(self, handle: Handle) -> Handle:
        self.handles.append(handle)
        return handle

    def install(self) -> None:
        try:
            for handle in self.handles:
                handle.install()
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        errors = []
        for handle in reversed(self.handles):
            try:
                handle.remove()
            except Exception as error:  # one bad restore must not strand the others
                errors.append(error)
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Remove every handle and forget them, and close the sets among them: the set is
        done. Handles' callbacks often close over the objects that hold the set; forgetting
        them breaks that cycle, so what the callbacks reach (a batch's patched UNet, its
        adapters) is freed when the batch ends, not at the next full garbage collection."""
        try:
            self.remove()
        finally:
            handles, self.handles = self.handles, []
            for handle in handles:
                if isinstance(handle, HookSet):
                    handle.close()  # already removed above: this only forgets

    @property
    def installed(self) -> bool:
        return any(handle.installed for handle in self.handles)

    def __enter__(self) -> HookSet:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _index_of(items: list, target: Any) -> int | None:
    for index, item in enumerate(items):
        if item is target:
            return index
    return None
