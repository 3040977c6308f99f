"""Where an end-to-end training step's time goes, per phase, from a PyTorch profiler trace.

    python benchmarks/profile_train.py --device cuda --arch wide_resnet50_2 --img-size 224 --n 1024

Takes bench.py's options (the same synthetic images and cache). For each phase it runs --steps
end-to-end steps twice to warm up, then once under the profiler, and prints: wall time per step;
how much of it each CUDA stream was busy (the training stream should be busy nearly all the
time); the training stream's idle gaps; the host time of each thread (the training thread queues
the model's work, autograd's thread the backward pass; the thread that prepares batches is not
seen by the profiler); and the kernels that took longest.
--trace DIR keeps the traces (open them in chrome://tracing or Perfetto).

The profiler adds time to every op it records, so a profiled step is much slower than a real one
(BENCHMARKS.md), and many small ops look costlier than they are: compare a change's real effect
with bench.py. Kernel times are exact.
"""

import collections
import gzip
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench  # noqa: E402  (also puts the repository on sys.path)
from utils import amp_dtype, exits_on_problems, pick_device  # noqa: E402


def union_length(intervals):
    """Total length covered by (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def gaps(intervals, at_least):
    """Idle stretches of at least `at_least` between the intervals, as lengths."""
    out, reach = [], None
    for start, end in sorted(intervals):
        if reach is not None and start - reach >= at_least:
            out.append(start - reach)
        reach = end if reach is None else max(reach, end)
    return out


def summarise(events, wall_us, steps, main_tid):
    """Lines describing a trace's device and host time."""
    lines = [f"wall {wall_us / 1e3 / steps:.2f} ms per step ({steps} steps)"]
    device = [
        e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e
    ]
    by_stream = collections.defaultdict(list)
    for e in device:
        by_stream[e["args"].get("stream")].append((e["ts"], e["ts"] + e["dur"]))
    if device:
        everything = [iv for ivs in by_stream.values() for iv in ivs]
        lines.append(
            f"GPU busy (any stream) {union_length(everything) / wall_us:.0%} of the wall time"
        )
        training = max(by_stream, key=lambda s: union_length(by_stream[s]))
        for stream, ivs in sorted(by_stream.items(), key=lambda kv: -union_length(kv[1])):
            role = " (training)" if stream == training else ""
            lines.append(
                f"  stream {stream}{role}: busy {union_length(ivs) / wall_us:.0%}, "
                f"{len(ivs) / steps:.0f} kernels and copies per step"
            )
        idle = gaps(by_stream[training], 100)
        lines.append(
            f"  training stream idle in gaps of 0.1 ms or more: "
            f"{sum(idle) / 1e3 / steps:.2f} ms per step "
            f"({len(idle) / steps:.1f} per step; longest {max(idle, default=0) / 1e3:.2f} ms)"
        )
        copies = [e for e in device if e.get("cat") == "gpu_memcpy"]
        lines.append(f"  copies: {sum(e['dur'] for e in copies) / 1e3 / steps:.2f} ms per step")
    ops = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
    by_thread = collections.defaultdict(list)
    for e in ops:
        by_thread[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
    for tid, ivs in sorted(by_thread.items(), key=lambda kv: -union_length(kv[1])):
        role = (
            " (training thread)"
            if tid == main_tid
            else " (autograd's, which queues the backward pass)"
        )
        lines.append(
            f"host thread {tid}{role}: in PyTorch ops "
            f"{union_length(ivs) / 1e3 / steps:.2f} ms per step"
        )
    totals = collections.Counter()
    for e in device:
        totals[e["name"][:90]] += e["dur"]
    if totals:
        lines.append("longest device work, ms per step:")
        lines += [f"  {dur / 1e3 / steps:7.3f}  {name}" for name, dur in totals.most_common(12)]
    return lines


@exits_on_problems
def main(argv=None):
    p = bench.get_args_parser()
    p.description = __doc__
    p.add_argument("--trace", default=None, help="a folder to keep the traces in (gzipped)")
    p.set_defaults(steps=12)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    _, classes, _, labels, cache = bench.images_and_cache(args, args.n)
    dtype = amp_dtype(args.amp, device)
    net = bench.untrained_model(args, len(classes), device)
    preprocess = bench.training_preprocess(device, args.augment)
    loader = bench.train_loader(args, cache, labels, device)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    )
    print(
        f"{bench.machine(device)}; {args.arch} at {args.img_size} px, batch {args.batch_size}, "
        f"amp {dtype or 'off'}"
    )
    for number in (1, 2):
        phase = bench.phase_of(number, args, net, device)

        def run():
            bench.one_epoch(net, bench.Steps(loader, args.steps), preprocess, phase)

        run(), run()
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            run()
            wall = (time.perf_counter() - start) * 1e6
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"phase{number}.json"
            prof.export_chrome_trace(str(path))
            events = json.loads(path.read_text())["traceEvents"]
            print(f"\n== Phase {number}, end to end")
            print(
                "\n".join(summarise(events, wall, args.steps, threading.get_native_id())),
                flush=True,
            )
            if args.trace:
                Path(args.trace).mkdir(parents=True, exist_ok=True)
                with (
                    open(path, "rb") as f,
                    gzip.open(Path(args.trace) / f"phase{number}.json.gz", "wb") as out,
                ):
                    shutil.copyfileobj(f, out)


if __name__ == "__main__":
    main()
