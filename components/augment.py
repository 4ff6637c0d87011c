"""Image augmentation on batches of float pixels in [0, 1], drawn from the training loop's seeded generator: the
loop's own (finetune.augment, pretrain.augment) and a term's stronger views (FixMatch's strong_augment)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from components.config import Augment


def augment_batch(pixels: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """Random flip, rotation, scale and shift (one affine warp per image), then brightness, contrast and Cutout;
    pixels are floats in [0, 1]. A kind that is off draws nothing from `generator`."""
    n, _, height, width = pixels.shape

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    if augment.flip or augment.rotate_degrees or augment.shift_pixels or augment.scale != (1.0, 1.0):
        angle = torch.deg2rad(uniform(-augment.rotate_degrees, augment.rotate_degrees))
        scale = uniform(*augment.scale)
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if augment.flip else torch.ones(n)
        shift_x = uniform(-augment.shift_pixels, augment.shift_pixels) * 2 / width
        shift_y = uniform(-augment.shift_pixels, augment.shift_pixels) * 2 / height
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos * flip, -sin, shift_x], 1), torch.stack([sin * flip, cos, shift_y], 1)], 1)
        grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
        pixels = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    per_image = (n, 1, 1, 1)
    if augment.brightness:
        pixels = pixels * uniform(1 - augment.brightness, 1 + augment.brightness).view(per_image)
    if augment.contrast:
        mean = pixels.mean(dim=(1, 2, 3), keepdim=True)
        pixels = mean + (pixels - mean) * uniform(1 - augment.contrast, 1 + augment.contrast).view(per_image)
    if augment.brightness or augment.contrast:
        pixels = pixels.clamp(0, 1)
    if augment.cutout:
        side_y, side_x = max(1, round(augment.cutout * height)), max(1, round(augment.cutout * width))
        # The square's centre anywhere in the image, so it is cut off at the edges as often as Cutout's is.
        top = (uniform(0, height).long() - side_y // 2).view(n, 1, 1)
        left = (uniform(0, width).long() - side_x // 2).view(n, 1, 1)
        rows, columns = torch.arange(height).view(1, height, 1), torch.arange(width).view(1, 1, width)
        inside = (rows >= top) & (rows < top + side_y) & (columns >= left) & (columns < left + side_x)
        pixels = torch.where(inside.unsqueeze(1), torch.full_like(pixels, 0.5), pixels)
    return pixels
