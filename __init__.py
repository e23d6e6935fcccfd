"""ComfyUI's entry point (``custom_nodes/<this repository>/__init__.py``).

A1111 and Forge never import this file (they load ``scripts/``), and ComfyUI never loads
``scripts/``. The nodes are imported only when ComfyUI asks for them, relative to this package,
so the generic name ``monkey`` is never looked up on ``sys.path`` and importing this file alone
(as pytest does for a rootdir with an ``__init__.py``) costs nothing.
"""

from __future__ import annotations

_EXPORTED = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS")


def __getattr__(name: str):
    if name in _EXPORTED:
        from .monkey.comfyui import nodes

        return getattr(nodes, name)
    raise AttributeError(name)


__all__ = list(_EXPORTED)
