import torch

from twophase import augment
from twophase.augment import Augmentation, DeviceAugment


def test_preprocess_normalises_into_channels_last():
    images = torch.full((2, 4, 4, 3), 128, dtype=torch.uint8)
    x = augment.BatchPreprocess()(images)
    assert x.shape == (2, 3, 4, 4) and x.is_contiguous(memory_format=torch.channels_last)
    expected = (128 / 255 - torch.tensor(augment.IMAGENET_MEAN)) / torch.tensor(
        augment.IMAGENET_STD
    )
    assert torch.allclose(x[0, :, 0, 0], expected, atol=1e-6)


def test_augmentation_draws_parameters_per_sample():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 16, 16)
    out = DeviceAugment()(image.repeat(2, 1, 1, 1))
    assert not torch.allclose(out[0], out[1])


def only(**kwargs):
    """An augmentation with every random op off except those named."""
    off = dict(
        degrees=0.0,
        translate=0.0,
        scale=(1.0, 1.0),
        shear=0.0,
        p_jitter=0.0,
        p_blur=0.0,
        p_hflip=0.0,
        p_vflip=0.0,
    )
    return DeviceAugment(Augmentation(**{**off, **kwargs}))


def test_flip_rates_match_the_method():
    torch.manual_seed(0)
    n = 4000
    image = torch.rand(1, 3, 6, 6)
    out = only(p_hflip=0.3, p_vflip=0.3)(image.expand(n, -1, -1, -1).contiguous())
    h, v, hv = image.flip(3), image.flip(2), image.flip(2).flip(3)
    close = lambda ref: (out - ref).abs().amax(dim=(1, 2, 3)) < 1e-5  # noqa: E731
    rates = {
        k: close(ref).float().mean().item()
        for k, ref in {"none": image, "h": h, "v": v, "hv": hv}.items()
    }
    assert abs(rates["h"] - 0.21) < 0.03 and abs(rates["v"] - 0.21) < 0.03
    assert abs(rates["hv"] - 0.09) < 0.02 and abs(rates["none"] - 0.49) < 0.03


def changed(out, image):
    return (out - image).abs().amax(dim=(1, 2, 3)) > 1e-4


def test_affine_always_applies_jitter_and_blur_half_the_time():
    torch.manual_seed(0)
    n = 4000
    image = torch.rand(1, 3, 8, 8).expand(n, -1, -1, -1).contiguous()
    assert changed(
        only(degrees=10.0, translate=0.1, scale=(0.9, 1.1), shear=10.0)(image), image
    ).all()
    jitter_rate = changed(only(p_jitter=0.5)(image), image).float().mean().item()
    blur_rate = changed(only(p_blur=0.5, blur_sigma=(0.5, 2.0))(image), image).float().mean().item()
    assert abs(jitter_rate - 0.5) < 0.03 and abs(blur_rate - 0.5) < 0.03
    draws = DeviceAugment().sample(n)
    rates = {k: draws[k].float().mean().item() for k in ("jitter", "blur", "hflip", "vflip")}
    assert abs(rates["jitter"] - 0.5) < 0.03 and abs(rates["blur"] - 0.5) < 0.03
    assert abs(rates["hflip"] - 0.3) < 0.03 and abs(rates["vflip"] - 0.3) < 0.03
    assert draws["angle"].abs().max() <= 10 and draws["angle"].std() > 5  # uniform on +-10: std 5.8
    assert 0.9 <= draws["scale"].min() and draws["scale"].max() <= 1.1


def test_each_augmentation_op_equals_torchvisions():
    """The batched ops reproduce torchvision's functional ops, which the released code uses."""
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    torch.manual_seed(0)
    x = torch.rand(2, 3, 24, 24)
    full = lambda v: torch.full((2,), float(v))  # noqa: E731
    theta = augment.affine_theta(full(7), full(0.1), full(-0.05), full(1.08), full(-6))
    assert torch.allclose(
        augment.affine_grid(theta, 24, 20),
        torch.nn.functional.affine_grid(theta, [2, 3, 24, 20], align_corners=False),
        atol=1e-6,
    )
    ours = augment.affine(x, theta)
    ref = F.affine(
        x,
        angle=7.0,
        translate=[2.4, -1.2],
        scale=1.08,
        shear=[-6.0, 0.0],
        interpolation=InterpolationMode.BILINEAR,
    )
    assert torch.allclose(ours, ref, atol=1e-5)
    one, zero = full(1), full(0)
    for factors, op, ref in [
        ((full(1.2), one, one), 0, F.adjust_brightness(x, 1.2)),
        ((one, full(0.8), one), 1, F.adjust_contrast(x, 0.8)),
        ((one, one, full(1.25)), 2, F.adjust_saturation(x, 1.25)),
    ]:
        assert torch.allclose(augment.color_jitter(x, *factors, zero, [op]), ref, atol=1e-6)
    for shift in (-0.1, 0.03, 0.5):
        assert torch.allclose(augment.adjust_hue(x, full(shift)), F.adjust_hue(x, shift), atol=1e-5)
    for sigma in (0.1, 0.8, 2.0):
        assert torch.allclose(
            augment.gaussian_blur3(x, augment.blur_kernels(full(sigma))),
            F.gaussian_blur(x, [3, 3], [sigma, sigma]),
            atol=1e-6,
        )


def torchvision_augment(image, p, i):
    """Image i of a batch augmented with parameters p by torchvision's ops, one after another in
    the method's order: affine, jitter (its ops in p's order), blur, horizontal and vertical
    flip."""
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    side = image.shape[-1]
    # RandomAffine.get_params: the shift drawn uniformly in +-(translate * side), rounded to whole
    # pixels.
    shift = [int(round(p[k][i].item() * side)) for k in ("tx", "ty")]
    x = F.affine(
        image,
        angle=p["angle"][i].item(),
        scale=p["scale"][i].item(),
        shear=[p["shear"][i].item(), 0.0],
        translate=shift,
        interpolation=InterpolationMode.BILINEAR,
    )
    if p["jitter"][i]:
        ops = [
            (F.adjust_brightness, "brightness"),
            (F.adjust_contrast, "contrast"),
            (F.adjust_saturation, "saturation"),
            (F.adjust_hue, "hue"),
        ]
        for op in p["color_order"]:
            fn, name = ops[op]
            x = fn(x, p[name][i].item())
    if p["blur"][i]:
        x = F.gaussian_blur(x, [3, 3], [p["sigma"][i].item()] * 2)
    if p["hflip"][i]:
        x = F.horizontal_flip(x)
    if p["vflip"][i]:
        x = F.vertical_flip(x)
    return x


def test_the_whole_augmentation_equals_torchvisions_ops_applied_in_the_methods_order():
    """Flips folded into the affine's grid, jitter and blur on the chosen samples only: still the
    method's sequence, image by image, with random coins and with every coin up or down."""
    augment = DeviceAugment(seed=3)
    x = torch.rand(16, 3, 20, 20)
    coins = ("jitter", "blur", "hflip", "vflip")
    for forced in (None, None, True, False):
        p = augment.sample(len(x))
        if forced is not None:
            p.update({k: torch.full((len(x),), forced) for k in coins})
        ours = augment(x, p)
        for i in range(len(x)):
            assert torch.allclose(ours[i], torchvision_augment(x[i], p, i), atol=2e-5), (
                i,
                p["color_order"],
            )


def test_augmentation_draws_repeat_after_a_reseed_and_differ_between_seeds():
    augment = DeviceAugment()
    x = torch.rand(8, 3, 12, 12)
    augment.reseed(5)
    first = augment(x)
    augment.reseed(5)
    assert torch.equal(augment(x), first)
    augment.reseed(6)
    assert not torch.allclose(augment(x), first)


def test_the_augmentation_leaves_its_input_alone():
    """Its ops work in place on their own intermediates only: the caller's batch is not touched."""
    x = torch.rand(6, 3, 10, 10)
    kept = x.clone()
    augment = DeviceAugment(Augmentation(p_jitter=1.0, p_blur=1.0))
    augment(x)
    assert torch.equal(x, kept)


def test_mixup_and_cutmix_match_torchvisions_on_the_same_draws(monkeypatch):
    """Image by image: torchvision's MixUp or CutMix on the pair (image i - 1, image i), with
    their random draws set to the ones this image drew, gives what the batched version gives."""
    from torchvision.transforms import v2

    mix = augment.MixUpCutMix(mixup=0.4, cutmix=1.0, num_classes=5, seed=2)
    x, labels = torch.rand(8, 3, 12, 10), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    p = mix.sample(8, 12, 10)
    assert p["cut"].any() and not p["cut"].all()  # both kinds, per image
    mixed, targets = mix(x, labels, p)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    assert torch.allclose(targets[torch.arange(8), labels], p["lam"].float())
    for i in range(8):
        kind = v2.CutMix if p["cut"][i] else v2.MixUp
        reference = kind(alpha=1.0, num_classes=5)
        with monkeypatch.context() as patch:
            lam = torch.tensor([float(p["drawn"][i])])
            fixed = type("Fixed", (), {"sample": lambda self, shape, lam=lam: lam})
            patch.setattr(reference, "_dist", fixed())
            centre = iter([p["centre"][i, :1], p["centre"][i, 1:]])  # r_x, then r_y
            patch.setattr(torch, "randint", lambda *args, centre=centre, **kw: next(centre))
            ref_x, ref_targets = reference(torch.stack([x[i - 1], x[i]]), labels[[i - 1, i]])
        assert torch.allclose(mixed[i], ref_x[1], atol=1e-6), i
        assert torch.allclose(targets[i], ref_targets[1], atol=1e-6), i


def test_mixing_draws_repeat_after_a_reseed():
    mix = augment.MixUpCutMix(mixup=0.2, cutmix=0.0, num_classes=3)
    mix.reseed(0, 4, 1)
    first = mix.sample(16, 8, 8)
    mix.reseed(0, 4, 1)
    assert torch.equal(mix.sample(16, 8, 8)["lam"], first["lam"]) and not first["cut"].any()
