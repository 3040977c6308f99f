import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import make_dataset, write_image


def test_classes_in_numeric_order_hidden_folders_ignored(tmp_path):
    for name in [str(i) for i in range(12)] + [".ipynb_checkpoints", "__MACOSX"]:
        (tmp_path / "train" / name).mkdir(parents=True)
    (tmp_path / "train" / "notes.txt").write_text("not a class")
    assert data.find_classes(tmp_path / "train") == [str(i) for i in range(12)]


def test_classes_in_lexicographic_order_when_not_all_integers(tmp_path):
    for name in ["b", "10", "a", "2"]:
        (tmp_path / "train" / name).mkdir(parents=True)
    assert data.find_classes(tmp_path / "train") == ["10", "2", "a", "b"]


def test_labels_follow_class_order_not_folder_listing(tmp_path):
    classes = [str(i) for i in range(12)]
    files = ["10/a.png", "2/b.png", "0/c.png"]
    assert data.labels_of(files, classes).tolist() == [10, 2, 0]


def test_non_image_files_and_hidden_files_are_ignored(tmp_path):
    write_image(tmp_path / "train" / "a" / "x.png", (1, 2, 3))
    (tmp_path / "train" / "a" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "train" / "a" / "readme.txt").write_text("hi")
    (tmp_path / "train" / "a" / "paper.pdf").write_bytes(b"%PDF-1.4")  # Pillow writes PDFs, never reads them
    write_image(tmp_path / "train" / "a" / "._x.png", (1, 2, 3))
    assert data.list_labelled_images(tmp_path / "train", ["a"]) == ["a/x.png"]


def test_val_class_missing_from_train_is_an_error_naming_it(tmp_path):
    root = make_dataset(tmp_path, classes=("a", "b"))
    write_image(root / "val" / "zebra" / "1.png", (9, 9, 9))
    with pytest.raises(SystemExit, match="zebra"):
        data.load_splits(root, 8)


def test_preprocessing_crops_the_centre_square_then_resizes(tmp_path):
    # 90x30: red | green | blue thirds. The centre square is the green third alone.
    pixels = np.zeros((30, 90, 3), np.uint8)
    pixels[:, :30] = (255, 0, 0)
    pixels[:, 30:60] = (0, 255, 0)
    pixels[:, 60:] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    out = data.load_image(tmp_path / "wide.png", 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out == (0, 255, 0)).all()

    # A tall grey image, RGB output, with a vertical gradient kept top to bottom.
    tall = np.tile(np.linspace(0, 255, 60).astype(np.uint8)[:, None], (1, 20))
    Image.fromarray(tall, mode="L").save(tmp_path / "tall.png")
    out = data.load_image(tmp_path / "tall.png", 10)
    assert out.shape == (10, 10, 3)
    column = out[:, 5, 0].astype(int)
    assert (np.diff(column) > 0).all() and 85 < column.mean() < 170  # the middle rows only


def test_preprocessing_applies_exif_orientation(tmp_path):
    # Stored 40x20, left half black; orientation 6 shows it rotated 90 degrees clockwise,
    # so the black half comes out on top.
    pixels = np.full((20, 40, 3), 255, np.uint8)
    pixels[:, :20] = 0
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = data.load_image(tmp_path / "rot.jpg", 8).astype(int)
    assert out[:3].mean() < 40 and out[5:].mean() > 215


def test_cache_is_reused_and_rebuilt_when_files_change(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=3)
    decoded = []
    original = data.load_image
    monkeypatch.setattr(data, "load_image", lambda p, s: decoded.append(p) or original(p, s))

    def build():
        files = data.list_labelled_images(root / "train", ["a", "b"])
        return data.build_cache(root / "train", files, 12, tmp_path / "cache")

    first = build()
    assert len(decoded) == 6 and len(first) == 6
    pixels = np.array(first.open())
    decoded.clear()
    again = build()
    assert decoded == [] and again.pixels_path == first.pixels_path
    assert np.array_equal(np.array(again.open()), pixels)

    write_image(root / "train" / "a" / "new.png", (5, 5, 5))  # added
    assert len(build()) == 7 and len(decoded) == 7
    decoded.clear()
    os.remove(root / "train" / "b" / "000.png")  # removed
    assert len(build()) == 6 and len(decoded) == 6
    decoded.clear()
    target = root / "train" / "a" / "001.png"  # changed in place
    write_image(target, (250, 250, 250), seed=99)
    os.utime(target, ns=(1, 10**18))
    cache = build()
    assert len(decoded) == 6
    row = cache.files.index("a/001.png")
    assert np.array_equal(cache.open()[row], data.load_image(target, 12))
    # Only the current cache is left on disk.
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".u8"]


def test_truncated_cache_is_rebuilt(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("a",), per_class=3)
    files = data.list_labelled_images(root / "train", ["a"])
    cache = data.build_cache(root / "train", files, 8, tmp_path / "c")
    good = np.array(cache.open())
    with open(cache.pixels_path, "r+b") as f:
        f.truncate(100)
    again = data.build_cache(root / "train", files, 8, tmp_path / "c")
    assert np.array_equal(np.array(again.open()), good)


def test_unreadable_image_is_skipped_with_a_warning_naming_it(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=3)
    (root / "train" / "b" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        splits = data.load_splits(root, 8, tmp_path / "c")
    assert splits.skipped == 1 and len(splits.train) == 6
    assert splits.train.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_stratified_split_without_val_folder(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("a", "b", "c"), per_class=10, val_per_class=0)
    (root / "train" / "a" / "broken.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="broken.png"):
        splits = data.load_splits(root, 8, tmp_path / "c", val_fraction=0.2, seed=3)
    assert splits.skipped == 1  # one file, counted once though train and val share its folder
    val_labels = splits.val.labels[splits.val.indices]
    assert len(splits.val) == 6 and np.bincount(val_labels).tolist() == [2, 2, 2]
    assert not set(splits.train.indices) & set(splits.val.indices)
    with pytest.warns(UserWarning, match="broken.png"):  # each run names it again
        again = data.load_splits(root, 8, tmp_path / "c", val_fraction=0.2, seed=3)
    assert np.array_equal(again.val.indices, splits.val.indices)


def test_loader_yields_uint8_batches_in_a_seeded_order(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=5)
    splits = data.load_splits(root, 8, tmp_path / "c")
    loader = data.make_loader(splits.train, 4, shuffle=True, workers=0, seed=1)

    def order(epoch):
        data.set_epoch(loader, epoch)
        return torch.cat([labels for _, labels in loader]).tolist()

    images, labels = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (4, 8, 8, 3) and labels.dtype == torch.int64
    assert order(0) == order(0) and order(0) != order(1)


def test_preprocess_normalises_into_channels_last():
    images = torch.full((2, 4, 4, 3), 128, dtype=torch.uint8)
    x = data.BatchPreprocess()(images)
    assert x.shape == (2, 3, 4, 4) and x.is_contiguous(memory_format=torch.channels_last)
    expected = (128 / 255 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    assert torch.allclose(x[0, :, 0, 0], expected, atol=1e-6)


def test_augmentation_draws_parameters_per_sample():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 16, 16)
    out = data.DeviceAugment()(image.repeat(2, 1, 1, 1))
    assert not torch.allclose(out[0], out[1])


def only(**kwargs):
    """An augmentation with every random op off except those named."""
    off = dict(degrees=0.0, translate=0.0, scale=(1.0, 1.0), shear=0.0, p_jitter=0.0, p_blur=0.0,
               p_hflip=0.0, p_vflip=0.0)
    return data.DeviceAugment(**{**off, **kwargs})


def test_flip_rates_match_the_method():
    torch.manual_seed(0)
    n = 4000
    image = torch.rand(1, 3, 6, 6)
    out = only(p_hflip=0.3, p_vflip=0.3)(image.expand(n, -1, -1, -1).contiguous())
    h, v, hv = image.flip(3), image.flip(2), image.flip(2).flip(3)
    close = lambda ref: (out - ref).abs().amax(dim=(1, 2, 3)) < 1e-5  # noqa: E731
    rates = {k: close(ref).float().mean().item() for k, ref in
             {"none": image, "h": h, "v": v, "hv": hv}.items()}
    assert abs(rates["h"] - 0.21) < 0.03 and abs(rates["v"] - 0.21) < 0.03
    assert abs(rates["hv"] - 0.09) < 0.02 and abs(rates["none"] - 0.49) < 0.03


def changed(out, image):
    return (out - image).abs().amax(dim=(1, 2, 3)) > 1e-4


def test_affine_always_applies_jitter_and_blur_half_the_time():
    torch.manual_seed(0)
    n = 4000
    image = torch.rand(1, 3, 8, 8).expand(n, -1, -1, -1).contiguous()
    assert changed(only(degrees=10.0, translate=0.1, scale=(0.9, 1.1), shear=10.0)(image), image).all()
    jitter_rate = changed(only(p_jitter=0.5)(image), image).float().mean().item()
    blur_rate = changed(only(p_blur=0.5, blur_sigma=(0.5, 2.0))(image), image).float().mean().item()
    assert abs(jitter_rate - 0.5) < 0.03 and abs(blur_rate - 0.5) < 0.03
    draws = data.DeviceAugment().sample(n)
    rates = {k: draws[k].float().mean().item() for k in ("jitter", "blur", "hflip", "vflip")}
    assert abs(rates["jitter"] - 0.5) < 0.03 and abs(rates["blur"] - 0.5) < 0.03
    assert abs(rates["hflip"] - 0.3) < 0.03 and abs(rates["vflip"] - 0.3) < 0.03
    assert draws["angle"].abs().max() <= 10 and draws["angle"].std() > 5  # uniform on +-10: std 5.8
    assert 0.9 <= draws["scale"].min() and draws["scale"].max() <= 1.1


def test_each_augmentation_op_equals_torchvisions():
    """The batched ops reproduce torchvision's functional ops, which the method's released code uses."""
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    torch.manual_seed(0)
    x = torch.rand(2, 3, 24, 24)
    full = lambda v: torch.full((2,), float(v))  # noqa: E731
    theta = data.affine_theta(full(7), full(0.1), full(-0.05), full(1.08), full(-6))
    assert torch.allclose(data.affine_grid(theta, 24, 20),
                          torch.nn.functional.affine_grid(theta, [2, 3, 24, 20], align_corners=False), atol=1e-6)
    ours = data.affine(x, theta)
    ref = F.affine(x, angle=7.0, translate=[2.4, -1.2], scale=1.08, shear=[-6.0, 0.0],
                   interpolation=InterpolationMode.BILINEAR)
    assert torch.allclose(ours, ref, atol=1e-5)
    one, zero = full(1), full(0)
    for factors, op, ref in [((full(1.2), one, one), 0, F.adjust_brightness(x, 1.2)),
                             ((one, full(0.8), one), 1, F.adjust_contrast(x, 0.8)),
                             ((one, one, full(1.25)), 2, F.adjust_saturation(x, 1.25))]:
        assert torch.allclose(data.color_jitter(x, *factors, zero, [op]), ref, atol=1e-6)
    for shift in (-0.1, 0.03, 0.5):
        assert torch.allclose(data.adjust_hue(x, full(shift)), F.adjust_hue(x, shift), atol=1e-5)
    for sigma in (0.1, 0.8, 2.0):
        assert torch.allclose(data.gaussian_blur3(x, data.blur_kernels(full(sigma))),
                              F.gaussian_blur(x, [3, 3], [sigma, sigma]), atol=1e-6)


def torchvision_augment(image, p, i):
    """Image i of a batch augmented with parameters p by torchvision's ops, one after another in
    the method's order: affine, jitter (its ops in p's order), blur, horizontal and vertical flip."""
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    side = image.shape[-1]
    # RandomAffine.get_params: the shift drawn uniformly in +-(translate * side), rounded to whole pixels.
    shift = [int(round(p[k][i].item() * side)) for k in ("tx", "ty")]
    x = F.affine(image, angle=p["angle"][i].item(), scale=p["scale"][i].item(), shear=[p["shear"][i].item(), 0.0],
                 translate=shift, interpolation=InterpolationMode.BILINEAR)
    if p["jitter"][i]:
        ops = [(F.adjust_brightness, "brightness"), (F.adjust_contrast, "contrast"),
               (F.adjust_saturation, "saturation"), (F.adjust_hue, "hue")]
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
    augment = data.DeviceAugment(seed=3)
    x = torch.rand(16, 3, 20, 20)
    coins = ("jitter", "blur", "hflip", "vflip")
    for forced in (None, None, True, False):
        p = augment.sample(len(x))
        if forced is not None:
            p.update({k: torch.full((len(x),), forced) for k in coins})
        ours = augment(x, p)
        for i in range(len(x)):
            assert torch.allclose(ours[i], torchvision_augment(x[i], p, i), atol=2e-5), (i, p["color_order"])


def test_augmentation_draws_repeat_after_a_reseed_and_differ_between_seeds():
    augment = data.DeviceAugment()
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
    augment = data.DeviceAugment(p_jitter=1.0, p_blur=1.0)
    augment(x)
    assert torch.equal(x, kept)


def test_demo_dataset_layout(tmp_path):
    root = data.write_demo_dataset(tmp_path / "demo", size=16)
    assert data.find_classes(root / "train") == [str(i) for i in range(10)]
    tests = data.list_images(root / "test")
    answers = (root / "answers.csv").read_text().splitlines()
    assert answers[0] == "image_name,pred_label" and len(answers) - 1 == len(tests) > 200
    assert sorted(line.split(",")[0] + ".png" for line in answers[1:]) == tests
    assert not any(name[0].isdigit() and name[1] == "_" for name in tests)  # names do not leak labels
    with Image.open(root / "val" / "3" / os.listdir(root / "val" / "3")[0]) as img:
        assert img.mode == "RGB" and img.size == (16, 16)


def test_loader_worker_processes_give_the_same_batches(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=5)
    splits = data.load_splits(root, 8, tmp_path / "c")
    batches = []
    for workers in (0, 2):
        loader = data.make_loader(splits.train, 3, shuffle=True, workers=workers, seed=4)
        data.set_epoch(loader, 2)
        batches.append([(x.clone(), y.clone()) for x, y in loader])
    assert len(batches[0]) == len(batches[1]) == 4
    for (x0, y0), (x1, y1) in zip(*batches):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_making_a_loader_iterator_leaves_the_global_random_state_alone(tmp_path):
    """Else a resumed run, which makes a new iterator, would draw other augmentations."""
    root = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=3)
    splits = data.load_splits(root, 8, tmp_path / "c")
    for workers in (0, 1):
        loader = data.make_loader(splits.train, 2, shuffle=True, workers=workers, seed=1)
        torch.manual_seed(5)
        next(iter(loader))
        after = torch.rand(3)
        torch.manual_seed(5)
        assert torch.equal(after, torch.rand(3))


def test_caches_of_two_datasets_in_one_cache_dir_are_kept_apart(tmp_path):
    one = make_dataset(tmp_path / "one", classes=("a",), per_class=2)
    two = make_dataset(tmp_path / "two", classes=("a",), per_class=3, seed=7)
    first = data.load_splits(one, 8, tmp_path / "shared")
    second = data.load_splits(two, 8, tmp_path / "shared")
    assert os.path.exists(first.train.cache.pixels_path) and len(second.train) == 3
    assert np.array_equal(first.train[[0, 1]][0].numpy(), np.stack([data.load_image(one / "train" / f, 8)
                                                                     for f in first.train.cache.files]))


def bad_inputs(folder):
    """Every kind of file a real image folder turns up, and whether training can use it."""
    folder.mkdir(parents=True, exist_ok=True)
    good = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    good.save(folder / "ok.jpg", quality=90)
    jpeg = (folder / "ok.jpg").read_bytes()
    good.save(folder / "ok_png.png")
    png = (folder / "ok_png.png").read_bytes()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "random.png").write_bytes(np.random.default_rng(1).bytes(500))
    good.convert("CMYK").save(folder / "cmyk.jpg")
    good.convert("RGBA").save(folder / "rgba.png")
    good.convert("P").save(folder / "palette.png", transparency=0)
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(folder / "sixteen_bit.png")
    Image.new("RGB", (1, 1), (10, 200, 30)).save(folder / "tiny.png")
    good.save(folder / "with space ünïcødé.png")
    return {"readable": {"ok.jpg", "ok_png.png", "cmyk.jpg", "rgba.png", "palette.png", "sixteen_bit.png",
                         "tiny.png", "with space ünïcødé.png"},
            "unreadable": {"zero.jpg", "truncated.jpg", "truncated.png", "random.png"}}


def test_bad_inputs_are_skipped_by_name_and_odd_ones_read(tmp_path):
    expected = bad_inputs(tmp_path / "train" / "a")
    with pytest.warns(UserWarning) as caught:
        splits = data.load_splits(tmp_path, 8, tmp_path / "c")
    messages = " ".join(str(w.message) for w in caught)
    for name in expected["unreadable"]:
        assert name in messages
    assert splits.skipped == len(expected["unreadable"])
    cache = splits.train.cache
    assert {f.split("/", 1)[1] for f in cache.files} == expected["readable"]
    rows = dict(zip((f.split("/", 1)[1] for f in cache.files), np.array(cache.open())))
    assert 150 <= rows["sixteen_bit.png"].mean() <= 160  # 40000 / 65535 of white, not clipped to 255
    assert (rows["tiny.png"] == (10, 200, 30)).all()


def test_an_image_over_the_decompression_bomb_limit_is_skipped(tmp_path, monkeypatch):
    Image.new("RGB", (200, 200)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 200 x 200 is over twice the limit
    with pytest.warns(UserWarning, match="huge.png"):
        cache = data.build_cache(tmp_path, ["huge.png"], 8, tmp_path / "c")
    assert cache.files == [] and "DecompressionBomb" in cache.skipped["huge.png"]


def test_an_empty_class_folder_is_named_in_a_warning(tmp_path):
    write_image(tmp_path / "train" / "a" / "x.png", (1, 2, 3))
    (tmp_path / "train" / "b").mkdir()
    with pytest.warns(UserWarning, match="train/b holds no images"):
        assert data.list_labelled_images(tmp_path / "train", ["a", "b"]) == ["a/x.png"]


def loader_of_batches(n_batches, fail_at=None):
    """A stand-in loader: uint8 NHWC batches numbered by their first pixel; raises at `fail_at`."""
    for i in range(n_batches):
        if i == fail_at:
            raise OSError(f"disk error at batch {i}")
        yield torch.full((2, 4, 4, 3), i, dtype=torch.uint8), torch.tensor([i, i])


def test_batches_reach_the_device_in_order_through_the_background_thread():
    """The thread that prepares CUDA batches, run on the CPU."""
    got = [labels[0].item() for _, labels in data.on_device(list(loader_of_batches(7)), data.BatchPreprocess(),
                                                             torch.device("cpu"), background=True)]
    assert got == list(range(7))


def test_an_error_while_loading_is_raised_in_the_training_thread():
    with pytest.raises(OSError, match="disk error at batch 3"):
        for _ in data.on_device(loader_of_batches(6, fail_at=3), data.BatchPreprocess(), torch.device("cpu"),
                                background=True):
            pass


def test_stopping_early_stops_the_background_thread():
    import threading

    before = threading.active_count()
    batches = data.on_device(list(loader_of_batches(50)), data.BatchPreprocess(), torch.device("cpu"),
                             background=True, ahead=2)
    next(batches)
    batches.close()  # what a break out of the loop, or an error in the step, does
    assert threading.active_count() == before


def test_an_error_in_the_step_stops_the_background_thread_with_the_loop():
    import threading
    from contextlib import closing

    before = threading.active_count()
    with pytest.raises(ZeroDivisionError):
        with closing(data.on_device(list(loader_of_batches(50)), data.BatchPreprocess(), torch.device("cpu"),
                                    background=True)) as batches:
            for images, labels in batches:
                1 / 0  # the training step fails; the traceback still holds the generator
    assert threading.active_count() == before
