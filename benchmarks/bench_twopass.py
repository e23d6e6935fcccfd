"""A whole MONKEY generation against a plain IP-Adapter generation, through each hook path.

For SD1.5- and SDXL-shaped random-weight UNets, through sd-webui-controlnet's hook shape (what the
WebUI runs), Forge's UNet-patcher shape (its integrated ControlNet applies IP-Adapter again for
every sampler run; MONKEY clones and wraps the patches, as on Forge) and diffusers' IP-Adapter
processors, one Euler sampler with CFG runs the same seed, steps and schedule for a plain IP-Adapter generation and for MONKEY's two passes at the given
settings (default: the paper's schedule). Repeats are interleaved; medians are printed:

* total: MONKEY time / plain time;
* step-count ratio: (pass-1 steps run + steps) / steps, what the step count alone predicts;
* total / step-count ratio: the overhead above the method's physical limit (target <= 1.03);
* pass-1 and pass-2 per-step time / plain per-step time (pass 2's IP-off steps skip the image
  attention, so it can be below 1);
* extra peak memory per image (CUDA: allocator peak; CPU: live tensors, one run);
* reuse: a generation whose pass 1 is kept (only the threshold changed) / plain, fingerprint
  included (target <= 1.03), and the kept maps' bytes per image.

CPU (default): reduced widths and sizes. GPU: ``--device cuda --full-size`` (fp16, SD1.5 at
512 px, SDXL at 1024 px, 30 steps).

Run: ``python benchmarks/bench_twopass.py [--device cuda --full-size] [--models sd15 sdxl]
[--paths controlnet forge diffusers] [--steps 30] [--repeats 3] [--pass1-steps 0.5]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent)]

from bench_recording import LiveBytes  # noqa: E402
from ip_unets import Model, build  # noqa: E402

from monkey.args import MonkeyArgs, parse_field  # noqa: E402
from monkey.diffusers.hooks import DiffusersMonkey  # noqa: E402
from monkey.fingerprint import Fingerprint, record_settings  # noqa: E402
from monkey.hooks import HookSet, TorchHook  # noqa: E402
from monkey.kept import THUMBNAIL, MapStore  # noqa: E402
from monkey.layers import source_layers  # noqa: E402
from monkey.rows import RowLayout  # noqa: E402
from monkey.session import MonkeySession, Phase  # noqa: E402
from monkey.steps import pass1_length  # noqa: E402
from monkey.twopass import run_two_pass  # noqa: E402
from monkey.webui import controlnet, forge, forge_attn  # noqa: E402


@dataclass
class Run:
    seconds: float
    pass_seconds: dict
    pass_steps: dict


class Sampler:
    """Euler with CFG on a linear sigma schedule; the same noise for every call."""

    def __init__(self, model: Model, steps: int, latent_hw, images: int, device, dtype):
        self.model, self.steps, self.images = model, steps, images
        self.latent_hw, self.device, self.dtype = latent_hw, device, dtype
        self.cond_first = model.path == "controlnet"  # A1111 stacks cond rows first, Forge not
        text = model.text
        self.context = torch.cat(text.chunk(2)[::-1]) if self.cond_first else text
        rows = 2 * images
        mark = torch.tensor([1.0] * images + [0.0] * images)[:, None, None, None]
        self.cond_mark = mark.to(device) if self.cond_first else None
        self.added = dict(model.added)
        if model.image_embeds is not None:
            self.added["image_embeds"] = [model.image_embeds]
        self.rows = rows
        self.identify = None
        """Called at pass 1's first step with its latent and schedule (reuse: fingerprint)."""

    def __call__(self, steps: int, session: MonkeySession | None) -> tuple[torch.Tensor, int]:
        gen = torch.Generator().manual_seed(1234)
        x = torch.randn(self.images, 4, *self.latent_hw, generator=gen)
        x = x.to(self.device, self.dtype)
        sigmas = [*torch.linspace(14.6, 0.03, steps).tolist(), 0.0]
        x = x * sigmas[0]
        run = 0
        for i in range(steps):
            if session is not None:
                session.begin_step(i, steps)
                if i == 0 and session.phase is Phase.RECORD and self.identify is not None:
                    self.identify(session, x, sigmas)
                if session.should_stop():
                    break
            run += 1
            sigma = sigmas[i]
            x_in = torch.cat([x, x]) / (sigma**2 + 1) ** 0.5
            t = torch.full((self.rows,), 999.0 * (1 - i / steps), device=self.device)
            if self.model.path == "forge":
                self.model.unet.forge_ip.begin_call(self.rows, sigma, x_in.shape)
            with torch.no_grad():
                eps = self.model.unet(
                    x_in, t, encoder_hidden_states=self.context, added_cond_kwargs=self.added
                ).sample
            first, second = eps.chunk(2)
            cond, uncond = (first, second) if self.cond_first else (second, first)
            eps = uncond + 7.0 * (cond - uncond)
            x = x + eps * (sigmas[i + 1] - sigma)
        return x, run


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def plain(sampler: Sampler, model: Model, steps: int, device) -> Run:
    if model.path == "controlnet":
        model.unet.controlnet_ip.new_generation(sampler.cond_mark)
    sync(device)
    start = time.perf_counter()
    if model.path == "forge":
        model.unet.forge_ip.apply()  # the integrated ControlNet, in every sampler run
    sampler(steps, None)
    sync(device)
    seconds = time.perf_counter() - start
    return Run(seconds, {"plain": seconds}, {"plain": steps})


def fingerprint(sampler: Sampler, model: Model, store: MapStore, reuse: bool):
    """What the WebUI host fingerprints at pass 1's first denoiser call, here."""

    def identify(session: MonkeySession, x: torch.Tensor, sigmas: list) -> None:
        fp = Fingerprint()
        fp.add("latent", x).add("conditioning", [sampler.context, sampler.added])
        fp.add("schedule", sigmas).add("model", model.unet)
        fp.add("monkey", record_settings(session.args))
        session.identify(fp.finish(), store, reuse=reuse)

    return identify


def monkey(
    sampler: Sampler,
    model: Model,
    steps: int,
    settings: MonkeyArgs,
    device,
    store: MapStore | None = None,
) -> Run:
    unet = model.unet
    if model.path == "controlnet":
        unet.controlnet_ip.new_generation(sampler.cond_mark)
        hacks = controlnet.find_ip_hacks(unet)
        layers = source_layers((), sorted({hack.layer for hack in hacks}))
        layout = RowLayout.webui([1] * sampler.images)
        adapters = controlnet.units(hacks)
        session = MonkeySession(settings, layers, layout, units=len(adapters))
        hooks = HookSet(controlnet.patches(hacks, session, adapters))

        def unet_call(_module, args) -> None:  # as the A1111 host's pre-hook
            session.begin_unet_call(args[0].shape[0], tuple(args[0].shape[-2:]))

        hooks.add(TorchHook(lambda: unet.register_forward_pre_hook(unet_call)))
    elif model.path == "forge":
        names = [forge_attn.layer_name(key) for key in unet.forge_ip.keys]
        layout = RowLayout.webui([1] * sampler.images)
        batch = forge.ForgeBatch(
            MonkeySession(settings, source_layers((), names), layout), HookSet()
        )
        session, hooks = batch.session, batch.hooks
    else:
        names = [n.removesuffix(".processor") for n in unet.attn_processors if "attn2" in n]
        layers = source_layers((), names)
        session = MonkeySession(settings, layers, RowLayout.diffusers(sampler.images, cfg=True))
        hooks = DiffusersMonkey(unet, session).hooks
    seconds, ran = {}, {}
    first_steps = pass1_length(steps, settings.pass1_steps)

    def sample(phase: Phase):
        length = first_steps if phase is Phase.RECORD else steps
        sync(device)
        start = time.perf_counter()
        if model.path == "forge":  # Forge's p.sample: ControlNet applies, then MONKEY wraps
            unet.forge_ip.apply()
            batch.before_sampling(unet.forge_ip)
        out, run = sampler(length, session)
        sync(device)
        seconds[phase.value], ran[phase.value] = time.perf_counter() - start, run
        return out

    sync(device)
    start = time.perf_counter()
    result = run_two_pass(session, sample, reset_noise=lambda: None, hooks=hooks, store=store)
    sync(device)
    total = time.perf_counter() - start
    if store is not None and not result.reused:
        monkey.kept_bytes = result.kept.nbytes
    if not result.masked:
        raise RuntimeError(f"MONKEY did not mask: {result.skipped_reason}")
    return Run(total, seconds, ran)


def peak_bytes(fn, device) -> int:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - before
    with LiveBytes() as tracker:
        fn()
    return tracker.peak


def bench(model_name: str, path: str, opts) -> None:
    device, full = opts.device, opts.full_size
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    size = opts.size or {("sd15", True): 512, ("sdxl", True): 1024}.get((model_name, full), 256)
    latent_hw = (size // 8, size // 8)
    model = build(model_name, path, full, opts.images, device, dtype)
    sampler = Sampler(model, opts.steps, latent_hw, opts.images, device, dtype)
    settings = MonkeyArgs(enabled=True, pass1_steps=opts.pass1_steps)
    runs = {"plain": [], "monkey": []}
    plain(sampler, model, opts.steps, device)  # warm-up: kernels, allocator, caches
    monkey(sampler, model, opts.steps, settings, device)
    for _ in range(opts.repeats):
        runs["plain"].append(plain(sampler, model, opts.steps, device))
        runs["monkey"].append(monkey(sampler, model, opts.steps, settings, device))

    def med(values):
        return statistics.median(values)

    t_plain = med([r.seconds for r in runs["plain"]])
    t_monkey = med([r.seconds for r in runs["monkey"]])
    pass1_run = runs["monkey"][0].pass_steps["record"]
    predicted = (pass1_run + opts.steps) / opts.steps
    per_step = t_plain / opts.steps
    p1 = med([r.pass_seconds["record"] / max(1, r.pass_steps["record"]) for r in runs["monkey"]])
    p2 = med([r.pass_seconds["apply"] / r.pass_steps["apply"] for r in runs["monkey"]])
    extra = peak_bytes(lambda: monkey(sampler, model, opts.steps, settings, device), device)
    extra -= peak_bytes(lambda: plain(sampler, model, opts.steps, device), device)
    extra_mb = max(0, extra) / opts.images / 2**20
    total, over = t_monkey / t_plain, t_monkey / t_plain / predicted
    store = MapStore(4)
    sampler.identify = fingerprint(sampler, model, store, reuse=True)
    monkey(sampler, model, opts.steps, settings, device, store)  # keeps pass 1's maps
    tuned = MonkeyArgs(enabled=True, pass1_steps=opts.pass1_steps, threshold=0.4)
    reused = []
    for _ in range(opts.repeats):  # interleaved with plain again, fingerprint included
        reused.append(monkey(sampler, model, opts.steps, tuned, device, store).seconds)
        runs["plain"].append(plain(sampler, model, opts.steps, device))
    sampler.identify = None
    t_plain_reuse = med([r.seconds for r in runs["plain"][-opts.repeats :]])
    reuse_ratio = med(reused) / t_plain_reuse
    kept_kb = monkey.kept_bytes / opts.images / 1024
    thumb_kb = THUMBNAIL * THUMBNAIL * 3 / 1024
    print(
        f"{model_name:5} {path:10} {size:5}px  reuse: plain {t_plain_reuse:7.3f}s  "
        f"MONKEY reusing pass 1 {med(reused):7.3f}s  {reuse_ratio:.3f}x "
        f"{'OK' if reuse_ratio <= 1.03 else 'OVER'}  kept maps {kept_kb:.1f} kB/image "
        f"(+ {thumb_kb:.0f} kB preview copy in the WebUI)"
    )
    print(
        f"{model_name:5} {path:10} {size:5}px  plain {t_plain:7.3f}s  MONKEY {t_monkey:7.3f}s  "
        f"total {total:.3f}x  step-count {predicted:.3f}x  total/step-count {over:.3f} "
        f"{'OK' if over <= 1.03 else 'OVER'}  pass-1/step {p1 / per_step:.3f}  "
        f"pass-2/step {p2 / per_step:.3f}  extra peak {extra_mb:.2f} MB/image "
        f"(pass 1 ran {pass1_run} of {pass1_length(opts.steps, opts.pass1_steps)} steps)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size", action="store_true", help="real SD1.5/SDXL widths")
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["controlnet", "forge", "diffusers"],
        choices=["controlnet", "forge", "diffusers"],
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--size", type=int, default=None, help="image px (default by model)")
    parser.add_argument(
        "--pass1-steps",
        type=lambda value: parse_field("pass1_steps", value),  # a fraction, or a count from 4
        default=MonkeyArgs.pass1_steps,
    )
    opts = parser.parse_args()
    # random weights drive some activations subnormal; on a CPU those run many times slower and
    # would time the numbers, not the hooks
    torch.set_flush_denormal(True)
    print(
        f"torch {torch.__version__}, {opts.device}"
        + (f" ({torch.cuda.get_device_name()})" if opts.device.startswith("cuda") else "")
        + f", {'full-size' if opts.full_size else 'reduced-width'} UNets, Euler + CFG, "
        f"{opts.steps} steps, pass1_steps {opts.pass1_steps}, {opts.repeats} interleaved repeats"
    )
    for model_name in opts.models:
        for path in opts.paths:
            bench(model_name, path, opts)
            if opts.device.startswith("cuda"):
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
