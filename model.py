"""The network: a torchvision ResNet-family backbone, its pretrained weights, a new head,
freezing."""

import os

import torch
import torchvision
from torch import nn

RESNET_FAMILY = ("resnet", "resnext", "wide_resnet")


def resnet_family_names():
    return [
        n
        for n in torchvision.models.list_models(module=torchvision.models)
        if n.startswith(RESNET_FAMILY)
    ]


def build_model(arch, num_classes, weights="imagenet"):
    """`arch` from torchvision with a new He-normal head of `num_classes` outputs.

    weights: "imagenet" (torchvision's default ImageNet weights), a torchvision weights name such
    as "IMAGENET1K_V1", "none" (random), or the path of a local state dict (or of a checkpoint of
    this project); local weights load into everything but the head."""
    if arch not in resnet_family_names():
        raise SystemExit(
            f"unknown --arch {arch!r}; choose a torchvision ResNet-family model: "
            + ", ".join(resnet_family_names())
        )
    hub_weights, local_path = resolve_weights(arch, weights)
    try:
        model = torchvision.models.get_model(arch, weights=hub_weights)
    except Exception as e:  # no network, a proxy, a full disk: the user needs the same advice
        if hub_weights is None:
            raise
        file = hub_weights.url.rsplit("/", 1)[-1]
        raise SystemExit(
            f"could not download the {arch} ImageNet weights ({type(e).__name__}: {e}).\n"
            f"To work offline, use one of:\n"
            f"  --weights PATH   a local state dict, e.g. {file} fetched on another machine\n"
            f"  TORCH_HOME=DIR   with that file at DIR/hub/checkpoints/{file}\n"
            f"  --weights none   random initialisation"
        ) from None
    if local_path:
        load_backbone(model, local_path)
    model.fc = new_head(model.fc.in_features, num_classes)
    return model


def new_head(in_features, num_classes):
    head = nn.Linear(in_features, num_classes)
    nn.init.kaiming_normal_(head.weight)  # He normal: std sqrt(2 / in_features)
    nn.init.zeros_(head.bias)
    return head


def resolve_weights(arch, weights):
    """(torchvision weights or None, local file or None) for a --weights value."""
    if weights in (None, "none"):
        return None, None
    if os.path.isfile(weights):
        return None, weights
    choices = torchvision.models.get_model_weights(arch)
    if weights == "imagenet":
        return choices.DEFAULT, None
    if weights in choices.__members__:
        return choices[weights], None
    raise SystemExit(
        f"--weights {weights}: no such file, nor {arch} weights of that name; use "
        f"imagenet, none, a local file or one of: {', '.join(choices.__members__)}"
    )


def load_backbone(model, path):
    """Load a local state dict into everything but the head (fc), strictly."""
    try:
        state = torch.load(
            path, map_location="cpu", weights_only=True
        )  # a file that would run code is refused
    except Exception as e:
        raise SystemExit(f"cannot load --weights {path}: {type(e).__name__}: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a checkpoint of this project
    state = {
        strip_prefixes(k): v for k, v in state.items() if not strip_prefixes(k).startswith("fc.")
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"--weights {path} does not fit {type(model).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def strip_prefixes(key):
    """State dict keys as saved by DDP (module.) or torch.compile (_orig_mod.)."""
    for prefix in ("module.", "_orig_mod."):
        key = key.removeprefix(prefix)
    return key


def count_parameters(params):
    return sum(p.numel() for p in params)


def set_trainable(model, phase):
    """Phase 1: only the head learns. Phase 2: everything does."""
    for name, p in model.named_parameters():
        p.requires_grad = phase == 2 or name.startswith("fc.")
    return [p for p in model.parameters() if p.requires_grad]


def train_mode(model, freeze_bn=False):
    """Training mode. Batch norm stays in it by default even when its weights are frozen
    (Phase I), as in the method's released code, so its running statistics adapt to the new data;
    freeze_bn keeps them at their pretrained values instead."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def model_from_checkpoint(state, device):
    """The trained network of a checkpoint, on `device`, in eval mode."""
    model = build_model(state["arch"], len(state["classes"]), weights="none")
    model.load_state_dict(state["model"])
    return model.to(device, memory_format=torch.channels_last).eval()
