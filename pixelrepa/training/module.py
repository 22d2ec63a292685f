"""The backbone and its alignment head as one module whose forward is the training loss.

DDP and FSDP2 wrap this one module from outside (training/parallel.py); sampling uses
`module.net` alone. Parameters that the chosen mode never uses (the mask token outside
PixelREPA) are frozen, so the graph is static and DDP needs no unused-parameter search.
"""

from __future__ import annotations

from torch import Tensor, nn

from pixelrepa.align.heads import build_align_head
from pixelrepa.config import RunConfig
from pixelrepa.models.jit import JiT
from pixelrepa.objective import Draws, training_loss


class TrainingModule(nn.Module):
    def __init__(self, config: RunConfig):
        super().__init__()
        self.config = config
        self.net = JiT(config.model)
        self.head = build_align_head(config.model, config.align)
        if config.align.mode != "pixelrepa":
            self.net.mask_token.requires_grad_(False)

    def forward(self, x: Tensor, draws: Draws, target: Tensor | None = None) -> dict[str, Tensor]:
        c = self.config
        return training_loss(self.net, self.head, x, draws, c.objective, c.align, c.tap_block, target)
