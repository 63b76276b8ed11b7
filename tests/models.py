"""Small models shared by the optimizer tests, and the test's own hooks that record what a layer saw."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class ConvBNLinear(nn.Module):
    """conv (2 -> 3, 3x3, padding 1) -> BatchNorm2d -> ReLU -> Linear(75 -> 4), for 2 x 5 x 5 inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 5 * 5, 4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def record_layer_io(model: nn.Module, names: tuple[str, ...] = ("conv", "fc")):
    """(io, handles): forward hooks of the test's own, independent of fop's, that store each named module's input as
    io[name + ".x"] and its output gradient as io[name + ".dy"]; remove the handles when done."""
    io = {}

    def fwd(name):
        def hook(module, inputs, output):
            io[name + ".x"] = inputs[0].detach()
            output.register_hook(lambda g: io.__setitem__(name + ".dy", g.detach()))
        return hook

    return io, [getattr(model, name).register_forward_hook(fwd(name)) for name in names]
