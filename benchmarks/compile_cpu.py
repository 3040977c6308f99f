"""Whether torch.compile pays on the CPU: eager and compiled training steps and prediction, in
turns in one process, their compile time, and the minutes of training after which compiling is
ahead.

    python benchmarks/compile_cpu.py                                 # resnet18 at 112 and 64 px
    python benchmarks/compile_cpu.py --modes default,max-autotune --sizes 64

Takes bench.py's images and cache (synthetic JPEGs written once into --workdir, or --images).
For each image size and phase (set up by train.phase_setup from Table 1, as train.py sets it
up): one model, run eager and compiled (torch.compile in each of --modes, after
torch.compiler.reset() and with inductor's caches empty, as a machine's first compiled run
finds them).

  compile    the seconds each first call takes beyond the next one, compiled less eager, for
             each shape a run meets: the training batch, validation's batch (twice the training
             batch, eval mode, no_grad) and its last, partial batch; in Phase II also a second
             image size (each --progressive size recompiles); and again with inductor's caches
             warm (the same machine's next run, or a resumed one), where dynamo still traces
  steps/s    training steps end to end (cache -> loader -> augmentation -> step, as train.py
             takes them) in windows of --steps steps, eager and compiled in turns with the order
             rotating; the median of the windows, and the median of each window's speed-up
  predict    images/s of prediction's loop (eval mode, no_grad, --predict-batch), eager and
             compiled in turns, and its compile time (the batch and a partial one)
  break-even the minutes of eager training after which a compiled phase has paid for its
             compile time; and what a --minutes run gains, its training time shared between the
             phases as --split's epochs (the report's 10 + 125) and their step times share it

The tables go to standard output, progress to standard error.
"""

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench  # noqa: E402  (also puts the repository on sys.path)
import data  # noqa: E402
from twophase.augment import BatchPreprocess  # noqa: E402
from twophase.inference import predict_logits  # noqa: E402
from twophase.loader import make_loader  # noqa: E402
from twophase.options import COMPILE_MODES  # noqa: E402
from twophase.schedule import size_step  # noqa: E402
from utils import Problem, compile_support, exits_on_problems, log  # noqa: E402

CPU = torch.device("cpu")


def get_args_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--images", default=None, help="a train/-style folder of class folders (default: synthetic)"
    )
    p.add_argument("--n", type=int, default=512, help="synthetic images")
    p.add_argument("--workdir", default="benchmarks/.work", help="synthetic images and caches")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count()), help="cache threads")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--sizes", default="112,64", help="comma-separated image sides")
    p.add_argument("--batch-size", type=int, default=72)
    p.add_argument("--predict-batch", type=int, default=256)
    p.add_argument(
        "--modes", default="default", help=f"comma-separated torch.compile modes ({COMPILE_MODES})"
    )
    p.add_argument("--phases", default="1,2", help="the training phases measured")
    p.add_argument(
        "--steps", type=int, default=3, help="training steps (predict: batches) a window"
    )
    p.add_argument("--windows", type=int, default=5, help="timed windows of each, in turns")
    p.add_argument("--minutes", type=float, default=30, help="the run the verdict is for")
    p.add_argument(
        "--split", default="10,125", help="Phase I and II epochs the run's time is shared by"
    )
    p.add_argument("--sections", default="train,predict", help="comma-separated")
    return p


# ----------------------------------------------------------------------------- timing


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def first_call_extra(fn):
    """Seconds a first call takes beyond the next one: for a compiled model at a new shape, its
    compile time; for an eager one, the first call's own set-up (oneDNN's primitives)."""
    first = seconds(fn)
    return first - seconds(fn)


def in_turns(fns, windows):
    """Each function's seconds in `windows` windows, the functions taken in turns and the order
    rotating window by window, so that the machine's drift, and going first, hit all alike."""
    times = [[] for _ in fns]
    for w in range(windows):
        order = [(w + i) % len(fns) for i in range(len(fns))]
        for i in order:
            times[i].append(seconds(fns[i]))
    return times


def speedups(eager, compiled):
    """Each window's eager seconds over the compiled seconds of the same turn."""
    return [e / c for e, c in zip(eager, compiled)]


# ----------------------------------------------------------------------------- the break-even


def break_even_minutes(eager_step, compiled_step, compile_seconds):
    """Minutes of eager training after which the compiled run, its compile time paid, is ahead;
    inf where compiled steps are not faster."""
    saved = 1 - compiled_step / eager_step  # of each eager second
    return max(compile_seconds, 0) / saved / 60 if saved > 0 else math.inf


def phase_shares(split, step_seconds):
    """Each phase's share of a run's training time: its epochs times its step time."""
    work = [epochs * step for epochs, step in zip(split, step_seconds)]
    return [w / sum(work) for w in work]


def run_gain(minutes, shares, phases, once=0.0):
    """Seconds compiling saves over a run of `minutes` of eager training (negative: costs), each
    phase's share of it sped up by its steps' speed-up, less the phases' compile time and what
    the run's first compile pays `once`."""
    saved = sum(minutes * 60 * share * (1 - 1 / p.speedup) for share, p in zip(shares, phases))
    return saved - sum(p.compile_seconds for p in phases) - once


def run_break_even(shares, phases, once=0.0):
    """Minutes of eager training after which a compiled run, all its compile time paid, is
    ahead; inf where it never is."""
    saved = sum(share * (1 - 1 / p.speedup) for share, p in zip(shares, phases))
    paid = max(sum(p.compile_seconds for p in phases) + once, 0)
    return paid / saved / 60 if saved > 0 else math.inf


# ----------------------------------------------------------------------------- measurements


@dataclass
class Compared:
    """Eager against one compile mode, in one process: rates (per second: training steps, or
    predicted images), each window's speed-up, and the compile seconds of each shape probed."""

    what: str
    mode: str
    eager_rate: float
    compiled_rate: float
    window_speedups: list
    compile: dict  # shape -> seconds, caches empty: the shapes of a run with the defaults
    warm: dict = field(default_factory=dict)  # the same, inductor's caches warm
    progressive: float | None = None  # seconds of the first other size (Phase II), caches empty

    @property
    def speedup(self):
        return statistics.median(self.window_speedups)

    @property
    def compile_seconds(self):
        return sum(self.compile.values())


def device_batch(size, batch, num_classes, seed=0):
    """A normalised channels_last batch and its labels, as training's preprocessing hands them
    over: the probes' fixed input."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    return images.contiguous(memory_format=torch.channels_last), torch.randint(
        0, num_classes, (batch,), generator=g
    )


def train_call(net, phase, batch):
    """One training step on a batch already on the device."""
    return lambda: bench.one_epoch(net, [batch], lambda x: x, phase)


def eval_call(net, batches):
    """Prediction's loop over batches already on the device, as validation runs it."""

    def run():
        for _ in predict_logits(net, batches, lambda x: x, CPU, None):
            pass

    return run


def compile_times(variants, probes):
    """{shape: compile seconds} of each compiled variant: its first calls' extra time at each
    shape, less the eager model's (variants[0]). `probes`: (shape, a call of a model)."""
    extras = [{} for _ in variants]
    for shape, call in probes:
        for net, extra in zip(variants, extras):
            extra[shape] = first_call_extra(call(net))
            log(f"  {shape}: first call {extra[shape]:+.1f} s beyond the next")
    eager = extras[0]
    return [{shape: e[shape] - eager[shape] for shape in eager} for e in extras[1:]]


def compile_setup_seconds():
    """What a process's first compile pays once, whatever it compiles (inductor's imports, its
    pool of compiling processes): the seconds of compiling and running a one-op function."""
    torch.compiler.reset()
    return seconds(lambda: torch.compile(lambda x: x.sin() + 1)(torch.ones(8)))


def compiled_variants(net, modes):
    torch.compiler.reset()  # as train.py compiles each phase anew
    return [net, *(torch.compile(net, mode=mode) for mode in modes)]


def training_probes(args, size, phase, num_classes):
    """The shapes a run's phase meets: its training batch, validation's batch and last partial
    batch, and in Phase II another size, which --progressive's sizes are."""
    val = 2 * args.batch_size
    probes = [
        (
            f"training batch {args.batch_size}",
            train_batch(size, args.batch_size, phase, num_classes),
        ),
        (f"validation batch {val}", eval_batches(size, val, num_classes)),
        (f"validation's last batch {val // 3}", eval_batches(size, val // 3, num_classes)),
    ]
    return probes


def progressive_probe(args, size, phase, num_classes):
    """Phase II's first epoch of --progressive: a smaller side, one more graph."""
    smaller = size - size_step(size)
    return (PROGRESSIVE, train_batch(smaller, args.batch_size, phase, num_classes))


PROGRESSIVE = "another size (--progressive)"


def train_batch(size, batch, phase, num_classes):
    fixed = device_batch(size, batch, num_classes)
    return lambda net: train_call(net, phase, fixed)


def eval_batches(size, batch, num_classes):
    fixed = [device_batch(size, batch, num_classes)]
    return lambda net: eval_call(net, fixed)


def measure_training(args, number, size, modes, cached):
    """Eager against each of `modes` in one phase at one size, the compiled models fresh."""
    cache, labels, classes = cached
    net = bench.untrained_model(args, len(classes), CPU)
    phase = bench.phase_of(number, args, net, CPU)
    preprocess = bench.training_preprocess(CPU)
    loader = bench.train_loader(args, cache, labels, CPU)
    variants = compiled_variants(net, modes)
    log(f"Phase {number} at {size} px: compiling")
    probes = training_probes(args, size, phase, len(classes))
    compiled = compile_times(variants, probes)

    def window(step_net):
        return lambda: bench.one_epoch(step_net, bench.Steps(loader, args.steps), preprocess, phase)

    log(f"Phase {number} at {size} px: {args.windows} windows of {args.steps} steps each")
    times = in_turns([window(v) for v in variants], args.windows)
    results = [
        Compared(
            what=f"Phase {number}, {size} px",
            mode=mode,
            eager_rate=args.steps / statistics.median(times[0]),
            compiled_rate=args.steps / statistics.median(t),
            window_speedups=speedups(times[0], t),
            compile=c,
        )
        for mode, t, c in zip(modes, times[1:], compiled)
    ]
    if number == 2:  # after the windows, which the graph of the sizes it makes would serve
        log(f"Phase {number} at {size} px: compiling another size")
        other = compile_times(variants, [progressive_probe(args, size, phase, len(classes))])
        for result, seconds_by_shape in zip(results, other):
            result.progressive = seconds_by_shape[PROGRESSIVE]
    log(f"Phase {number} at {size} px: compiling again, inductor's caches warm")
    for result, mode in zip(results, modes):
        result.warm = compile_times(compiled_variants(net, [mode]), probes)[0]
    return results


def measure_prediction(args, size, modes, cached):
    """Eager against each of `modes`: prediction's loop over the cache, in eval mode."""
    cache, labels, classes = cached
    net = bench.untrained_model(args, len(classes), CPU).eval()
    loader = make_loader(data.CachedImages(cache, labels), args.predict_batch, shuffle=False)
    preprocess = BatchPreprocess().to(CPU)
    variants = compiled_variants(net, modes)
    log(f"prediction at {size} px: compiling")
    probes = [
        (f"batch {args.predict_batch}", eval_batches(size, args.predict_batch, len(classes))),
        (
            f"last batch {args.predict_batch // 3}",
            eval_batches(size, args.predict_batch // 3, len(classes)),
        ),
    ]
    compiled = compile_times(variants, probes)

    def window(model):
        def run():
            for _ in range(args.steps):
                for _ in predict_logits(model, loader, preprocess, CPU, None):
                    pass

        return run

    log(f"prediction at {size} px: {args.windows} windows")
    times = in_turns([window(v) for v in variants], args.windows)
    images = args.steps * len(cache)
    return [
        Compared(
            what=f"prediction, {size} px",
            mode=mode,
            eager_rate=images / statistics.median(times[0]),
            compiled_rate=images / statistics.median(t),
            window_speedups=speedups(times[0], t),
            compile=c,
        )
        for mode, t, c in zip(modes, times[1:], compiled)
    ]


# ----------------------------------------------------------------------------- tables


def minutes_text(minutes):
    return "never" if math.isinf(minutes) else f"{minutes:.1f}"


def training_table(results, args, once):
    lines = [
        "| phase, size | mode | eager steps/s | compiled steps/s | speed-up (median of windows) "
        "| compile s, caches empty / warm | break-even (min of training) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        be = break_even_minutes(1 / r.eager_rate, 1 / r.compiled_rate, r.compile_seconds)
        lines.append(
            f"| {r.what} | {r.mode} | {r.eager_rate:.3f} | {r.compiled_rate:.3f} | "
            f"{r.speedup:.2f} ({', '.join(f'{s:.2f}' for s in r.window_speedups)}) | "
            f"{r.compile_seconds:.0f} / {sum(r.warm.values()):.0f} | {minutes_text(be)} |"
        )
    lines += ["", f"A process's first compile pays {once:.0f} s once, whatever it compiles.", ""]
    lines += ["Compile seconds by shape, caches empty (warm):", ""]
    for r in results:
        shapes = [f"{s} {v:.0f} ({r.warm.get(s, 0):.0f})" for s, v in r.compile.items()]
        if r.progressive is not None:
            shapes.append(f"{PROGRESSIVE} {r.progressive:.0f}")
        lines.append(f"- {r.what}, {r.mode}: {', '.join(shapes)}")
    split = [int(e) for e in args.split.split(",")]
    return [*lines, "", *run_lines(results, split, args.minutes, once)]


def run_lines(results, split, minutes, once):
    """A whole run's verdict, for each size and mode measured in both phases: its compile time
    is both phases' and the process's first compile's."""
    runs = {}
    for r in results:
        runs.setdefault((r.what.split(", ")[1], r.mode), []).append(r)
    lines = []
    for (size, mode), phases in runs.items():
        if len(phases) != 2:
            continue
        shares = phase_shares(split, [1 / p.eager_rate for p in phases])
        gain = run_gain(minutes, shares, phases, once)
        lines.append(
            f"- {size}, {mode}: a run of {minutes:g} minutes of eager training, its epochs split "
            f"{split[0]} + {split[1]} (Phase I {shares[0]:.0%} of its time): compiling "
            f"{'saves' if gain > 0 else 'costs'} {abs(gain) / 60:.1f} minutes; a compiled run is "
            f"ahead after {minutes_text(run_break_even(shares, phases, once))} minutes"
        )
    return lines


def prediction_table(results, once):
    """Prediction's rates, and its break-even, which counts the process's first compile too:
    predict.py is a process of its own."""
    lines = [
        "| size | mode | eager images/s | compiled images/s | speed-up (median of windows) "
        "| compile s, with the first compile's | break-even (images; min of prediction) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        paid = r.compile_seconds + once
        be = break_even_minutes(1 / r.eager_rate, 1 / r.compiled_rate, paid)
        images = "never" if math.isinf(be) else f"{be * 60 * r.eager_rate:.0f}"
        lines.append(
            f"| {r.what.split(', ')[1]} | {r.mode} | {r.eager_rate:.0f} | {r.compiled_rate:.0f} "
            f"| {r.speedup:.2f} ({', '.join(f'{s:.2f}' for s in r.window_speedups)}) | "
            f"{paid:.0f} | {images}; {minutes_text(be)} |"
        )
    return lines


# ----------------------------------------------------------------------------- main


def data_at(args, size):
    """(cache, labels, classes) of --n images at `size` px."""
    _, classes, _, labels, cache = bench.images_and_cache(with_args(args, size), args.n)
    return cache, labels, classes


def with_args(args, size):
    return argparse.Namespace(**{**vars(args), "img_size": size, "amp": "off"})


@contextmanager
def empty_inductor_cache():
    """Inductor's caches empty, as a machine's first compiled run finds them (warm: measured
    apart), in a folder of their own that goes afterwards."""
    folder, before = tempfile.mkdtemp(prefix="inductor-"), os.environ.get(CACHE_DIR)
    os.environ[CACHE_DIR] = folder
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CACHE_DIR, None)
        else:
            os.environ[CACHE_DIR] = before
        shutil.rmtree(folder, ignore_errors=True)


CACHE_DIR = "TORCHINDUCTOR_CACHE_DIR"


@exits_on_problems
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    modes = args.modes.split(",")
    if bad := [m for m in modes if m not in COMPILE_MODES]:
        raise Problem(f"--modes: {', '.join(bad)} is not one of {', '.join(COMPILE_MODES)}")
    if why := compile_support(CPU):
        raise Problem(f"torch.compile: {why}")
    sections = set(args.sections.split(","))
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.manual_seed(0)
    started_load = os.getloadavg()[0]  # other work on the machine: it slows compiling and steps
    # Both modes' graphs of each shape and phase are kept: more than dynamo's default limit.
    with empty_inductor_cache(), torch._dynamo.config.patch(recompile_limit=64):
        setup = compile_setup_seconds()
        log(f"a process's first compile: {setup:.0f} s")
        trained, predicted = [], []
        for size in sizes:
            sized, cached = with_args(args, size), data_at(args, size)
            if "train" in sections:
                for number in (int(p) for p in args.phases.split(",")):
                    trained += measure_training(sized, number, size, modes, cached)
            if "predict" in sections:
                predicted += measure_prediction(sized, size, modes, cached)
    print(f"`python benchmarks/compile_cpu.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    print(
        f"\n{bench.machine(CPU)}, {torch.get_num_threads()} threads; {args.arch}, batch "
        f"{args.batch_size} (prediction {args.predict_batch}), {args.n} images, float32, "
        f"{args.windows} windows of {args.steps} steps (prediction: passes) each; the machine's "
        f"load average {started_load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n"
    )
    if trained:
        print("\n".join(training_table(trained, args, setup)) + "\n")
    if predicted:
        print("\n".join(prediction_table(predicted, setup)))


if __name__ == "__main__":
    main()
