"""The network: a torchvision ResNet-family backbone, its pretrained weights, a new head,
freezing, layer-wise learning-rate groups, the weights' moving average, a checkpoint's network."""

import copy
import os
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from utils import Problem, log

RESNET_FAMILY = ("resnet", "resnext", "wide_resnet")

# The statistics ImageNet-pretrained weights were trained with: their inputs' normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resnet_family_names():
    return [
        n
        for n in torchvision.models.list_models(module=torchvision.models)
        if n.startswith(RESNET_FAMILY)
    ]


@dataclass
class Weights:
    """A model's starting weights: torchvision's (`hub`), a local state dict (`state`, head
    left out), or none; the normalisation they were trained with; a line saying what they are."""

    hub: object = None
    state: dict | None = None
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    about: str = "random initialisation"


def load_weights(arch, weights):
    """The Weights a --weights value names: "imagenet" (torchvision's default ImageNet weights), a
    torchvision weights name such as "IMAGENET1K_V1", "none", or the path of a state dict or of a
    checkpoint of this project (its own normalisation comes with it)."""
    if weights in (None, "none"):
        return Weights()
    if os.path.isfile(weights):
        return local_weights(arch, weights)
    choices = torchvision.models.get_model_weights(arch)
    if weights == "imagenet":
        weights = choices.DEFAULT.name
    if weights in choices.__members__:
        about = f"torchvision's {arch} {weights}, every layer but the head"
        return Weights(hub=choices[weights], about=about)
    raise Problem(
        f"--weights {weights}: no such file, nor {arch} weights of that name; use "
        f"imagenet, none, a local file or one of: {', '.join(choices.__members__)}"
    )


def normalisation_of(weights):
    """The (mean, std) the inputs of `weights` (a --weights value) were normalised with when they
    were trained: a checkpoint of this project says its own; torchvision's weights, a plain state
    dict and none are ImageNet's. Its tensors are mapped, not read."""
    if weights and os.path.isfile(weights):
        try:
            saved = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # load_weights says what is wrong with the file
            return IMAGENET_MEAN, IMAGENET_STD
        if isinstance(saved, dict) and isinstance(saved.get("model"), dict):
            return tuple(saved.get("mean", IMAGENET_MEAN)), tuple(saved.get("std", IMAGENET_STD))
    return IMAGENET_MEAN, IMAGENET_STD


def local_weights(arch, path):
    try:  # weights_only: a file that would run code is refused
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise Problem(f"cannot load --weights {path}: {type(e).__name__}: {e}") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("model"), dict)):
        state = backbone_of(saved)
        return Weights(state=state, about=f"{len(state)} tensors of the state dict {path}")
    # A checkpoint of this project: it says what it is, and how its inputs were normalised.
    if saved.get("arch", arch) != arch:
        raise Problem(f"--weights {path} holds a {saved['arch']}, not a {arch} (--arch)")
    best = max((r["val_acc"] for r in saved.get("history", [])), default=None)
    state = backbone_of(inference_weights(saved))  # its moving average, if that validated better
    classes = len(saved.get("classes", []))
    about = (
        f"{len(state)} tensors (all but the head) of {path}: {arch} trained on {classes} classes "
        f"at {saved.get('img_size', '?')} px, phase {saved.get('phase', '?')} epoch "
        f"{saved.get('epoch', '?')}" + (f", val acc {best:.4f}" if best is not None else "")
    )
    mean, std = saved.get("mean", IMAGENET_MEAN), saved.get("std", IMAGENET_STD)
    return Weights(state=state, mean=tuple(mean), std=tuple(std), about=about)


def backbone_of(state):
    """A state dict without its head, keys as the plain model has them."""
    keys = {k: strip_prefixes(k) for k in state}
    return {plain: state[k] for k, plain in keys.items() if not plain.startswith("fc.")}


def build_model(arch, num_classes, weights="imagenet"):
    """`arch` from torchvision with a new He-normal head of `num_classes` outputs, starting from
    `weights` (a --weights value or a Weights): local weights load into everything but the head."""
    if arch not in resnet_family_names():
        raise Problem(
            f"unknown --arch {arch!r}; choose a torchvision ResNet-family model: "
            + ", ".join(resnet_family_names())
        )
    if not isinstance(weights, Weights):
        weights = load_weights(arch, weights)
    try:
        model = torchvision.models.get_model(arch, weights=weights.hub)
    except Exception as e:  # no network, a proxy, a full disk: the user needs the same advice
        if weights.hub is None:
            raise
        file = weights.hub.url.rsplit("/", 1)[-1]
        raise Problem(
            f"could not download the {arch} ImageNet weights ({type(e).__name__}: {e}).\n"
            f"To work offline, use one of:\n"
            f"  --weights PATH   a local state dict, e.g. {file} fetched on another machine\n"
            f"  TORCH_HOME=DIR   with that file at DIR/hub/checkpoints/{file}\n"
            f"  --weights none   random initialisation"
        ) from None
    if weights.state is not None:
        misfits = [
            f"{key} is {tuple(value.shape)} there, {tuple(mine.shape)} in {arch}"
            for key, value in weights.state.items()
            if (mine := model.state_dict().get(key)) is not None and mine.shape != value.shape
        ]
        if misfits:
            raise Problem(
                f"the weights of {weights.about} do not fit {arch} (weights of another "
                f"architecture or width?): {'; '.join(misfits[:3])}"
                + (f"; and {len(misfits) - 3} more" if len(misfits) > 3 else "")
            )
        missing, unexpected = model.load_state_dict(weights.state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise Problem(
                f"the weights of {weights.about} do not fit {arch}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    model.fc = new_head(model.fc.in_features, num_classes)
    return model


def new_head(in_features, num_classes):
    head = nn.Linear(in_features, num_classes)
    nn.init.kaiming_normal_(head.weight)  # He normal: std sqrt(2 / in_features)
    nn.init.zeros_(head.bias)
    return head


def strip_prefixes(key):
    """State dict keys as saved by DDP (module.) or torch.compile (_orig_mod.)."""
    for prefix in ("module.", "_orig_mod."):
        key = key.removeprefix(prefix)
    return key


def count_parameters(params):
    return sum(p.numel() for p in params)


def warn_if_too_large(arch, params, limit):
    """--max-params: the homework's rule on model size, as a warning."""
    if limit and params > limit:
        log(f"warning: {arch} has {params:,} parameters, more than --max-params {limit:,}")


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


STAGES = ("fc", "layer4", "layer3", "layer2", "layer1")  # from the head down; the stem below


def stage_depth(name):
    """How many stages below the head a parameter is: fc 0, layer4 1, ..., the stem 5."""
    top = strip_prefixes(name).split(".")[0]
    return STAGES.index(top) if top in STAGES else len(STAGES)


def stage_groups(model, lr, decay):
    """Parameter groups for layer-wise learning-rate decay: the head at `lr`, each ResNet stage
    below it `decay` times the one above (layer4, layer3, ..., the stem last)."""
    if decay == 1:
        return [p for p in model.parameters() if p.requires_grad]
    groups = [[] for _ in range(len(STAGES) + 1)]
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[stage_depth(name)].append(p)
    return [{"params": g, "lr": lr * decay**depth} for depth, g in enumerate(groups) if g]


def optimizer_order(model, phase, decay):
    """The names of the parameters a phase's optimizer holds, in its order, as recipe.phase_setup
    builds it with --lr-decay `decay`: what a saved optimizer state's indices refer to."""
    named = [strip_prefixes(name) for name, _ in model.named_parameters()]
    if phase == 1:
        return [name for name in named if name.startswith("fc.")]
    return named if decay == 1 else sorted(named, key=stage_depth)  # stable: model order within


def parameter_names(model, optimizer):
    """The names of the parameters `optimizer` holds, in its order."""
    names = {id(p): strip_prefixes(n) for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


class EMA:
    """An exponential moving average of a model's weights, as timm's ModelEmaV3 with warmup and
    its buffers copied: after the n-th optimizer step, ema = d ema + (1 - d) weights with
    d = min(decay, 1 - (1 + n) ** -2/3), so that the early average is not stuck near the start;
    batch norm statistics are copied, not averaged."""

    def __init__(self, model, decay):
        self.source, self.decay, self.updates = model, decay, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def rate(self, n):
        return min(self.decay, 1 - (1 + n) ** (-2 / 3))

    @torch.no_grad()
    def update(self):
        self.updates += 1
        ema = [p for p in self.module.parameters()]
        live = [p.detach() for p in self.source.parameters()]
        torch._foreach_lerp_(ema, live, 1 - self.rate(self.updates))
        for mine, theirs in zip(self.module.buffers(), self.source.buffers()):
            mine.copy_(theirs)

    def state_dict(self):
        weights = {strip_prefixes(k): v for k, v in self.module.state_dict().items()}
        return {"model": weights, "updates": self.updates}

    def load_state_dict(self, state):
        self.module.load_state_dict(state["model"])
        self.updates = state["updates"]


def weights_kind(state, use="auto"):
    """Which weights of a checkpoint `use` picks: "ema" or "model"."""
    if use == "auto":
        return "ema" if state.get("eval_weights") == "ema" else "model"
    return "ema" if use == "ema" else "model"


def inference_weights(state, use="auto"):
    """The weights a checkpoint is evaluated with: with use="auto" its moving average where that
    validated better, else the trained weights; "weights" or "ema" pick one."""
    if use == "auto":
        use = "ema" if state.get("eval_weights") == "ema" else "weights"
    if use == "ema" and not state.get("ema"):
        raise Problem("this checkpoint holds no moving average of its weights (train with --ema)")
    return state["ema"]["model"] if use == "ema" else state["model"]


def average_weights(states):
    """The mean of checkpoints' weights (each the weights it is evaluated with), key by key, as
    SWA averages; integer buffers (batch norm's batch counts) are the last one's. Batch norm's
    running statistics of an average are not the average of the statistics: measure them again
    (inference.update_bn)."""
    weights = [inference_weights(s) for s in states]
    keys = weights[0].keys()
    if any(w.keys() != keys for w in weights):
        raise Problem("the checkpoints hold different models: average checkpoints of one run")
    mean = {}
    for key in keys:
        values = [w[key] for w in weights]
        if values[0].is_floating_point():
            mean[key] = torch.stack([v.double() for v in values]).mean(0).to(values[0].dtype)
        else:
            mean[key] = values[-1].clone()
    return mean


def model_from_checkpoint(state, device, use="auto", side=None):
    """The trained network of a checkpoint (the weights inference_weights picks), on `device`,
    in eval mode; tested at `side` px, with the batch norm statistics --test-size auto measured
    there, where the checkpoint has them for those weights."""
    model = build_model(state["arch"], len(state["classes"]), weights="none")
    model.load_state_dict(inference_weights(state, use))
    measured = state.get("test_bn")
    if (
        measured
        and side == state.get("test_size")
        and state.get("test_bn_of") == weights_kind(state, use)
    ):
        model.load_state_dict(measured, strict=False)  # its buffers alone
    return model.to(device, memory_format=torch.channels_last).eval()
