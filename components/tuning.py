"""Fine-tuning knobs of the one training loop, each small and composable (fastai / timm / TLlib users expect
them): which top blocks of the source are not transferred but re-initialised and trained like the new head, a
regulariser Omega(f) on the weights or the features, layer-wise learning-rate decay, gradual unfreezing from the
top, and the BatchNorm mode. "The backbone" below is what is transferred: the source's blocks less the re-initialised.

Regularisers (the `+ Omega(f)` of the regularised objective min_f L_T(f) + Omega(f)):
  l2     strength/2 * sum of every trainable weight and bias squared (the texts' lambda * sum(w'w + b^2))
  l2_sp  strength/2 * ||w_backbone - w_source||^2 + head_strength/2 * ||w_head||^2: pulled toward the source
         weights instead of toward zero (Li et al., "Explicit inductive bias for transfer learning", 2018)
  bss    strength * the sum of the k smallest squared singular values of each batch's feature matrix: shrinks the
         feature directions that carry little but transfer badly (Chen et al., "Catastrophic forgetting meets
         negative transfer: batch spectral shrinkage", 2019)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from components.config import FinetuneParams, RegularizerParams
from components.errors import GraftError
from components.network import GraftNet


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's top-level parts that hold weights, from input to output: the units layer-wise decay and
    gradual unfreezing count in."""
    return [child for child in backbone.children() if any(True for _ in child.parameters())]


class Regularizer:
    def penalty(self, model: GraftNet, features: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class L2(Regularizer):
    def __init__(self, strength: float) -> None:
        self.strength = strength

    def penalty(self, model: GraftNet, features: torch.Tensor | None) -> torch.Tensor:
        return self.strength / 2 * sum(p.pow(2).sum() for p in model.parameters() if p.requires_grad)


class L2SP(Regularizer):
    def __init__(self, model: GraftNet, strength: float, head_strength: float, new_blocks: list[nn.Module]) -> None:
        self.strength, self.head_strength = strength, head_strength
        new = {id(p) for block in new_blocks for p in block.parameters()}
        # The starting point is the source: fine-tuning begins right after grafting.
        self.source = {name: p.detach().clone() for name, p in model.backbone.named_parameters() if id(p) not in new}
        self.new = [p for block in new_blocks for p in block.parameters()]

    def penalty(self, model: GraftNet, features: torch.Tensor | None) -> torch.Tensor:
        device = model.head.weight.device
        if any(w.device != device for w in self.source.values()):  # the model moved to the training device
            self.source = {name: w.to(device) for name, w in self.source.items()}
        drift = sum((p - self.source[name]).pow(2).sum() for name, p in model.backbone.named_parameters()
                    if p.requires_grad and name in self.source)
        head = sum(p.pow(2).sum() for p in (*model.head.parameters(), *self.new))
        return self.strength / 2 * drift + self.head_strength / 2 * head


class BatchSpectralShrinkage(Regularizer):
    def __init__(self, strength: float, k: int) -> None:
        self.strength, self.k = strength, k

    def penalty(self, model: GraftNet, features: torch.Tensor | None) -> torch.Tensor:
        singular = torch.linalg.svdvals(features.flatten(1))
        return self.strength * singular[-self.k:].pow(2).sum()


def regularizer_for(params: RegularizerParams, model: GraftNet, new_blocks: list[nn.Module] = ()) -> Regularizer | None:
    if params.kind == "l2":
        return L2(params.strength)
    if params.kind == "l2_sp":
        return L2SP(model, params.strength, params.head_strength, list(new_blocks))
    if params.kind == "bss":
        return BatchSpectralShrinkage(params.strength, params.bss_k)
    return None


@dataclass(frozen=True)
class Tuning:
    """How a fine-tuning phase treats the backbone; the defaults change nothing (pretraining uses them)."""

    regularizer: Regularizer | None = None
    reinit_top_blocks: int = 0       # the source's top N blocks are re-initialised and trained like the new head
    layer_lr_decay: float = 1.0      # block i of n gets lr * decay^(n - 1 - i): the top block the full backbone lr
    unfreeze_every_steps: int = 0    # 0: every block trains from the start; N: the top block first, one more every N steps
    batchnorm: str = "train"         # "frozen": the backbone's BatchNorm keeps the source's running statistics

    @classmethod
    def of(cls, params: FinetuneParams, model: GraftNet, seed: int) -> Tuning:
        """The knobs of `params` for a model just grafted; re-initialises its top blocks (seeded) if asked."""
        knobs = cls(None, params.reinit_top_blocks, params.layer_lr_decay, params.unfreeze_every_steps, params.batchnorm)
        blocks = len(backbone_blocks(model.backbone))
        if knobs.reinit_top_blocks >= blocks:
            raise GraftError(f"finetune.reinit_top_blocks is {knobs.reinit_top_blocks}, but this source's backbone has "
                             f"{blocks} blocks: at most {blocks - 1}, so that something is transferred")
        if knobs.reinit_top_blocks:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                for module in (m for block in knobs.new_blocks(model) for m in block.modules()):
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()  # BatchNorm: its running statistics too
        return replace(knobs, regularizer=regularizer_for(params.regularizer, model, knobs.new_blocks(model)))

    def new_blocks(self, model: GraftNet) -> list[nn.Module]:
        blocks = backbone_blocks(model.backbone)
        return blocks[len(blocks) - self.reinit_top_blocks:] if self.reinit_top_blocks else []

    def transferred_blocks(self, model: GraftNet) -> list[nn.Module]:
        blocks = backbone_blocks(model.backbone)
        return blocks[: len(blocks) - self.reinit_top_blocks]

    def new_parameters(self, model: GraftNet) -> list[nn.Parameter]:
        """Re-initialised blocks: trained at the head's learning rate in every phase, as the head is."""
        return [p for block in self.new_blocks(model) for p in block.parameters()]

    def backbone_groups(self, model: GraftNet, lr: float) -> list[dict]:
        blocks = self.transferred_blocks(model)
        groups = [{"params": list(block.parameters()), "lr": lr * self.layer_lr_decay ** (len(blocks) - 1 - i)}
                  for i, block in enumerate(blocks)]
        if own := list(model.backbone.parameters(recurse=False)):
            groups.append({"params": own, "lr": lr})
        return groups

    def trainable_blocks(self, model: GraftNet, phase_step: int) -> int:
        """How many transferred blocks, counted from the top, train at this step of a phase that trains the backbone."""
        blocks = len(self.transferred_blocks(model))
        if not self.unfreeze_every_steps:
            return blocks
        return min(blocks, 1 + phase_step // self.unfreeze_every_steps)

    def set_modes(self, model: GraftNet, backbone_trains: bool, phase_step: int) -> None:
        """requires_grad and train/eval per block for this step; frozen blocks keep their BatchNorm statistics."""
        model.train()
        blocks = self.transferred_blocks(model)
        trainable = self.trainable_blocks(model, phase_step) if backbone_trains else 0
        for parameter in model.backbone.parameters(recurse=False):
            parameter.requires_grad_(trainable == len(blocks) and backbone_trains)
        for i, block in enumerate(blocks):
            trains = i >= len(blocks) - trainable
            for parameter in block.parameters():
                parameter.requires_grad_(trains)
            block.train(trains)
        if trainable == 0:
            model.backbone.eval()  # a frozen backbone: dropout and every statistic as the source left them
        for block in self.new_blocks(model):
            block.requires_grad_(True)
            block.train()
        if self.batchnorm == "frozen":
            for module in model.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
