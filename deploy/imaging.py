"""Image conversion shared by training's prepare step and the server, so both see the same pixels."""
from __future__ import annotations

import numpy as np
from PIL import Image


def convert_mode(image: Image.Image, color_mode: str) -> Image.Image:
    """To "L" or "RGB"; transparent pixels become black, as on a black canvas, not undefined colours."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert(color_mode)


def to_chw(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) at any size -> uint8 (C, height, width), bilinear resize."""
    if pixels.shape[:2] != (height, width):
        pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR))
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
