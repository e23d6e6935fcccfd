"""Random-weight Stable Diffusion pipelines built from configs, with no download.

Every part is real diffusers/transformers code at toy widths: the UNet of ``tiny.py``, a
four-level VAE (8 image pixels per latent cell, as SD's), a CLIP text model with a tokenizer
built from a vocabulary written here, and a CLIP vision encoder. The IP-Adapter file is written
to disk in the official layout and loaded through diffusers' own ``load_ip_adapter``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from safetensors.torch import save_file
from tiny import CLIP_DIM, ip_adapter_state_dict, tiny_unet
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

SIZE = 64
"""Image side in pixels: an 8×8 latent, so the tiny UNet's layers work at 8×8 and 4×4."""
SOURCE = "up_blocks.0.attentions.1.transformer_blocks.0.attn2"
"""A mask-source layer of the tiny UNet (at latent/2), which is neither SD1 nor SDXL."""
VISION_SIZE = 32


def write_tokenizer(folder: Path) -> Path:
    """A CLIP BPE tokenizer over single letters: enough to tokenise any lowercase prompt."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789.,'-":
        vocab[char] = len(vocab)
        vocab[f"{char}</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    config = {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def tokenizer(folder: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(write_tokenizer(folder), local_files_only=True)


def text_config(vocab_size: int = 128, hidden: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=hidden,
    )


def vision_config(projection: int = CLIP_DIM) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=VISION_SIZE,
        patch_size=8,
        projection_dim=projection,
    )


def tiny_vae() -> AutoencoderKL:
    levels = 4
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8,) * levels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZE,
    )


def write_ip_adapter(unet, path: Path, seed: int = 0) -> Path:
    """An IP-Adapter ``.safetensors`` in the official key layout (``image_proj.*``,
    ``ip_adapter.{2n+1}.to_k_ip.weight`` ...)."""
    state = ip_adapter_state_dict(unet, seed)
    flat = {
        f"{group}.{key}": value.contiguous()
        for group in state
        for key, value in state[group].items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(path))
    return path


def micro_unet():
    """The smallest UNet with IP-Adapter layers at two resolutions (8 and 16 channels): for tests
    that run the pipeline hundreds of times and care about schedules, not pixels."""
    return tiny_unet(block_out_channels=(8, 16))


def plain_pipeline(folder: Path, seed: int = 0, unet=None) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with an image encoder and no IP-Adapter yet."""
    torch.manual_seed(seed)
    tok = tokenizer(folder / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(text_config(len(tok))),
        tokenizer=tok,
        unet=unet if unet is not None else tiny_unet(),
        scheduler=EulerDiscreteScheduler(steps_offset=1),
        safety_checker=None,
        feature_extractor=CLIPImageProcessor(
            size={"shortest_edge": VISION_SIZE},
            crop_size={"height": VISION_SIZE, "width": VISION_SIZE},
        ),
        image_encoder=CLIPVisionModelWithProjection(vision_config()).eval(),
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_lcm_pipeline(folder: Path, seed: int = 0):
    """A LatentConsistencyModelPipeline (the reference's own pipeline) on an LCMScheduler, its
    UNet taking LCM's guidance embedding, with one IP-Adapter loaded by ``load_ip_adapter``."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    sd = plain_pipeline(folder, seed)
    torch.manual_seed(seed)
    pipe = LatentConsistencyModelPipeline(
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        tokenizer=sd.tokenizer,
        unet=tiny_unet(time_cond_proj_dim=8),
        scheduler=LCMScheduler(),
        safety_checker=None,
        feature_extractor=sd.feature_extractor,
        image_encoder=sd.image_encoder,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return load_adapters(pipe, folder, 1, seed)


def load_adapters(pipe, folder: Path, adapters: int, seed: int):
    """``pipe`` with ``adapters`` IP-Adapter files written here and loaded by diffusers."""
    names = [f"ip-{index}.safetensors" for index in range(adapters)]
    for index, name in enumerate(names):
        write_ip_adapter(pipe.unet, folder / name, seed=seed + index)
    pipe.load_ip_adapter(
        str(folder),
        subfolder="",
        weight_name=names,
        image_encoder_folder=None,
        low_cpu_mem_usage=False,
    )
    return pipe


def tiny_pipeline(
    folder: Path, adapters: int = 1, seed: int = 0, unet=None
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with ``adapters`` IP-Adapters loaded by ``load_ip_adapter``."""
    return load_adapters(plain_pipeline(folder, seed, unet), folder, adapters, seed)


def write_model_files(folder: Path, seed: int = 0) -> dict[str, Path]:
    """On disk as a user has them: a diffusers model folder, an image-encoder folder and an
    IP-Adapter file (each loaded by the code under test, never by this module)."""
    pipe = plain_pipeline(folder / "build", seed)
    paths = {"model": folder / "model", "encoder": folder / "image_encoder"}
    pipe.image_encoder.save_pretrained(paths["encoder"])
    pipe.image_encoder = None
    pipe.register_modules(image_encoder=None, feature_extractor=None)
    pipe.save_pretrained(paths["model"])
    paths["ip_adapter"] = write_ip_adapter(pipe.unet, folder / "adapters" / "ip-tiny.safetensors")
    return paths


def tiny_xl_pipeline(folder: Path, seed: int = 0):
    """A StableDiffusionXLPipeline (two text encoders, ``text_time`` conditioning) with one
    IP-Adapter loaded by ``load_ip_adapter``."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = tokenizer(folder / "tokenizer")
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=32 + 6 * time_dim,
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(text_config(len(tok))),
        text_encoder_2=CLIPTextModelWithProjection(text_config(len(tok))),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1),
        feature_extractor=CLIPImageProcessor(
            size={"shortest_edge": VISION_SIZE},
            crop_size={"height": VISION_SIZE, "width": VISION_SIZE},
        ),
        image_encoder=CLIPVisionModelWithProjection(vision_config()).eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    write_ip_adapter(unet, folder / "ip-xl.safetensors", seed=seed)
    pipe.load_ip_adapter(
        str(folder),
        subfolder="",
        weight_name="ip-xl.safetensors",
        image_encoder_folder=None,
        low_cpu_mem_usage=False,
    )
    return pipe
