"""Narrow stand-ins for resnet18 and resnet34 in end-to-end tests: torchvision's ResNet class with
one BasicBlock per stage and an eighth of the widths: a checkpoint is a small fraction of
resnet18's, and a step takes milliseconds.

In a test, the `narrow_models` fixture (conftest.py) swaps them in. For a subprocess:

    python tests/narrow.py train.py --demo ...     # runs the script with them swapped in
"""

import runpy
import sys
from pathlib import Path

import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

WIDTHS = {"resnet18": 8, "resnet34": 16}  # channels of the first stage, instead of 64


class NarrowResNet(ResNet):
    def __init__(self, width, num_classes=1000):
        self.width = width
        super().__init__(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
        self.fc = nn.Linear(8 * width, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        return super()._make_layer(block, planes * self.width // 64, blocks, stride, dilate)


def narrow_get_model(real, widths=WIDTHS):
    """torchvision.models.get_model, the archs of `widths` built narrow (never pretrained)."""

    def get_model(name, weights=None, **kwargs):
        if name in widths:
            assert weights is None, "narrow models have no pretrained weights"
            return NarrowResNet(widths[name], **kwargs)
        return real(name, weights=weights, **kwargs)

    return get_model


if __name__ == "__main__":
    torchvision.models.get_model = narrow_get_model(torchvision.models.get_model)
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
    runpy.run_path(script, run_name="__main__")
