"""Recording overhead of MONKEY's pass 1 against plain IP-Adapter, measured in one run.

An SD1.5-shaped diffusers UNet (16 attn2 layers, 8 heads, reduced width) with IP-Adapter
weights loaded by diffusers runs at 512 px (64×64 latent) under CFG. Printed:

* time ratio of a recording UNet call (hooks installed, the paper's layer recorded at this step)
  to a plain IP-Adapter call: medians of interleaved runs; target ≤ 1.03;
* extra peak memory per image: peak live tensor bytes during a recording call minus a plain call,
  plus what the recorder keeps per recorded step, per image at 512 px; target ≤ 2 MB.

Run: ``python benchmarks/bench_recording.py [--width 32] [--repeats 7]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tiny import Inputs, sd15_shaped_unet, with_ip_adapter  # noqa: E402

from monkey.args import MonkeyArgs  # noqa: E402
from monkey.diffusers.hooks import DiffusersMonkey  # noqa: E402
from monkey.layers import SD1, source_layers  # noqa: E402
from monkey.rows import RowLayout  # noqa: E402
from monkey.session import MonkeySession, Phase  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages allocated by ops under this mode and still alive."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.storages: dict[int, list[int]] = {}

    def _release(self, key: int) -> None:
        entry = self.storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            key = tensor.untyped_storage().data_ptr()
            if key == 0:
                continue
            if key in self.storages:
                self.storages[key][1] += 1
            elif key in inputs:  # a view of or in-place write to memory allocated elsewhere
                continue
            else:
                size = tensor.untyped_storage().nbytes()
                self.storages[key] = [size, 1]
                self.live += size
                self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._release, key)
        return out


def build(width: int):
    unet = with_ip_adapter(sd15_shaped_unet(width=width))
    available = [layer.diffusers for layer in SD1.layers]
    layers = source_layers((), available)
    return unet, layers


def recording_session(layers, images: int) -> MonkeySession:
    session = MonkeySession(MonkeyArgs(), layers, RowLayout.diffusers(images, cfg=True))
    session.begin(Phase.RECORD)
    session.begin_step(1, 4)  # inside the default record window: every call records
    return session


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=32, help="base channels (SD1.5: 320)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--images", type=int, default=1)
    opts = parser.parse_args()
    torch.manual_seed(0)
    unet, layers = build(opts.width)
    inputs = Inputs(unet, images=opts.images, hw=(64, 64))
    session = recording_session(layers, opts.images)
    monkey = DiffusersMonkey(unet, session)

    def plain() -> None:
        inputs(unet)

    def recording() -> None:
        with monkey.hooks:
            inputs(unet)

    for fn in (plain, recording):  # warm-up
        fn()
    plain_times, record_times = [], []
    for _ in range(opts.repeats):
        plain_times.append(timed(plain))
        record_times.append(timed(recording))
    ratio = statistics.median(record_times) / statistics.median(plain_times)

    peaks = {}
    for name, fn in (("plain", plain), ("recording", recording)):
        with LiveBytes() as tracker:
            fn()
        peaks[name] = tracker.peak
    kept = sum(t.numel() * t.element_size() for t in session.recorder._sums.values())
    steps = len(session.recorder.steps())
    extra_per_image = (
        max(0, peaks["recording"] - peaks["plain"]) + kept / max(1, steps)
    ) / opts.images
    mb = extra_per_image / 2**20

    print(
        f"SD1.5-shaped UNet, width {opts.width}, 512 px, {opts.images} image(s) under CFG, torch {torch.__version__}"
    )
    print(f"source layer: {layers[0]}")
    print(f"plain IP-Adapter call: median {statistics.median(plain_times) * 1e3:.1f} ms")
    print(f"recording call:        median {statistics.median(record_times) * 1e3:.1f} ms")
    print(
        f"recording overhead ratio: {ratio:.3f} (target <= 1.03) {'OK' if ratio <= 1.03 else 'OVER'}"
    )
    print(
        f"peak live tensors: plain {peaks['plain'] / 2**20:.1f} MB, recording {peaks['recording'] / 2**20:.1f} MB"
    )
    print(
        f"extra peak memory per image at 512 px: {mb:.3f} MB (target <= 2 MB) {'OK' if mb <= 2 else 'OVER'}"
    )


if __name__ == "__main__":
    main()
