"""Checks of the CUDA input path that a CPU-only test suite cannot make; prints PASSED or FAILED.

    python benchmarks/check_cuda_pipeline.py

1. Batches prepared by the background thread on its side stream equal those prepared in the
   training thread (same seed), batch after batch, while the GPU is busy with other work.
2. The same seed gives the same augmentation on the CPU and on CUDA (the parameters are drawn on
   the host), up to floating-point differences.
3. Preparing batches never makes the host wait for the device (CUDA's sync debug mode, set to
   raise, is on while the batches are prepared, in the background thread and in the training
   thread). Batches of one image are among them, so empty selections are copied too.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from twophase import (
    augment,  # noqa: E402
    prefetch,  # noqa: E402
)
from utils import exits_on_problems  # noqa: E402


def batches(sizes=(24, 24, 1, 24, 2, 1, 24, 1), side=64):
    """Batches of 1 and 2 among them: those often have no image to jitter or blur."""
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=g).pin_memory(),
            torch.arange(n),
        )
        for n in sizes
    ]


def prepared(loader, device, background, seed=1, busy=None):
    preprocess = augment.BatchPreprocess(augment=augment.DeviceAugment(seed=seed)).to(device)
    out = []
    for x, y in prefetch.on_device(loader, preprocess, device, background=background):
        if busy is not None:
            busy @ busy  # the training stream has work queued while the next batch is prepared
        out.append((x.cpu(), y.cpu()))
    return out


def sync_while_preparing(loader, device, background):
    """The error CUDA's sync debug mode raises while batches are prepared, or None."""
    preprocess = augment.BatchPreprocess(augment=augment.DeviceAugment()).to(device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    kept = []
    try:
        for x, _ in prefetch.on_device(loader, preprocess, device, background=background):
            kept.append(x.sum())  # no .cpu() here: that would be the check's own sync
        return None
    except RuntimeError as error:
        return error
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def check(name, ok):
    print(f"{'PASSED' if ok else 'FAILED'}: {name}", flush=True)
    return ok


@exits_on_problems
def main():
    cuda = torch.device("cuda")
    loader = batches()
    busy = torch.randn(4096, 4096, device=cuda)
    ok = True
    threaded = prepared(loader, cuda, background=True, busy=busy)
    inline = prepared(loader, cuda, background=False)
    ok &= check(
        "background thread and training thread give the same batches",
        len(threaded) == len(inline)
        and all(
            torch.allclose(a, b, atol=1e-5) and torch.equal(la, lb)
            for (a, la), (b, lb) in zip(threaded, inline)
        ),
    )
    on_cpu = prepared([(x.clone(), y) for x, y in loader], torch.device("cpu"), background=False)
    worst = max((a - b).abs().max().item() for (a, _), (b, _) in zip(threaded, on_cpu))
    ok &= check(
        f"CPU and CUDA augment alike (largest difference {worst:.2e} in normalised units)",
        worst < 1e-3,
    )
    for background in (True, False):
        synced = sync_while_preparing(loader, cuda, background)
        ok &= check(
            f"no host-device sync while preparing batches, background={background}"
            + (f" ({synced})" if synced else ""),
            synced is None,
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
