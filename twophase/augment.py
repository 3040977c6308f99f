"""On the device: the normalisation every split gets, the method's training augmentation, and
Phase II's MixUp and CutMix (beyond the method).

A batch arrives as uint8 N x H x W x 3 (see data.py) and leaves as normalised float N x 3 x H x W
in channels_last. The augmentation runs on the whole batch at once, each image with its own
random parameters, with the semantics of torchvision's transforms (the tests compare them op by
op and image by image).
"""

from dataclasses import dataclass, fields

import numpy as np
import torch

from model import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (the default normalisation)


@dataclass(frozen=True)
class Augmentation:
    """The training augmentation's values: the report's Table 1 by default. train.py's options of
    the group "augmentation" (options.OPTIONS) are these fields, one each."""

    degrees: float = 10.0  # RandomAffine: rotation +-
    translate: float = 0.1  # shift, a share of the side
    scale: tuple = (0.9, 1.1)
    shear: float = 10.0  # x-shear +-, degrees
    jitter: float = 0.25  # ColorJitter: brightness, contrast, saturation
    hue: float = 0.1
    p_jitter: float = 0.5
    blur_sigma: tuple = (0.1, 2.0)  # GaussianBlur 3x3
    p_blur: float = 0.5
    p_hflip: float = 0.3
    p_vflip: float = 0.3

    @classmethod
    def of(cls, options):
        """The values the run's options give (any object with these attributes)."""
        values = {f.name: getattr(options, f.name) for f in fields(cls)}
        pairs = {key: tuple(values[key]) for key in ("scale", "blur_sigma")}
        return cls(**values | pairs)


class DeviceAugment(torch.nn.Module):
    """The report's training augmentation on a whole float batch in [0, 1], on its device:

        RandomAffine(+-10 deg, +-10 % shift, 0.9-1.1 scale, +-10 deg x-shear, zero fill), always;
        ColorJitter(brightness, contrast, saturation 0.25, hue 0.1), p 0.5;
        GaussianBlur(3x3, sigma 0.1-2.0), p 0.5; horizontal flip, p 0.3; vertical flip, p 0.3.

    Every image draws its own parameters, from the distributions of torchvision's transforms (the
    shift too is rounded to whole pixels, as RandomAffine does). Each op is torchvision's (tests
    compare them), written for whole batches. What it costs the device is kept small:
    - the parameters are drawn on the host, from this module's own generator (`reseed` it), and
      reach the device in a few small copies that never make the host wait for the device;
    - the flips are folded into the affine's sampling grid: they commute with the colour ops and
      with the symmetric blur, so flipping first gives the same images, at no cost;
    - jitter and blur run on the chosen samples only. The host knows which those are, so picking
      them out needs no device-to-host round trip.
    The order of the four colour operations is drawn once per batch, as kornia does; every image
    still draws its own factors and coin."""

    def __init__(self, options=None, seed=0):
        super().__init__()
        self.options = options or Augmentation()
        self.generator = torch.Generator()
        self.reseed(seed)

    def reseed(self, *parts):
        """Start the parameter draws anew from integers: training reseeds each epoch from (seed,
        epoch, rank), so a resumed run draws what an uninterrupted one would have."""
        words = np.random.SeedSequence([part & (2**64 - 1) for part in parts]).generate_state(
            1, np.uint64
        )
        self.generator.manual_seed(int(words[0]))

    def sample(self, n):
        """The random parameters of n images, as host tensors."""
        g = self.generator

        def uniform(low, high):
            return torch.empty(n, dtype=torch.float64).uniform_(low, high, generator=g)

        def coin(p):
            return torch.rand(n, dtype=torch.float64, generator=g) < p

        o = self.options
        j = o.jitter
        return {
            "angle": uniform(-o.degrees, o.degrees),
            "shear": uniform(-o.shear, o.shear),
            "scale": uniform(*o.scale),
            "tx": uniform(-o.translate, o.translate),
            "ty": uniform(-o.translate, o.translate),
            "jitter": coin(o.p_jitter),
            "brightness": uniform(1 - j, 1 + j),
            "contrast": uniform(1 - j, 1 + j),
            "saturation": uniform(1 - j, 1 + j),
            "hue": uniform(-o.hue, o.hue),
            "color_order": torch.randperm(4, generator=g).tolist(),
            "blur": coin(o.p_blur),
            "sigma": uniform(*o.blur_sigma),
            "hflip": coin(o.p_hflip),
            "vflip": coin(o.p_vflip),
        }

    @torch.no_grad()
    def forward(self, x, params=None):
        p = self.sample(x.shape[0]) if params is None else params
        h, w = x.shape[-2:]
        # Shifts of whole pixels, as RandomAffine's.
        tx, ty = torch.round(p["tx"] * w) / w, torch.round(p["ty"] * h) / h
        jittered, blurred = p["jitter"].nonzero().squeeze(1), p["blur"].nonzero().squeeze(1)
        factors = torch.stack(
            [p[k][jittered] for k in ("brightness", "contrast", "saturation", "hue")], 1
        )
        theta, factors, kernels, jittered, blurred = host_to_device(
            [
                affine_theta(p["angle"], tx, ty, p["scale"], p["shear"], p["hflip"], p["vflip"]),
                factors.float(),
                blur_kernels(p["sigma"][blurred]),
                jittered,
                blurred,
            ],
            x.device,
        )
        x = affine(x, theta)
        if len(jittered):
            colours = color_jitter(
                x.index_select(0, jittered), *factors.unbind(1), p["color_order"]
            )
            x.index_copy_(0, jittered, colours)
        if len(blurred):
            x.index_copy_(0, blurred, gaussian_blur3(x.index_select(0, blurred), kernels))
        return x


def host_to_device(tensors, device):
    """Host tensors on `device`, copied from pinned memory so that the host does not wait."""
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


def affine_theta(angle, tx, ty, scale, shear, hflip=None, vflip=None):
    """affine_grid's output-to-input matrices (N x 2 x 3, float32) of torchvision's affine about the
    centre of square images, per sample: angle and shear (x only) in degrees, tx and ty as
    fractions of the side. A flip after the affine is its grid mirrored: a column of theta
    negated."""
    rot, sx = torch.deg2rad(angle.double()), torch.deg2rad(shear.double())
    # torchvision's _get_inverse_affine_matrix with no y-shear.
    a, c = torch.cos(rot), torch.sin(rot)
    b = -torch.cos(rot) * torch.tan(sx) - torch.sin(rot)
    d = -torch.sin(rot) * torch.tan(sx) + torch.cos(rot)
    inv = torch.stack([torch.stack([d, -b], 1), torch.stack([-c, a], 1)], 1) / scale.double().view(
        -1, 1, 1
    )
    shift = torch.stack([tx, ty], 1).double() * 2  # in grid units, where the side is 2
    theta = torch.cat([inv, -(inv @ shift.unsqueeze(2))], dim=2)
    for column, flip in enumerate((hflip, vflip)):
        if flip is not None:
            theta[:, :, column] *= 1 - 2 * flip.double().view(-1, 1)
    return theta.float()


def affine(x, theta):
    """Bilinear resampling with zero fill on the grids of `theta` (see affine_theta)."""
    grid = affine_grid(theta, *x.shape[2:])
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )


def affine_grid(theta, h, w):
    """F.affine_grid(theta, (n, c, h, w), align_corners=False), written as the outer sum it is:
    coordinate i of output pixel (y, x) is theta[i, 0] x + theta[i, 1] y + theta[i, 2]. The library
    version multiplies a materialised n x h x w x 3 grid of pixel centres by theta: several times
    the memory traffic (BENCHMARKS.md)."""
    centres = [
        torch.arange(size, dtype=theta.dtype, device=theta.device).mul_(2 / size).add_(1 / size - 1)
        for size in (w, h)
    ]  # pixel centres in [-1, 1]
    xs, ys = centres[0].view(1, 1, w), centres[1].view(1, h, 1)
    grid = torch.empty(len(theta), h, w, 2, dtype=theta.dtype, device=theta.device)
    t = theta.view(-1, 2, 3, 1, 1)
    for i in range(2):
        torch.addcmul(torch.addcmul(t[:, i, 2], t[:, i, 1], ys), t[:, i, 0], xs, out=grid[..., i])
    return grid


def grayscale(x):
    r, g, b = x.unbind(1)
    return torch.add(r * 0.2989, g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def blend(x, other, factor):
    """torchvision's _blend: factor * x + (1 - factor) * other, clamped to [0, 1]; per sample."""
    factor = factor.view(-1, 1, 1, 1)
    return torch.addcmul((1 - factor) * other, factor, x).clamp_(0, 1)


def adjust_hue(x, shift):
    """torchvision's adjust_hue: rotate the HSV hue by `shift` (a fraction of the circle)."""
    minc, maxc = torch.aminmax(x, dim=1)
    chroma = maxc - minc
    divisor = torch.where(chroma == 0, 1.0, chroma)
    rc, gc, bc = ((maxc.unsqueeze(1) - x) / divisor.unsqueeze(1)).unbind(1)
    r, g, _ = x.unbind(1)
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.add(shift.view(-1, 1, 1), h, alpha=1 / 6).remainder_(1.0)
    # Back to RGB with V = max and V*S = chroma: channel n gets V - chroma*clamp(min(k, 4-k), 0, 1)
    # with k = (5, 3, 1)[n] + 6h mod 6. (arange, not a tensor from a list: that copy would wait.)
    offsets = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)
    k = torch.add(offsets, h.unsqueeze(1), alpha=6).remainder_(6.0)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


def color_jitter(x, brightness, contrast, saturation, hue, order=(0, 1, 2, 3)):
    """torchvision's ColorJitter with given factors, one per sample, its four ops in `order`."""
    for op in order:
        if op == 0:
            x = (x * brightness.view(-1, 1, 1, 1)).clamp_(0, 1)
        elif op == 1:
            x = blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), contrast)
        elif op == 2:
            x = blend(x, grayscale(x), saturation)
        else:
            x = adjust_hue(x, hue)
    return x


def blur_kernels(sigma):
    """torchvision's 3-tap Gaussian kernels, one row per sigma: [e, 1, e] / (1 + 2e) with
    e = exp(-1 / (2 sigma^2))."""
    e = torch.exp(-0.5 / sigma.double() ** 2)
    return (torch.stack([e, torch.ones_like(e), e], 1) / (1 + 2 * e).unsqueeze(1)).float()


def gaussian_blur3(x, kernels):
    """torchvision's 3x3 Gaussian blur (reflected borders), one kernel per sample (see
    blur_kernels): one depthwise convolution of the whole batch, each image and channel its own
    group."""
    n, c, h, w = x.shape
    weight = (kernels[:, :, None] * kernels[:, None, :]).repeat_interleave(c, 0).unsqueeze(1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    return torch.nn.functional.conv2d(
        padded.reshape(1, n * c, h + 2, w + 2), weight, groups=n * c
    ).view(n, c, h, w)


class BatchPreprocess(torch.nn.Module):
    """uint8 NxHxWx3 batch on the device -> (augmented) normalised float NCHW, channels_last, the
    layout the convolutions want: the normalisation writes it in the same pass."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment=None):
        super().__init__()
        std = torch.tensor(std).view(1, 3, 1, 1)
        self.register_buffer("scale", 1 / std, persistent=False)
        self.register_buffer("shift", -torch.tensor(mean).view(1, 3, 1, 1) / std, persistent=False)
        self.augment = augment
        self.size = None  # a side to resample the batch to (--progressive), else the cache's

    @torch.no_grad()
    def forward(self, images):
        x = images.permute(0, 3, 1, 2).float().div_(255)
        if self.size and self.size != x.shape[-1]:
            # Antialiased, as the cache's own resize: a smaller side is the photo, not aliases.
            x = torch.nn.functional.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )

        if self.augment is not None:
            x = self.augment(x)
        out = torch.empty(x.shape, device=x.device, memory_format=torch.channels_last)
        return torch.addcmul(self.shift, x, self.scale, out=out)  # (x - mean) / std


class MixUpCutMix:
    """MixUp and CutMix of a normalised batch on its device, as torchvision.transforms.v2's
    MixUp and CutMix but per sample: each image draws its own lambda ~ Beta(alpha, alpha), box
    and, with both on, which of the two (p 0.5); torchvision draws once per batch (timm's "batch"
    mode, this is its "elem" mode). Image i is mixed with image i - 1 (the batch rolled by one,
    as torchvision pairs them). MixUp blends the two images; CutMix pastes a box of the partner,
    centred uniformly in the image and clipped to it, of sides sqrt(1 - lambda) times the
    image's, then takes lambda as the share of the image left. The targets are the one-hot labels
    mixed by the same lambdas; the loss's label smoothing applies on top, as with torchvision's
    transforms before CrossEntropyLoss(label_smoothing=...). Parameters are drawn on the host
    from this object's own generator (reseeded each epoch), like DeviceAugment's."""

    def __init__(self, mixup=0.0, cutmix=0.0, num_classes=2, seed=0):
        self.mixup, self.cutmix, self.num_classes = mixup, cutmix, num_classes
        self.generator = torch.Generator()
        self.reseed(seed)

    reseed = DeviceAugment.reseed

    def sample(self, n, h, w):
        """The parameters of n images of h x w, as host tensors."""
        g = self.generator
        cut = torch.rand(n, generator=g, dtype=torch.float64) < 0.5
        if not (self.mixup and self.cutmix):  # one of them: every image takes it
            cut = torch.full((n,), bool(self.cutmix))
        alphas = torch.where(cut, self.cutmix, self.mixup).double()
        gamma = torch._standard_gamma  # Beta(a, a) = X / (X + Y) with X, Y ~ Gamma(a)
        a, b = gamma(alphas, generator=g), gamma(alphas, generator=g)
        lam = a / (a + b)
        centre_x = torch.randint(w, (n,), generator=g)
        centre_y = torch.randint(h, (n,), generator=g)
        half = 0.5 * torch.sqrt(1 - lam)
        half_w, half_h = (half * w).long(), (half * h).long()  # int() of torchvision's
        x1, x2 = (centre_x - half_w).clamp(min=0), (centre_x + half_w).clamp(max=w)
        y1, y2 = (centre_y - half_h).clamp(min=0), (centre_y + half_h).clamp(max=h)
        area = ((x2 - x1) * (y2 - y1)).double()
        return {
            "lam": torch.where(cut, 1 - area / (h * w), lam),  # the share of image i kept
            "cut": cut,
            "box": torch.stack([x1, y1, x2, y2], 1),
            "drawn": lam,  # the Beta draws, before CutMix's box made them exact
            "centre": torch.stack([centre_x, centre_y], 1),
        }

    @torch.no_grad()
    def __call__(self, x, labels, params=None):
        """(mixed images, mixed one-hot targets) of a batch and its class indices."""
        n, _, h, w = x.shape
        p = self.sample(n, h, w) if params is None else params
        lam, cut, box = host_to_device([p["lam"].float(), p["cut"], p["box"]], x.device)
        partner = x.roll(1, 0)
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        rows = (ys >= box[:, 1, None, None]) & (ys < box[:, 3, None, None])
        columns = (xs >= box[:, 0, None, None]) & (xs < box[:, 2, None, None])
        pasted = torch.where((rows & columns).unsqueeze(1), partner, x)
        blended = torch.lerp(partner, x, lam.view(-1, 1, 1, 1))
        mixed = torch.where(cut.view(-1, 1, 1, 1), pasted, blended)
        one_hot = torch.nn.functional.one_hot(labels, self.num_classes).float()
        targets = torch.lerp(one_hot.roll(1, 0), one_hot, lam.view(-1, 1))
        return mixed.contiguous(memory_format=torch.channels_last), targets
