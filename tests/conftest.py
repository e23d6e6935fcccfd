from __future__ import annotations

import pytest
import torch
from hypothesis import settings

# CPU-only CI on 2 cores: no per-example deadline, a fixed example budget, reproducible examples.
settings.register_profile("default", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("default")
# `pytest --hypothesis-profile=explore` searches wider with fresh random examples.
settings.register_profile("explore", deadline=None, max_examples=500)


# -- tiny diffusers pipelines -------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU: one thread is several times faster than contending for two.
    Modules that build tiny pipelines use it for all their tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def user_folder(tmp_path_factory):
    """One folder as a diffusers user has it, for the command line's tests (README: Mistakes and
    what the command says): a tiny SD1.5-layout model ``sd15``, ``ip-adapter_sd15.safetensors``,
    ``image_encoder``, images, evaluation folders, and one file or folder per mistake."""
    from tiny_pipeline import write_model_files

    return write_user_folder(tmp_path_factory.mktemp("user"), write_model_files)


def write_user_folder(folder, write_model_files):
    import json

    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file
    from tiny import ip_adapter_state_dict, tiny_unet
    from tiny_pipeline import vision_config
    from transformers import CLIPVisionModelWithProjection

    built = write_model_files(folder / "build")
    built["model"].rename(folder / "sd15")
    built["encoder"].rename(folder / "image_encoder")
    built["ip_adapter"].rename(folder / "ip-adapter_sd15.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / "dog.png")
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(folder / "room.png")
    (folder / "dreambooth" / "dog").mkdir(parents=True)
    Image.open(folder / "dog.png").save(folder / "dreambooth" / "dog" / "00.png")
    # the mistakes: an adapter of another base (as the official .bin), a safetensors that is no
    # adapter, a .bin that is no PyTorch file, an encoder of another width, a text file as image
    torch.save(ip_adapter_state_dict(tiny_unet(cross_dim=48)), folder / "ip-adapter_sdxl.bin")
    save_file({"encoder.conv_in.weight": torch.zeros(2)}, str(folder / "vae.safetensors"))
    (folder / "ip-adapter_partial.bin").write_bytes(b"\0" * 64)
    CLIPVisionModelWithProjection(vision_config(projection=40)).save_pretrained(
        folder / "image_encoder_bigG"
    )
    (folder / "notes.png").write_text("not an image", encoding="utf-8")
    # scorers are checked by their configs before anything loads
    (folder / "clip-vit-base-patch32").mkdir()
    (folder / "clip-vit-base-patch32" / "config.json").write_text(
        json.dumps({"model_type": "clip"})
    )
    (folder / "clip-vit-base-patch32" / "processor_config.json").write_text("{}")
    (folder / "dino-vits16").mkdir()
    (folder / "dino-vits16" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (folder / "earlier").mkdir()
    Image.open(folder / "dog.png").save(folder / "earlier" / "monkey-0.png")
    return folder


# -- the WebUI fixture ----------------------------------------------------------------------------

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def webui(monkeypatch):
    """Fake ``modules.*`` (and gradio) of A1111 v1.10.1 in ``sys.modules``, the extension's script
    loaded from ``scripts/`` as the WebUI loads it; everything is undone after the test."""
    from fake_webui import WebUI, make_modules

    from monkey.kept import STORE

    STORE.clear()  # a server's kept maps: each test starts as a freshly started WebUI
    errors, saved = [], []
    modules = make_modules(errors, saved)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location(
        "sd_webui_monkey.py", ROOT / "scripts" / "sd_webui_monkey.py"
    )
    script_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script_module)
    handle = WebUI(modules, errors, saved)
    handle.script_module = script_module
    yield handle
    from monkey.webui import run

    run.unload()
    STORE.clear()
