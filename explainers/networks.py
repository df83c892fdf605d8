"""Networks by name and the parts the methods share.

- Classifier architectures by name (MONAI networks) and the binary-logit wrapper: a
  bundle names an architecture and its constructor parameters; weights come from
  safetensors, so nothing is ever unpickled.
- ``ResidualHead``: the zero-initialised residual output of the generators (sagen,
  exaggeration), so that a generator starts as the identity.
- ``PatchCritic``: the patch discriminator of the GAN trainings (sagen, medxgan).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from monai.networks import nets
from monai.networks.nets import PatchDiscriminator
from torch import nn

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "monai.DenseNet": nets.DenseNet,
    "monai.DenseNet121": nets.DenseNet121,
    "monai.ResNet": nets.ResNet,
    "monai.EfficientNetBN": nets.EfficientNetBN,
}

# Where Grad-CAM looks by default: the last convolutional feature map.
DEFAULT_CAM_LAYER: dict[str, str] = {
    "monai.DenseNet": "class_layers.relu",
    "monai.DenseNet121": "class_layers.relu",
    "monai.ResNet": "layer4",
    "monai.EfficientNetBN": "_swish",
}


def build_network(architecture: str, parameters: dict[str, Any]) -> nn.Module:
    """``ARCHITECTURES[architecture](**parameters)``; ValueError naming the known ones."""
    if architecture not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown classifier architecture {architecture!r}; known: {known}")
    return ARCHITECTURES[architecture](**parameters)


class BinaryClassifier(nn.Module):
    """Wraps a network so that it takes model-space images (B, C, H, W) in [0, 1]
    and returns the logit of the positive class, shape (B,).

    ``output``: 'logit' for a single-output network, 'two_logits' for a
    two-output network (positive logit = z1 - z0, i.e. the softmax odds).
    """

    def __init__(self, network: nn.Module, *, mean: float, std: float, output: str = "logit"):
        super().__init__()
        if output not in ("logit", "two_logits"):
            raise ValueError(f"output must be 'logit' or 'two_logits', got {output!r}")
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.network = network
        self.output = output
        self.register_buffer("mean", torch.tensor(float(mean)), persistent=False)
        self.register_buffer("std", torch.tensor(float(std)), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.network((images - self.mean) / self.std)
        if self.output == "two_logits":
            return out[:, 1] - out[:, 0]
        return out.reshape(out.shape[0])

    @torch.no_grad()
    def probability(self, images: torch.Tensor) -> torch.Tensor:
        """(B,) P(positive) in [0, 1]."""
        return torch.sigmoid(self(images))


class ResidualHead(nn.Module):
    """3x3 conv + LeakyReLU + 1x1 conv to a one-channel residual (last layer zero)."""

    def __init__(self, features: int, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.act = nn.LeakyReLU(0.1)
        self.out = nn.Conv2d(features, channels, kernel_size=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.conv(h)))


class PatchCritic(nn.Module):
    """MONAI PatchDiscriminator (instance norm, no batch statistics) returning its patch map."""

    def __init__(self, *, channels: int = 32, layers: int = 3, in_channels: int = 1):
        super().__init__()
        self.network = PatchDiscriminator(spatial_dims=2, channels=channels, in_channels=in_channels,
                                          num_layers_d=layers, norm="INSTANCE")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images * 2.0 - 1.0)[-1]
