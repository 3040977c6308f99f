"""Speed of the data path, the training steps and prediction; anyone can rerun it.

    python benchmarks/bench.py                                   # CPU-sized: resnet18 at 112 px
    python benchmarks/bench.py --device cuda --arch wide_resnet50_2 --img-size 224 --n 2048

Without --images it writes N synthetic JPEGs of varied sizes (once, into --workdir). Each number
is the median of --repeats runs; the table goes to standard output, progress to standard error.
Each phase is set up by train.phase_setup from the defaults (the method's Table 1) and trained
by train.optimizer_steps, as train.py trains it.

  pipeline   images/s from files to augmented, normalised batches on the device: this project's
             cached path (memmap rows -> batch -> device augmentation) against the report's
             released code (per sample: PIL decode -> ToTensor -> square crop -> resize ->
             torchvision transforms, in DataLoader workers), same files, same run; the cached
             path's loading and augmentation apart; and the ops and memory traffic the
             augmentation asks of the device per batch (exact counts)
  train      images/s of Phase I and Phase II steps, end to end (cache -> loader -> augmentation
             -> step) and model-only (the same steps on one batch already on the device); their
             ratio is the input-bound ratio (1.0: the input pipeline costs nothing; the median of
             the ratios of runs made in turns, so that drift hits both sides alike)
  sync       host-device syncs per training step, also after resuming from a checkpoint (CUDA)
  predict    images/s of predict.py's loop
  cache      cache build time and peak memory at N and 2N images (memory must not grow with N)
"""

import argparse
import io
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402
from train import phase_setup  # noqa: E402
from twophase import augment, image_cache  # noqa: E402
from twophase.inference import predict_logits  # noqa: E402
from twophase.loader import make_loader  # noqa: E402
from twophase.loss import loss_of  # noqa: E402
from twophase.options import COMPILE_MODES  # noqa: E402
from twophase.prefetch import on_device  # noqa: E402
from twophase.resolve import resolve  # noqa: E402
from twophase.start import load_optimizer_state  # noqa: E402
from utils import amp_dtype, exits_on_problems, log, pick_device  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--images", default=None, help="a train/-style folder of class folders (default: synthetic)"
    )
    p.add_argument(
        "--n", type=int, default=512, help="synthetic images (the cache section also uses 2N)"
    )
    p.add_argument("--workdir", default="benchmarks/.work", help="synthetic images and caches")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=72)
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count()),
        help="loader processes of the released path; cache-building threads",
    )
    p.add_argument("--steps", type=int, default=6, help="training steps per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default="fp16", choices=["fp16", "bf16", "off"])
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=COMPILE_MODES,
        metavar="MODE",
        help="torch.compile the model in the train section, in this mode (as train.py "
        "--compile: reduce-overhead replays CUDA graphs, taking launches off the host)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the train section's model and batches in channels_last, as training has them "
        "(--no-channels-last: PyTorch's default layout, to measure what it gains)",
    )
    p.add_argument(
        "--cudnn-benchmark",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let cuDNN time its kernels and pick the fastest, as training does",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the train section's end-to-end steps augment (--no-augment: load and normalise only)",
    )
    p.add_argument(
        "--sections",
        default="pipeline,train,sync,predict,cache",
        help="comma-separated; sync runs on CUDA only",
    )
    return p


# ----------------------------------------------------------------------------- inputs


def synthetic_images(folder, n, classes=10):
    """n JPEGs of 240-800 px per side, smooth colour fields with noise, in class folders."""
    folder = Path(folder)
    if len(list(folder.glob("*/*.jpg"))) >= n:
        return folder
    for c in range(classes):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)

    def write(i):
        rng = np.random.default_rng(i)
        w, h = (int(v) for v in rng.integers(240, 800, 2))
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy + i / 3), np.sin(4 * (xx + yy))], -1)
        pixels = ((base + 1) * 110 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"c{i % classes}" / f"{i:06d}.jpg", quality=90)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write, range(n)))
    return folder


def images_and_cache(args, total):
    """(folder, classes, the first --n files, their labels, their cache): --images, or `total`
    synthetic JPEGs written once into --workdir."""
    folder = (
        Path(args.images) if args.images else synthetic_images(Path(args.workdir) / "images", total)
    )
    classes = data.find_classes(folder)
    files = data.list_labelled_images(folder, classes)[: args.n]
    labels = data.labels_of(files, classes)
    return (
        folder,
        classes,
        files,
        labels,
        image_cache.build_cache(
            folder, files, args.img_size, Path(args.workdir) / "cache", args.workers
        ),
    )


def train_loader(args, cache, labels, device):
    """The shuffled loader of whole batches training uses, without a partial last batch."""
    return make_loader(
        data.CachedImages(cache, labels),
        args.batch_size,
        shuffle=True,
        pin_memory=device.type == "cuda",
        drop_last=len(cache) >= args.batch_size,
    )


RECIPE = resolve([]).options  # the method's defaults: Table 1


def phase_of(number, args, net, device):
    """The method's phase `number` (Table 1), with --amp's autocast and grad scaler, set for its
    first epoch."""
    options = argparse.Namespace(**{**vars(RECIPE), "amp": args.amp})
    dtype = amp_dtype(options.amp, device)
    phase = phase_setup(number, options, net, device, loss_of(options), dtype)
    phase.set_rates(0)
    return phase


def one_epoch(net, loader, preprocess, phase):
    """The steps of one epoch, as train.py takes them: batches onto the device and augmented,
    then train.optimizer_steps."""
    device = next(net.parameters()).device
    tally = train.EpochTally()
    with closing(on_device(loader, preprocess, device)) as batches:
        for _ in train.optimizer_steps(net, batches, len(loader), phase, None, tally):
            pass
    return tally


def training_preprocess(device, augmented=True):
    """Training's preprocessing: normalisation and, unless told otherwise, the augmentation."""
    chosen = augment.DeviceAugment(augment.Augmentation.of(RECIPE)) if augmented else None
    return augment.BatchPreprocess(augment=chosen).to(device)


def untrained_model(args, num_classes, device, layout=torch.channels_last):
    """--arch with random weights on the device, in the layout training uses."""
    return M.build_model(args.arch, num_classes, "none").to(device, memory_format=layout)


class ReleasedDataset(torch.utils.data.Dataset):
    """The report's released data path: every epoch decodes and transforms each image anew."""

    def __init__(self, folder, files, labels, size):
        import torchvision.transforms as T

        self.paths = [Path(folder) / f for f in files]
        self.labels = labels
        self.size = size
        self.augment = T.Compose(
            [
                T.RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10),
                T.RandomApply([T.ColorJitter(0.25, 0.25, 0.25, 0.1)], p=0.5),
                T.RandomApply([T.GaussianBlur(3, (0.1, 2.0))], p=0.5),
                T.RandomHorizontalFlip(0.3),
                T.RandomVerticalFlip(0.3),
                T.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD),
            ]
        )

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import torchvision.transforms.functional as F

        x = F.to_tensor(Image.open(self.paths[i]).convert("RGB"))
        side = min(x.shape[1:])
        x = F.resize(F.center_crop(x, [side, side]), [self.size, self.size], antialias=True)
        return self.augment(x), int(self.labels[i])


# ----------------------------------------------------------------------------- measurements


def timed(fn, repeats):
    """Median seconds of `repeats` calls after one warm-up call, and the individual runs."""
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), runs


def timed_together(fns, repeats):
    """timed() for several functions run in turns, so that drift in the machine's speed hits all."""
    for fn in fns:
        fn()
    runs = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, runs):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [(statistics.median(r), r) for r in runs]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_pipeline(args, folder, files, labels, cache, device):
    released = torch.utils.data.DataLoader(
        ReleasedDataset(folder, files, labels, args.img_size),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    ours = make_loader(
        data.CachedImages(cache, labels), args.batch_size, True, pin_memory=device.type == "cuda"
    )
    preprocess = training_preprocess(device)

    def run_released():
        for x, _ in released:
            x.to(device, non_blocking=True)
        sync(device)

    def run_ours():
        for x, _ in ours:
            preprocess(x.to(device, non_blocking=True))
        sync(device)

    def run_loading_only():
        for x, _ in ours:
            normalise(x.to(device, non_blocking=True))
        sync(device)

    normalise = augment.BatchPreprocess().to(device)
    resident = next(iter(ours))[0].to(device)

    def run_augmentation_only():  # the same batch sizes as the loader's, last partial one included
        for rows in ours.sampler:  # make_loader's sampler yields the batches' indices
            preprocess(resident[: len(rows)])
        sync(device)

    n = len(files)
    rows = []
    for name, fn in (
        ("released code path", run_released),
        ("cached path", run_ours),
        ("cached path, loading only (no augmentation)", run_loading_only),
        ("cached path, augmentation only (batch already on the device)", run_augmentation_only),
    ):
        median, runs = timed(fn, args.repeats)
        rows.append((f"input pipeline, {name}", n / median, [n / r for r in runs]))
        log(f"{rows[-1][0]}: {n / median:.0f} images/s")
    rows.insert(2, ("  speed-up, cached / released", rows[1][1] / rows[0][1], None))
    return rows


def augmentation_device_work(args):
    """ATen ops and memory traffic the training preprocessing (augmentation and normalisation) asks
    of the device per batch: exact counts, the same on every machine. Run on the meta device, where
    ops cost nothing but are seen; host-side ops (the parameter draws) are not counted. An op is at
    least one kernel; a library op such as F.affine_grid counts as one op, with the traffic of its
    inputs and outputs only, though it runs several kernels."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    views = {
        torch.ops.aten.view.default,
        torch.ops.aten.unbind.int,
        torch.ops.aten.select.int,
        torch.ops.aten.slice.Tensor,
        torch.ops.aten.permute.default,
        torch.ops.aten.unsqueeze.default,
        torch.ops.aten.squeeze.dim,
        torch.ops.aten.expand.default,
        torch.ops.aten._unsafe_view.default,
    }

    class Count(TorchDispatchMode):
        ops, traffic = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            if outs and outs[0].device.type == "meta" and func not in views:
                ins = [
                    t
                    for t in tree_flatten((args, kwargs))[0]
                    if isinstance(t, torch.Tensor) and t.is_meta
                ]
                Count.ops += 1
                Count.traffic += sum(t.numel() * t.element_size() for t in ins + outs)
            return out

    preprocess = training_preprocess("meta")
    images = torch.zeros(
        args.batch_size, args.img_size, args.img_size, 3, dtype=torch.uint8, device="meta"
    )
    runs = 20
    with Count():
        for _ in range(runs):  # the coins differ per batch: an average
            preprocess(images)
    return [
        ("augmentation and normalisation, device ops per batch", Count.ops / runs, None),
        (
            "augmentation and normalisation, device memory traffic per batch (MB)",
            Count.traffic / runs / 1e6,
            None,
        ),
    ]


class Steps:
    """The first n batches of a loader, reloading it as often as needed (itertools.cycle would
    replay stored batches instead of loading them)."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def __len__(self):
        return self.n

    def __iter__(self):
        return itertools.islice(
            itertools.chain.from_iterable(iter(lambda: self.loader, None)), self.n
        )


def bench_train(args, cache, labels, num_classes, device):
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    net = untrained_model(args, num_classes, device, layout)
    prepare = training_preprocess(device, args.augment)
    # The batches too: a convolution runs channels_last when either its input or its weight is.
    preprocess = prepare if args.channels_last else (lambda x: prepare(x).contiguous())
    loader = train_loader(args, cache, labels, device)
    images, targets = next(iter(loader))
    fixed = preprocess(images.to(device)), targets.to(device)
    rows = []
    for number in (1, 2):
        phase = phase_of(number, args, net, device)
        if args.compile:
            torch.compiler.reset()
        step_net = torch.compile(net, mode=args.compile) if args.compile else net

        def steps(batches, preprocess):
            one_epoch(step_net, batches, preprocess, phase)

        def end_to_end():
            steps(Steps(loader, args.steps), preprocess)

        def model_only():
            steps([fixed] * args.steps, lambda x: x)

        n = args.steps * args.batch_size
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        (e2e, e2e_runs), (alone, alone_runs) = timed_together(
            [end_to_end, model_only], args.repeats
        )
        rows.append((f"Phase {number} training, end to end", n / e2e, [n / r for r in e2e_runs]))
        rows.append(
            (f"Phase {number} training, model only", n / alone, [n / r for r in alone_runs])
        )
        # Each end-to-end run against the model-only run made next to it: drift hits both alike.
        ratio = statistics.median(e / a for e, a in zip(e2e_runs, alone_runs))
        rows.append(
            (
                f"  input-bound ratio, Phase {number}",
                ratio,
                [r / a for r, a in zip(e2e_runs, alone_runs)],
            )
        )
        if device.type == "cuda":
            rows.append(
                (
                    f"  peak device memory, Phase {number} (GiB)",
                    torch.cuda.max_memory_allocated() / 2**30,
                    None,
                )
            )
        log(f"Phase {number}: {n / e2e:.0f} images/s end to end, {n / alone:.0f} model only")
    return rows


def count_syncs(args, cache, labels, num_classes, device):
    """Host-device synchronisations per training step, as CUDA's sync debug mode reports them."""
    import warnings

    net = untrained_model(args, num_classes, device)
    preprocess = training_preprocess(device)
    loader = train_loader(args, cache, labels, device)
    rows = []
    for number in (1, 2):
        phase = phase_of(number, args, net, device)
        one_epoch(net, Steps(loader, 4), preprocess, phase)

        def syncs(steps):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    one_epoch(net, Steps(loader, steps), preprocess, phase)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            return [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]

        def per_step(name):
            # Epochs of 4 and 8 steps: the difference leaves out the syncs each epoch makes once
            # (its totals), which don't grow with its length.
            short, long = syncs(4), syncs(8)
            rows.append((f"  host syncs per step, {name}", (len(long) - len(short)) / 4, None))
            log(f"{name}: {len(short)} syncs in an epoch of 4 steps, {len(long)} in one of 8")

        per_step(f"Phase {number}")
        if number == 2:  # the optimizer's state through a checkpoint file, as --resume loads it
            saved = io.BytesIO()
            torch.save(phase.optimizer.state_dict(), saved)
            saved.seek(0)
            load_optimizer_state(
                phase.optimizer, torch.load(saved, map_location="cpu", weights_only=True)
            )
            per_step("Phase 2 after resuming from a checkpoint")
    return rows


def bench_predict(args, cache, labels, num_classes, device):
    net = untrained_model(args, num_classes, device).eval()
    loader = make_loader(
        data.CachedImages(cache, labels),
        2 * args.batch_size,
        False,
        pin_memory=device.type == "cuda",
    )
    preprocess = augment.BatchPreprocess().to(device)
    dtype = amp_dtype(args.amp, device)

    def run():
        for _ in predict_logits(net, loader, preprocess, device, dtype):
            pass

    median, runs = timed(run, args.repeats)
    log(f"predict: {len(cache) / median:.0f} images/s")
    return [("predict", len(cache) / median, [len(cache) / r for r in runs])]


CACHE_PROBE = """
import json, sys, time
sys.path.insert(0, {repo!r})
import data
from twophase import image_cache

def memory_mb(field):  # VmHWM (peak) starts anew at exec, unlike ru_maxrss, which a child inherits
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) / 1024

files = data.list_labelled_images({folder!r}, data.find_classes({folder!r}))[:{n}]
before = memory_mb("VmRSS:")
start = time.perf_counter()
image_cache.build_cache({folder!r}, files, {size}, {cache_dir!r}, {workers})
print(json.dumps({{"seconds": time.perf_counter() - start, "peak_mb": memory_mb("VmHWM:"),
                  "growth_mb": memory_mb("VmHWM:") - before}}))
"""


def bench_cache(args, folder, n):
    rows = []
    for count in (n, 2 * n):
        cache_dir = Path(args.workdir) / f"cache-probe-{count}-{time.time_ns()}"
        code = CACHE_PROBE.format(
            repo=str(REPO),
            folder=str(folder),
            n=count,
            size=args.img_size,
            cache_dir=str(cache_dir),
            workers=args.workers,
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        for f in cache_dir.iterdir():
            f.unlink()
        cache_dir.rmdir()
        rows.append((f"cache build, {count} images (images/s)", count / result["seconds"], None))
        rows.append(
            (f"cache build, {count} images, peak host memory (MiB)", result["peak_mb"], None)
        )
        rows.append(
            (
                f"cache build, {count} images, memory growth while building (MiB)",
                result["growth_mb"],
                None,
            )
        )
        log(f"cache of {count}: {result['seconds']:.1f} s, peak {result['peak_mb']:.0f} MiB")
    return rows


# ----------------------------------------------------------------------------- main


def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}"


@exits_on_problems
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    sections = set(args.sections.split(","))
    total = 2 * args.n if "cache" in sections else args.n
    folder, classes, files, labels, cache = images_and_cache(args, total)
    torch.manual_seed(0)

    rows = []
    if "pipeline" in sections:
        rows += bench_pipeline(args, folder, files, labels, cache, device)
        rows += augmentation_device_work(args)
    if "train" in sections:
        rows += bench_train(args, cache, labels, len(classes), device)
    if "sync" in sections and device.type == "cuda":
        rows += count_syncs(args, cache, labels, len(classes), device)
    if "predict" in sections:
        rows += bench_predict(args, cache, labels, len(classes), device)
    if "cache" in sections:
        rows += bench_cache(args, folder, args.n)
    rows.append(
        (
            "peak host memory of this process (MiB)",
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            None,
        )
    )

    print(
        f"`python benchmarks/bench.py {' '.join(sys.argv[1:] if argv is None else argv)}`".replace(
            " `", "`"
        )
    )
    print(
        f"\n{machine(device)}; {args.arch} at {args.img_size} px, batch {args.batch_size}, "
        f"{len(files)} images, amp {amp_dtype(args.amp, device) or 'off'}, "
        f"median of {args.repeats}\n"
    )
    print("| measurement | median | runs |")
    print("| --- | ---: | --- |")
    for name, value, runs in rows:
        shown = ", ".join(f"{r:.2f}" if value < 10 else f"{r:.0f}" for r in runs) if runs else ""
        print(
            f"| {name} | {value:.2f} | {shown} |"
            if value < 10
            else f"| {name} | {value:.0f} | {shown} |"
        )


if __name__ == "__main__":
    main()
