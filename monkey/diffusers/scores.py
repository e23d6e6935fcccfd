"""The paper's three scores, as its code computes them (METHOD.md §3.3).

* CLIP-T: cosine of CLIP ViT-B/32's text embedding of the prompt and image embedding of the
  generated image (not ×100);
* CLIP-I: cosine of the CLIP image embeddings of the reference and the generated image;
* DINO: cosine of DINO ViT-S/16 CLS embeddings (``last_hidden_state[:, 0]``, no pooling layer)
  after resize 256 (bicubic, shorter side), centre crop 224, ImageNet normalisation.

CLIP's inputs come from the model folder's own processor, as in the paper's code; DINO's
preprocessing is torchvision's ``Resize(256, bicubic)``, ``CenterCrop(224)``, ``ToTensor``,
``Normalize`` written out in PIL and numpy, so torchvision is not needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Scores:
    clip_t: float
    clip_i: float
    dino: float


def dino_pixels(image: Image.Image, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """``[3, crop, crop]`` float32: torchvision's Resize(resize, BICUBIC) (shorter side to
    ``resize``, the other side truncated), CenterCrop(crop) (offsets rounded), ToTensor and the
    ImageNet Normalize."""
    image = image.convert("RGB")
    width, height = image.size
    if width <= height:
        size = (resize, int(resize * height / width))
    else:
        size = (int(resize * width / height), resize)
    image = image.resize(size, Image.BICUBIC)
    width, height = image.size
    top = round((height - crop) / 2.0)
    left = round((width - crop) / 2.0)
    image = image.crop((left, top, left + crop, top + crop))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class Scorer:
    """CLIP ViT-B/32 and DINO ViT-S/16 from local folders, on one device."""

    def __init__(self, clip: str | Path, dino: str | Path, device: str = "cpu"):
        from transformers import AutoModel, CLIPModel, CLIPProcessor

        self.device = device
        self.clip = CLIPModel.from_pretrained(clip, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(clip, local_files_only=True)
        self.dino = (
            AutoModel.from_pretrained(dino, add_pooling_layer=False, local_files_only=True)
            .to(device)
            .eval()
        )

    @torch.no_grad()
    def __call__(self, prompt: str, reference: Image.Image, generated: Image.Image) -> Scores:
        inputs = self.processor(
            text=[prompt], images=[reference, generated], return_tensors="pt", padding=True
        ).to(self.device)
        outputs = self.clip(**inputs)
        text = F.normalize(outputs.text_embeds.float(), dim=-1)
        images = F.normalize(outputs.image_embeds.float(), dim=-1)
        pixels = torch.stack([dino_pixels(reference), dino_pixels(generated)]).to(self.device)
        cls = self.dino(pixel_values=pixels).last_hidden_state[:, 0].float()
        return Scores(
            clip_t=float(text[0] @ images[1]),
            clip_i=float(images[0] @ images[1]),
            dino=float(F.cosine_similarity(cls[0:1], cls[1:2])[0]),
        )
