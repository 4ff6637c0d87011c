"""The preprocessing contract: how an image file becomes the model's input. Stated once, here, without torch.

Preparation (training data), training and evaluation (normalisation), export (the ONNX metadata), the gates
and the server all use this one definition, so the pixels a model is served are the pixels it was trained on:
  decode -> upright per its EXIF orientation -> 8 bits a channel (16-bit scaled, never clipped) -> colour mode
  (palette and CMYK converted, transparent pixels on black) -> resize to height x width (bilinear, once, from the
  decoded size) -> uint8 CHW -> float32 = (pixel * scale - mean) / std, one mean/std a channel.
And what comes out: the logits output is already divided by `temperature` (fitted on the validation split,
components/calibrate.py), so its softmax is the calibrated probability; 1.0 where no temperature was fitted.
An image whose pixels have no defined range (floating point, or integers beyond 16 bits) is refused.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

INPUT_NAME, OUTPUT_NAME, FEATURES_NAME = "pixels", "logits", "features"
CHANNELS = {"L": 1, "RGB": 3}
COLOR_MODES = {channels: mode for mode, channels in CHANNELS.items()}
RESIZE = {"bilinear": Image.Resampling.BILINEAR}


class ContractError(ValueError):
    """A contract that cannot be honoured (unknown colour mode, wrong number of mean/std values)."""


@dataclass(frozen=True)
class Contract:
    color_mode: str                 # "L" (gray) or "RGB": every image is converted to this
    height: int
    width: int
    mean: tuple[float, ...]         # after scaling, one value a channel
    std: tuple[float, ...]
    scale: float = 1 / 255
    resize: str = "bilinear"
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    features_name: str = FEATURES_NAME  # the second output: penultimate features, for drift (absent in older files)
    layout: str = "NCHW"
    dtype: str = "float32"
    temperature: float = 1.0            # the logits output is the network's logits / temperature (older files: 1.0)

    def __post_init__(self) -> None:
        if self.color_mode not in CHANNELS:
            raise ContractError(f"colour mode {self.color_mode!r} is not supported; allowed: {', '.join(CHANNELS)}")
        if self.resize not in RESIZE:
            raise ContractError(f"resize {self.resize!r} is not supported; allowed: {', '.join(RESIZE)}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ContractError(f"{self.color_mode} images need {self.channels} mean and std value(s), got {list(self.mean)} / {list(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ContractError(f"std values must be > 0, got {list(self.std)}")
        if not self.temperature > 0:
            raise ContractError(f"temperature must be > 0, got {self.temperature}")

    @property
    def channels(self) -> int:
        return CHANNELS[self.color_mode]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": self.channels, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, raw: dict) -> Contract:
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "mean": tuple(raw["mean"]), "std": tuple(raw["std"])})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """A decoded image -> uint8 (C, height, width): what the server does to every request."""
        return resize_chw(np.asarray(convert_mode(image, self.color_mode)), self.height, self.width, self.resize)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) -> the float32 tensor the model takes."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return ((pixels.astype(np.float32) * np.float32(self.scale)) - mean) / std


# Pillow's gray modes of more than 8 bits ("I" is what some Pillow versions and TIFF give a 16-bit gray image).
WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit gray -> 8-bit by scaling (round(v / 257)); Pillow's own convert("L") clips everything above 255."""
    values = np.asarray(image, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"pixel values {values.min()}..{values.max()} are beyond 16 bits (mode {image.mode}); "
                         f"save the image with 8 or 16 bits a channel")
    return Image.fromarray(((values + 128) // 257).astype(np.uint8), "L")


def convert_mode(image: Image.Image, color_mode: str) -> Image.Image:
    """To "L" or "RGB": upright as its EXIF orientation says, 16-bit scaled to 8, palette and CMYK converted,
    transparent pixels black (as on a black canvas), not undefined colours."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "F":
        raise ValueError("a floating-point image has no defined pixel range; save it with 8 or 16 bits a channel")
    if image.mode in WIDE_GRAY_MODES:
        image = _to_8_bits(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert(color_mode)


def resize_chw(pixels: np.ndarray, height: int, width: int, resize: str = "bilinear") -> np.ndarray:
    """uint8 (H, W) or (H, W, C) at its decoded size -> uint8 (C, height, width), resized once."""
    if pixels.shape[:2] != (height, width):
        pixels = np.asarray(Image.fromarray(pixels).resize((width, height), RESIZE[resize]))
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
