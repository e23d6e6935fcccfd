"""MONKEY's nodes on a real ComfyUI with ComfyUI_IPAdapter_plus, driven over its HTTP API.

Needs a running ComfyUI with this repository in ``custom_nodes/`` and, for the zero-mask checks,
the test harness's ``MonkeyProbeZeroMasks`` node (MONKEY KSampler with every mask forced empty;
never shipped). Checks, each on latents saved by ``SaveLatent`` and compared exactly:

1. MONKEY off equals KSampler bit for bit;
2. an all-ones mask (threshold 0, IP kept outside the window) equals plain IPAdapter, also for a
   batch of 2 and img2img (denoise 0.6);
3. zero masks leave no IPAdapter contribution (equal to KSampler without IPAdapter), for one
   unit and for two units in both mask modes;
4. the masked run differs from both, and its MASK output is saved (one and two units, batch 2);
5. an interrupt in pass 1 and in pass 2 ends the prompt, and the IPAdapter MODEL (cached by
   ComfyUI between prompts) still gives the plain result afterwards (KSamplerAdvanced, which
   ComfyUI has not cached).

Then the timing of MONKEY KSampler against KSampler on the same IPAdapter MODEL, interleaved:
total ratio, the step-count ratio (pass-1 steps run + steps) / steps, and total / step-count.
On a CPU server, start ComfyUI with glibc's allocator told to keep its memory
(``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
MALLOC_TOP_PAD_=1073741824``): with the defaults every UNet call page-faults its activations
afresh, which swings KSampler's own time by more than half from one server to the next.

Run: ``python benchmarks/comfyui_check.py --url http://127.0.0.1:7862 [--steps 8] [--size 64]
[--rounds 3] [--ckpt random-sd15.safetensors] [--image harness_ref.png] [--out DIR]``
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples" / "comfyui")]

from workflows import Models, monkey_workflow  # noqa: E402

from monkey.args import MonkeyArgs  # noqa: E402
from monkey.steps import StepPlan, pass1_length  # noqa: E402

FULL = {"threshold": 0.0, "ip_off_outside": False}


class Comfy:
    def __init__(self, url: str, out: Path):
        self.url, self.out, self.client = url.rstrip("/"), out, uuid.uuid4().hex
        out.mkdir(parents=True, exist_ok=True)

    def _call(self, path: str, data: bytes | None = None, headers: dict | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.read()

    def post(self, path: str, payload: dict) -> dict:
        body = self._call(path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
        return json.loads(body or b"{}")

    def submit(self, graph) -> str:
        return self.post("/prompt", {"prompt": graph.api(), "client_id": self.client})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 1800) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            try:
                entry = json.loads(self._call(f"/history/{prompt_id}")).get(prompt_id)
            except (TimeoutError, urllib.error.URLError):  # a busy server answers late
                continue
            status = (entry or {}).get("status", {})
            if status.get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.5)
        raise TimeoutError(prompt_id)

    def run(self, graph, name: str) -> dict:
        entry = self.wait(self.submit(graph))
        status = entry["status"]
        if status["status_str"] != "success":
            raise RuntimeError(f"{name}: {json.dumps(status['messages'])[-2000:]}")
        times = {event: data.get("timestamp") for event, data in status["messages"]}
        entry["seconds"] = (times["execution_success"] - times["execution_start"]) / 1000.0
        return entry

    def file(self, item: dict) -> bytes:
        query = urllib.parse.urlencode(
            {"filename": item["filename"], "subfolder": item["subfolder"], "type": item["type"]}
        )
        return self._call(f"/view?{query}")

    def outputs(self, entry: dict, kind: str) -> list[dict]:
        return [item for out in entry["outputs"].values() for item in out.get(kind, [])]

    def latent(self, entry: dict):
        from safetensors.torch import load

        (item,) = self.outputs(entry, "latents")
        return load(self.file(item))["latent_tensor"]

    def save_masks(self, entry: dict, name: str) -> list[Path]:
        paths = []
        for item in self.outputs(entry, "images"):
            if "_mask_" in item["filename"]:
                path = self.out / f"{name}_{item['filename']}"
                path.write_bytes(self.file(item))
                paths.append(path)
        return paths

    def upload(self, name: str, png: bytes) -> None:
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + png
            + f"\r\n--{boundary}--\r\n".encode()
        )
        self._call(
            "/upload/image", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )

    async def interrupt_at(self, graph, value: int) -> tuple[dict, int]:
        """Submit ``graph`` and POST /interrupt once its progress reaches ``value``."""
        import aiohttp

        seen = 0
        ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client}"
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:
            prompt_id = self.submit(graph)
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(message.data)
                data = event.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if event["type"] == "progress" and data["value"] >= value and not seen:
                    seen = data["value"]
                    self.post("/interrupt", {})
                if event["type"] in ("execution_interrupted", "execution_error", "executing") and (
                    event["type"] != "executing" or data.get("node") is None
                ):
                    break
        return self.wait(prompt_id), seen


def flipped(png: bytes) -> bytes:
    from PIL import Image, ImageOps

    out = io.BytesIO()
    ImageOps.mirror(Image.open(io.BytesIO(png))).save(out, format="PNG")
    return out.getvalue()


def advanced(graph):
    """The graph's KSampler as KSamplerAdvanced over every step (a node ComfyUI has not cached;
    it samples exactly as KSampler)."""
    for _, (cls, inputs) in graph.nodes.items():
        if cls == "KSampler":
            inputs["noise_seed"] = inputs.pop("seed")
            inputs.pop("denoise")
            inputs.update(add_noise="enable", start_at_step=0, end_at_step=10000,
                          return_with_leftover_noise="disable")  # fmt: skip
    graph.nodes = {
        node: ("KSamplerAdvanced" if cls == "KSampler" else cls, inputs)
        for node, (cls, inputs) in graph.nodes.items()
    }
    return graph


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7862")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ckpt", default="random-sd15.safetensors")
    parser.add_argument("--ipadapter", default="ip-adapter_sd15.safetensors")
    parser.add_argument("--clip-vision", default="CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    parser.add_argument("--image", default="harness_ref.png")
    parser.add_argument("--out", type=Path, default=Path("comfyui-check-out"))
    parser.add_argument("--skip", nargs="*", default=[], help="check groups to skip")
    opts = parser.parse_args()

    comfy = Comfy(opts.url, opts.out)
    second = "monkey_check_second.png"
    comfy.upload(
        second, flipped(comfy.file({"filename": opts.image, "subfolder": "", "type": "input"}))
    )
    models = Models(opts.ckpt, opts.ipadapter, opts.clip_vision, opts.size, (opts.image, second))
    failures = []

    def make(units=1, sampler="KSampler", name="x", **kwargs):
        return monkey_workflow(models, units, sampler=sampler, steps=opts.steps, seed=1,
                               prefix=f"check_{name}", save_latent=True, **kwargs)  # fmt: skip

    results = {}

    def run(name, **kwargs):
        entry = comfy.run(make(name=name, **kwargs), name)
        results[name] = comfy.latent(entry)
        masks = comfy.save_masks(entry, name)
        print(
            f"{name}: {entry['seconds']:.1f} s"
            + (f", masks {[p.name for p in masks]}" if masks else "")
        )
        return entry

    def same(a, b, what):
        import torch

        ok = torch.equal(results[a], results[b])
        print(f"{'PASS' if ok else 'FAIL'} {what}: {a} == {b}")
        if not ok:
            failures.append(what)

    def differs(a, b, what):
        import torch

        ok = not torch.allclose(results[a], results[b], atol=1e-4)
        print(f"{'PASS' if ok else 'FAIL'} {what}: {a} != {b}")
        if not ok:
            failures.append(what)

    run("plain")
    settings = MonkeyArgs()
    pass1 = pass1_length(opts.steps, settings.pass1_steps)
    pass1_run = StepPlan.for_settings(pass1, settings).last_record + 1
    if "cancel" not in opts.skip:
        for where, value in (("pass 1", 1), ("pass 2", pass1_run + 2)):
            graph = make(sampler="MonkeyKSampler", name="cancel")
            graph.nodes[next(n for n, (c, _) in graph.nodes.items() if c == "MonkeyKSampler")][1][
                "seed"
            ] = 2
            entry, seen = asyncio.run(comfy.interrupt_at(graph, value))
            events = [event for event, _ in entry["status"]["messages"]]
            ok = (
                "execution_interrupted" in events and seen <= pass1_run
                if where == "pass 1"
                else ("execution_interrupted" in events and seen > pass1_run)
            )
            print(
                f"{'PASS' if ok else 'FAIL'} interrupt in {where} (at progress {seen}): {events[-1]}"
            )
            if not ok:
                failures.append(f"interrupt in {where}")
            name = f"after_cancel_{where[-1]}"
            entry = comfy.run(advanced(make(name=name)), name)
            results[name] = comfy.latent(entry)
            same(
                name,
                "plain",
                f"after an interrupt in {where} the IPAdapter MODEL samples as before",
            )
    if "basic" not in opts.skip:
        run("off", sampler="MonkeyKSampler", settings={"enabled": False})
        same("off", "plain", "MONKEY off is KSampler bit for bit")
        run("full", sampler="MonkeyKSampler", settings=FULL)
        same("full", "plain", "all-ones mask is plain IPAdapter")
    if "zero" not in opts.skip:
        run("no_ip", units=0)
        run("zero", sampler="MonkeyProbeZeroMasks")
        same("zero", "no_ip", "zero masks leave no IPAdapter contribution")
    if "masked" not in opts.skip:
        if "no_ip" not in results:
            run("no_ip", units=0)
        run("masked", sampler="MonkeyKSampler")
        differs("masked", "plain", "masked differs from plain IPAdapter")
        differs("masked", "no_ip", "masked differs from no IPAdapter")
    if "batch" not in opts.skip:
        run("plain_b2", batch=2)
        run("full_b2", sampler="MonkeyKSampler", batch=2, settings=FULL)
        same("full_b2", "plain_b2", "all-ones mask, batch 2")
        run("masked_b2", sampler="MonkeyKSampler", batch=2)
    if "units" not in opts.skip:
        if "no_ip" not in results:
            run("no_ip", units=0)
        for mode in ("shared", "per_unit"):
            run(
                f"zero_2u_{mode}",
                units=2,
                sampler="MonkeyProbeZeroMasks",
                settings={"mask_mode": mode},
            )
            same(f"zero_2u_{mode}", "no_ip", f"two units, {mode}: zero masks leave no IPAdapter")
        run(
            "masked_2u_per_unit",
            units=2,
            sampler="MonkeyKSampler",
            settings={"mask_mode": "per_unit"},
        )
    if "img2img" not in opts.skip:
        run("plain_i2i", denoise=0.6)
        run("full_i2i", sampler="MonkeyKSampler", denoise=0.6, settings=FULL)
        same("full_i2i", "plain_i2i", "all-ones mask, img2img (denoise 0.6)")
    if opts.rounds:
        plain_s, monkey_s = [], []
        for r in range(opts.rounds):
            for sampler, times in (("KSampler", plain_s), ("MonkeyKSampler", monkey_s)):
                graph = monkey_workflow(models, 1, sampler=sampler, steps=opts.steps, seed=100 + r,
                                        prefix="timing", save_latent=True, decode=False)  # fmt: skip
                times.append(comfy.run(graph, f"timing {sampler}")["seconds"])
        total = statistics.median(monkey_s) / statistics.median(plain_s)
        count = (pass1_run + opts.steps) / opts.steps
        rounds = [m / p / count for m, p in zip(monkey_s, plain_s)]
        print(
            f"timing ({opts.rounds} interleaved rounds, {opts.steps} steps, {opts.size} px): "
            f"KSampler {statistics.median(plain_s):.1f} s {plain_s}, MONKEY {statistics.median(monkey_s):.1f} s "
            f"{monkey_s}; total {total:.3f}, step-count {count:.3f}, total / step-count {total / count:.3f} "
            f"(per round: median {statistics.median(rounds):.3f}, {min(rounds):.3f}-{max(rounds):.3f})"
        )
    print("ALL PASS" if not failures else f"FAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
