"""Pass 1's fingerprint on a diffusers pipeline, from what its UNet is handed at its first call.

The first UNet call's arguments hold the scaled noisy latent (the generator's noise, img2img's
image latent at its strength), the timestep, the prompt embeddings and, in
``added_cond_kwargs``, the IP-Adapter image embeddings (and SDXL's pooled text and time ids);
``cross_attention_kwargs`` carry a LoRA scale. Read beside them: the scheduler's schedule and
configuration, the generators' states (later noise), the pipeline call's own scalar arguments
(CFG ...), the UNet's weights (a spread sample, ``weights_probe``), its PEFT adapters' scales,
the IP-Adapter scales, and MONKEY's record settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..fingerprint import Fingerprint, PassOneId, record_settings
from ..session import MonkeySession

OUTPUT_ONLY = frozenset(
    {"output_type", "return_dict", "callback_on_step_end_tensor_inputs", "callback_steps"}
)
"""Call arguments that change what is returned, not what the UNet computes."""


_SCALARS = (bool, int, float, str, type(None))


def _plain(value: Any) -> bool:
    """A scalar or a list of scalars (images and tensors reach the UNet as embeddings)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return all(isinstance(item, _SCALARS) for item in items)


def adapter_scales(unet: torch.nn.Module) -> list[Any]:
    """Every PEFT (LoRA) layer's active adapters and scales: ``set_adapters`` weights change no
    parameter."""
    found = []
    for name, module in unet.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, Mapping) and scaling:
            found.append([name, dict(scaling), getattr(module, "active_adapters", None)])
    return found


def pass_one(
    pipe: Any,
    session: MonkeySession,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    call: Mapping[str, Any],
    generator_states: Sequence[torch.Tensor],
    ip_scales: Sequence[Any],
) -> PassOneId:
    """``args``/``kwargs``: the first UNet call's; ``call``: the pipeline call's arguments."""
    fp = Fingerprint()
    unet_kwargs = {k: v for k, v in kwargs.items() if k != "return_dict"}
    fp.add("latent", args[0] if args else kwargs.get("sample"))
    fp.add("conditioning", [list(args[1:]), unet_kwargs])
    scheduler = pipe.scheduler
    fp.add(
        "schedule",
        [
            type(scheduler).__name__,
            dict(getattr(scheduler, "config", {}) or {}),
            getattr(scheduler, "timesteps", None),
            getattr(scheduler, "sigmas", None),
            getattr(scheduler, "begin_index", None),
        ],
    )
    fp.add("noise", list(generator_states))
    fp.add("call", {k: v for k, v in call.items() if k not in OUTPUT_ONLY and _plain(v)})
    fp.add("model", [type(pipe).__name__, pipe.unet])
    fp.add("networks", adapter_scales(pipe.unet))
    fp.add("ip-adapter", list(ip_scales))
    fp.add("monkey", record_settings(session.args))
    fp.add("monkey", [session.layout.n_images, sorted(session.source_layers)])
    return fp.finish()
