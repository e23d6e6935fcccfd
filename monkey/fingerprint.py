"""What pass 1 depends on, hashed, so a generation can tell that its pass 1 was already run.

A host feeds a ``Fingerprint`` what its UNet is about to see at pass 1's first denoiser call
(the noised latent, the conditioning tensors, the IP-Adapter image embeddings, the sigma
schedule, the weights and the networks changing them) under named parts; the parts are hashed
separately, so a miss can say which part changed. Tensors are hashed bit for bit (their bytes,
dtype and shape): equal fingerprints mean the UNet would be handed the same numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .args import MonkeyArgs

RECORD_FIELDS = (
    "layers",
    "token",
    "attention_scale",
    "record_start",
    "record_end",
    "record_steps",
    "pass1_steps",
    "source_unit",
    "mask_mode",
)
"""Settings that change what pass 1 records: a change needs a new pass 1."""
MASK_FIELDS = (
    "threshold",
    "thresholds",
    "dilate",
    "feather",
    "outside_weight",
    "apply_start",
    "apply_end",
    "ip_off_outside",
)
"""Settings that only change the mask or how pass 2 applies it: kept maps serve them."""
OUTPUT_FIELDS = ("enabled", "preview", "preview_pass1", "save_masks")
"""Settings that change neither pass (what is shown or saved)."""

_DEPTH = 4
"""How deep ``feed`` walks nested host objects (deeper ones are named by their type only)."""


@dataclass(frozen=True)
class PassOneId:
    """A finished fingerprint: ``id`` names the kept maps (infotext, API); ``parts`` each part's
    own digest, to say what changed."""

    id: str
    parts: Mapping[str, str]

    def changed(self, other: PassOneId) -> list[str]:
        """The parts whose digests differ from ``other``'s (a part only one has counts too)."""
        names = dict.fromkeys([*self.parts, *other.parts])
        return [name for name in names if self.parts.get(name) != other.parts.get(name)]


class Fingerprint:
    def __init__(self) -> None:
        self._parts: dict[str, Any] = {}

    def add(self, part: str, value: Any) -> Fingerprint:
        """Feed ``value`` into ``part`` (a part fed twice hashes both, in order)."""
        digest = self._parts.setdefault(part, hashlib.blake2b(digest_size=16))
        feed(digest, value)
        return self

    def finish(self) -> PassOneId:
        parts = {name: digest.hexdigest() for name, digest in self._parts.items()}
        total = hashlib.blake2b(digest_size=8)
        for name in sorted(parts):
            total.update(f"{name}={parts[name]};".encode())
        return PassOneId(total.hexdigest(), parts)


def record_settings(args: MonkeyArgs) -> dict[str, Any]:
    """The settings that change pass 1 (``RECORD_FIELDS``), by name."""
    return {name: getattr(args, name) for name in RECORD_FIELDS}


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    data = tensor.detach()
    if data.is_sparse:
        data = data.to_dense()
    data = data.cpu().contiguous().reshape(-1)
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    return data.view(torch.uint8).numpy().tobytes()


def feed(digest: Any, value: Any, depth: int = 0) -> None:
    """Hash ``value`` into ``digest``: tensors by their bits, containers item by item, modules
    by ``weights_probe``, other objects by their type and (a few levels deep) their fields."""
    put = digest.update
    if value is None or isinstance(value, (bool, int, str)):
        put(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, float):
        put(b"f:" + (struct.pack("<d", value) if not math.isnan(value) else b"nan") + b";")
    elif isinstance(value, bytes):
        put(b"b:" + value + b";")
    elif isinstance(value, torch.Tensor):
        put(f"t:{value.dtype}:{tuple(value.shape)}:".encode())
        put(_tensor_bytes(value))
        put(b";")
    elif isinstance(value, np.ndarray):
        put(f"a:{value.dtype}:{value.shape}:".encode())
        put(np.ascontiguousarray(value).tobytes())
        put(b";")
    elif isinstance(value, torch.nn.Module):
        put(f"m:{type(value).__name__}:{weights_probe(value)};".encode())
    elif isinstance(value, Mapping):
        put(b"{")
        for key in sorted(value, key=repr):
            feed(digest, key, depth)
            feed(digest, value[key], depth + 1)
        put(b"}")
    elif isinstance(value, (list, tuple)):
        put(f"[{type(value).__name__}:".encode())
        for item in value:
            feed(digest, item, depth + 1)
        put(b"]")
    elif depth >= _DEPTH:
        put(f"o:{type(value).__qualname__};".encode())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        put(f"d:{type(value).__qualname__}".encode())
        feed(digest, {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, depth)
    elif hasattr(value, "__dict__") and not callable(value):
        put(f"o:{type(value).__qualname__}".encode())
        fields = {k: v for k, v in vars(value).items() if not k.startswith("_")}
        feed(digest, fields, depth)
    else:  # functions, classes: their identity within this process
        put(f"x:{type(value).__qualname__}:{getattr(value, '__qualname__', '')};".encode())


_PROBE = 16
"""Elements read from each parameter, spread over it: a LoRA or merge changes every element of
the weights it touches, so a spread sample of each tensor sees any such change."""
_probes: dict[int, tuple[tuple, str]] = {}
"""id(module) -> (the parameters' storage and in-place version counters, their probe): the
probe is only read again when a parameter was replaced or written in place."""


def _stamp(tensors: list[torch.Tensor]) -> tuple | None:
    try:
        return tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for t in tensors)
    except RuntimeError:  # inference-mode tensors keep no version counter: read them each time
        return None


def weights_probe(module: torch.nn.Module) -> str:
    """A digest of ``module``'s parameters and buffers, from a spread sample of each; cached
    until one of them is replaced or modified in place."""
    tensors = [t for _, t in module.named_parameters()] + [t for _, t in module.named_buffers()]
    stamp = _stamp(tensors)
    cached = _probes.get(id(module))
    if stamp is not None and cached is not None and cached[0] == stamp:
        return cached[1]
    digest = hashlib.blake2b(digest_size=16)
    samples = []
    with torch.no_grad():
        for tensor in tensors:
            flat = tensor.detach().reshape(-1)
            if flat.numel() == 0:
                continue
            step = max(1, flat.numel() // _PROBE)
            samples.append(flat[::step][:_PROBE].float())
    if samples:
        feed(digest, torch.cat([s.to(samples[0].device) for s in samples]))
    feed(digest, [(tuple(t.shape), str(t.dtype)) for t in tensors])
    probe = digest.hexdigest()
    if len(_probes) > 64:
        _probes.clear()
    _probes[id(module)] = (stamp, probe)
    return probe
