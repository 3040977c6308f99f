"""Phase II's fine-tuning regularisers beyond the report, each off by default, each acting on
the step's gradients between the backward and the optimizer (train.py's optimizer_steps), with
torch._foreach ops: no host sync, nothing added to the autograd graph.

- L2-SP (Li, Grandvalet and Davoine, "Explicit inductive bias for transfer learning with
  convolutional networks", ICML 2018), --l2sp ALPHA: the backbone is pulled towards the weights
  the run started from, w0, by the penalty (ALPHA/2)||w - w0||^2, instead of towards zero by its
  weight decay; the new head keeps its --wd2 (the paper's L2 on the new layers).
- SAM (Foret, Kleiner, Mobahi and Neyshabur, "Sharpness-aware minimization for efficiently
  improving generalization", ICLR 2021), --sam RHO: the step's gradient is taken again on the
  same batches at w + RHO g/||g||, the weights near w where the loss rises most (to first order),
  and that second gradient steps w.
"""

import hashlib
import os
from contextlib import contextmanager

import torch
import torchvision
from torch import nn

from model import backbone_of, load_weights, strip_prefixes
from utils import Problem

# ----------------------------------------------------------------------------- L2-SP


class L2SP:
    """The penalty (alpha/2)||w - w0||^2 over the backbone's parameters (every one but the head's;
    batch norm's running statistics are buffers, not parameters, and are left out), added to
    a step's gradients as its gradient alpha (w - w0). `reference`: w0, one tensor a parameter
    (None: w0 = 0); `digest`: w0's fingerprint, which a Phase II checkpoint keeps so that a
    continued run is refused where --weights no longer holds them."""

    def __init__(self, alpha, params, reference, digest, about):
        self.alpha, self.params, self.reference = alpha, params, reference
        self.digest, self.about = digest, about
        self.ids = {id(p) for p in params}

    @classmethod
    def of(cls, args, model):
        """--l2sp's penalty on `model`'s backbone, towards the run's --weights (read again: the
        same on a fresh run and on one continued in Phase II, whose backbone has moved), or None
        where --l2sp is 0. Keeping w0 in every checkpoint instead would add a third to each
        (WRN-50-2: 0.27 GB on 0.8)."""
        if not args.l2sp:
            return None
        named = [(n, p) for n, p in model.named_parameters() if not is_head(n)]
        params = [p for _, p in named]
        state = starting_weights(args.arch, args.weights)
        if state is None:  # no pretrained weights: no starting point to keep to
            return cls(args.l2sp, params, None, "none", "zero (--weights none: the paper's L2)")
        reference, digest = [], hashlib.sha256()
        for name, p in named:
            saved = state.get(strip_prefixes(name))
            if saved is None or saved.shape != p.shape:
                raise Problem(
                    f"--l2sp: --weights {args.weights} has no {tuple(p.shape)} tensor for "
                    f"{strip_prefixes(name)}: they are not the weights this model started from"
                )
            saved = saved.to(p.dtype).contiguous()
            digest.update(saved.reshape(-1).view(torch.uint8).numpy())
            reference.append(torch.empty_like(p, requires_grad=False).copy_(saved))
        return cls(args.l2sp, params, reference, digest.hexdigest(), f"--weights {args.weights}")

    def pulls(self, group):
        """Whether an optimizer's parameter group is the backbone's: its weight decay is off."""
        return any(id(p) in self.ids for p in group["params"])

    @torch.no_grad()
    def pull(self):
        """The penalty's gradient, alpha (w - w0), added to the backbone's gradients, once a step:
        after they are unscaled (fp16), summed over its batches (--accum-steps), divided by the
        class weights and all-reduced (DDP), which leave it alone: it is the same everywhere."""
        pairs = [(p, i) for i, p in enumerate(self.params) if p.grad is not None]
        grads, params = [p.grad for p, _ in pairs], [p for p, _ in pairs]
        if self.reference is None:
            torch._foreach_add_(grads, params, alpha=self.alpha)
            return
        away = torch._foreach_sub(params, [self.reference[i] for _, i in pairs])
        torch._foreach_add_(grads, away, alpha=self.alpha)

    def check_kept(self, saved, path):
        """A Problem where the checkpoint `path` continues pulled towards other weights (its
        `saved` digest) than --weights holds now: the file was replaced, or torchvision's
        default weights changed."""
        if saved is not None and saved != self.digest:
            raise Problem(
                f"--l2sp: {path} was pulled towards other weights than {self.about} holds now "
                "(changed since?); put back the weights the run started from, or continue "
                "without L2-SP (--l2sp 0)"
            )

    def words(self, weight_decay):
        return (
            f", L2-SP {self.alpha:g} towards {self.about} in place of the backbone's weight "
            f"decay (the head's {weight_decay:.0e} kept)"
        )


def is_head(name):
    return strip_prefixes(name).startswith("fc.")


def head_apart(model, groups):
    """Phase II's parameter groups with the head in one of its own, whose weight decay L2-SP
    keeps: --lr-decay's groups have it so already; one list becomes the backbone's and the
    head's, in the model's order (the head is a ResNet's last module), which a saved optimizer
    state's order is read by (model.optimizer_order)."""
    if isinstance(groups[0], dict):
        return groups
    head = {id(p) for n, p in model.named_parameters() if is_head(n)}
    return [
        {"params": [p for p in groups if id(p) not in head]},
        {"params": [p for p in groups if id(p) in head]},
    ]


def starting_weights(arch, weights):
    """The weights a run of `arch` started from (its --weights), by name, on the CPU, without
    the head; None for --weights none. A file that has gone is a Problem naming it."""
    if weights in (None, "none"):
        return None
    names = ("imagenet", *torchvision.models.get_model_weights(arch).__members__)
    if weights not in names and not os.path.isfile(weights):
        raise Problem(
            f"--l2sp pulls the backbone towards the weights the run started from, --weights "
            f"{weights}, and {os.path.abspath(weights)} is no file now: put it back, or continue "
            "without L2-SP (--l2sp 0)"
        )
    loaded = load_weights(arch, weights)
    if loaded.hub is None:
        return loaded.state
    try:  # torchvision's cache holds them since the run started
        return backbone_of(loaded.hub.get_state_dict(progress=False))
    except Exception as e:
        raise Problem(
            f"--l2sp: cannot read the run's starting weights, torchvision's {arch} {weights} "
            f"({type(e).__name__}: {e}); with no network, put them in TORCH_HOME's cache"
        ) from None


# ----------------------------------------------------------------------------- SAM


class SAM:
    """--sam RHO: each optimizer step's gradient taken again at the weights moved RHO along its
    direction, on the same batches, which steps the weights where they were."""

    def __init__(self, rho):
        self.rho = rho

    @classmethod
    def of(cls, args):
        return cls(args.sam) if args.sam else None

    @contextmanager
    def ascended(self, net, params):
        """Within: `params` at w + rho g/||g||, g their gradients as the first pass left them
        (all-reduced under DDP, and summed over the step's batches; scaled under fp16 and not
        yet divided by the class weights, which leaves their direction as it is), with no
        gradients, for a second pass over the step's batches that leaves batch norm's running
        statistics alone; after it: the weights put back at w exactly, holding the second
        pass's gradients. A first gradient with inf or nan (an fp16 overflow) makes the second so
        too: GradScaler then skips the step, as it would have skipped the plain one."""
        moved = [p for p in params if p.grad is not None]
        grads = [p.grad for p in moved]
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            at = [torch.empty_like(p) for p in moved]
            torch._foreach_copy_(at, moved)
            torch._foreach_mul_(grads, self.rho / (norm + 1e-12))
            torch._foreach_add_(moved, grads)
        for p in moved:
            p.grad = None
        try:
            with running_stats_kept(net):
                yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(moved, at)

    def words(self):
        return f", SAM rho {self.rho:g} (two forward and backward passes a step)"


@contextmanager
def running_stats_kept(model):
    """Batch norm normalising by each batch's statistics, as it trains, but leaving its running
    statistics and their count as they are: for SAM's second pass over batches the first has
    counted (davda54/sam's disable_running_stats sets the momentum to 0 instead, which still
    counts them)."""
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True
