"""Kept pass-1 maps on a real AUTOMATIC1111 (or Forge) WebUI with MONKEY, over its HTTP API.

Needs a running WebUI started with ``--api``, sd-webui-controlnet (or Forge's integrated one) and
an ``ip-adapter_sd15`` model. Checks:

1. a MONKEY request, then the same request at another threshold: the second says
   ``pass 1 reused`` under the same ``MONKEY maps`` id;
2. timing: plain IP-Adapter and the reused generation, interleaved (medians; target <= 1.03);
3. with *Reuse pass 1* off the same request runs pass 1 and gives the reused image pixel for
   pixel (the PNG bytes differ only in the status text);
4. ``POST /monkey/v1/masks`` returns the mask that new settings cut from the kept maps, and an
   id that is not kept is a 404.

Run: ``python benchmarks/webui_reuse_check.py --url http://127.0.0.1:7860 [--forge] [--rounds 3]
[--size 128] [--steps 12] [--out DIR]``
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image


def post(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=1800) as response:
        return json.loads(response.read().decode())


def reference_png(size: int = 64, seed: int = 1) -> str:
    rnd = random.Random(seed)
    noise = bytes(rnd.randrange(256) for _ in range(size * size * 3))
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), noise).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def infotext_value(text: str, label: str) -> str | None:
    if f"{label}: " not in text:
        return None
    rest = text.split(f"{label}: ", 1)[1]
    return rest[1:].split('"', 1)[0] if rest.startswith('"') else rest.split(",", 1)[0]


class Client:
    def __init__(self, args: argparse.Namespace):
        self.url, self.out = args.url.rstrip("/"), Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        models = post(self.url, "/controlnet/model_list")["model_list"]
        model = next(m for m in models if m.startswith("ip-adapter_sd15"))
        module = "CLIP-ViT-H (IPAdapter)" if args.forge else "ip-adapter_clip_h"
        self.unit = {"enabled": True, "module": module, "model": model, "weight": 1.0}
        self.unit["image"] = reference_png()
        self.base = {
            "prompt": "a photo of a cat on the beach",
            "seed": 3,
            "sampler_name": "Euler a",
            "steps": args.steps,
            "cfg_scale": 7,
            "width": args.size,
            "height": args.size,
            "save_images": False,
        }

    def generate(self, name: str, monkey: dict | None = None) -> tuple[bytes, float, str, str]:
        scripts: dict = {"controlnet": {"args": [self.unit]}}
        if monkey is not None:
            scripts["MONKEY"] = {"args": [{"enabled": True, "preview": False, **monkey}]}
        start = time.perf_counter()
        response = post(self.url, "/sdapi/v1/txt2img", {**self.base, "alwayson_scripts": scripts})
        seconds = time.perf_counter() - start
        png = base64.b64decode(response["images"][0].split(",", 1)[-1])
        (self.out / f"{name}.png").write_bytes(png)
        text = json.loads(response["info"])["infotexts"][0]
        status = infotext_value(text, "MONKEY status") or ""
        maps = infotext_value(text, "MONKEY maps") or ""
        print(f"{name}: {seconds:.2f}s maps={maps or '-'} {status[:110]}", flush=True)
        return png, seconds, status, maps


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--forge", action="store_true", help="Forge's module names")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default="webui-reuse-check")
    args = parser.parse_args(argv)
    client = Client(args)
    failures = []

    def check(ok: bool, what: str) -> None:
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        if not ok:
            failures.append(what)

    post(client.url, "/sdapi/v1/options", {"monkey_reuse_pass1": True})
    _, _, _, first_id = client.generate("monkey-0.5", {"threshold": 0.5})
    reused, _, status, reused_id = client.generate("monkey-0.3-reused", {"threshold": 0.3})
    check("pass 1 reused" in status and reused_id == first_id, "a threshold change reuses pass 1")
    plain, again = [], []
    for round_ in range(args.rounds):
        plain.append(client.generate(f"plain-{round_}")[1])
        _, seconds, status, _ = client.generate(f"reused-{round_}", {"threshold": 0.3})
        check("pass 1 reused" in status, f"round {round_} reuses pass 1")
        again.append(seconds)
    ratio = statistics.median(again) / statistics.median(plain)
    print(
        f"median plain {statistics.median(plain):.2f}s, reused {statistics.median(again):.2f}s: "
        f"reused / plain {ratio:.3f} (target <= 1.03)",
        flush=True,
    )
    post(client.url, "/sdapi/v1/options", {"monkey_reuse_pass1": False})
    try:
        fresh, _, status, _ = client.generate("monkey-0.3-reuse-off", {"threshold": 0.3})
    finally:
        post(client.url, "/sdapi/v1/options", {"monkey_reuse_pass1": True})
    check("pass 1 reused" not in status, "reuse off runs pass 1")
    check(np.array_equal(pixels(fresh), pixels(reused)), "reuse off gives the reused pixels")
    masks = post(client.url, "/monkey/v1/masks", {"id": first_id, "settings": {"threshold": 0.3}})
    (client.out / "api-mask.png").write_bytes(base64.b64decode(masks["images"][0]["mask"]))
    check(masks["size"] == [args.size, args.size], "the endpoint returns the mask")
    try:
        post(client.url, "/monkey/v1/masks", {"id": "0" * 16})
        check(False, "an id that is not kept is a 404")
    except urllib.error.HTTPError as error:
        check(error.code == 404, f"an id that is not kept is a 404 (got {error.code})")
    print("all checks passed" if not failures else f"{len(failures)} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
