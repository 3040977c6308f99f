"""What the scripts share: logging, distributed helpers, stop requests (SIGTERM, SIGUSR1) and
locks, atomic files and checkpoint I/O, seeding and random state, devices. It imports nothing of
this project's: every other module may use it."""

import csv
import fcntl
import math
import os
import random
import shutil
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINT_DIR = "checkpoints"


def log(*parts):
    """Messages go to standard error (standard output is for results), from one process only."""
    if is_main_process():
        print(*parts, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- distributed


def init_distributed(device_name):
    """Join the process group when torchrun started this process: NCCL on CUDA, gloo on the CPU.
    Returns (rank, local rank, world size); (0, 0, 1) for a plain run."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    # Long enough for the first process of each machine to build a large cache while others wait.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=3))
    return rank, local_rank, world


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


@contextmanager
def local_main_first(local_rank):
    """The block runs on each machine's first process first (building the cache, writing the demo
    data), then on the others, which find the work done. If the first fails, torchrun ends them
    all."""
    if dist.is_initialized() and local_rank != 0:
        dist.barrier()
    yield
    if dist.is_initialized() and local_rank == 0:
        dist.barrier()


def broadcast_buffers(module):
    """Every process takes the first one's buffers (batch norm statistics): those it saves."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def totals_dtype(device):
    """The dtype to add up an epoch's losses and counts in on `device`: float64, except on Apple's
    MPS, which has none (float32 counts exactly up to 2**24)."""
    return torch.float32 if device.type == "mps" else torch.float64


def sum_over_processes(*values):
    """Each value (tensor or number) summed over all processes, as Python floats."""
    device = next((v.device for v in values if torch.is_tensor(v)), torch.device("cpu"))
    total = torch.stack(
        [torch.as_tensor(v, device=device).to(totals_dtype(device)) for v in values]
    )
    if dist.is_initialized():
        dist.all_reduce(total)
    return total.tolist()


def gather_from_processes(obj):
    """A list of every process's obj, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- stopping and locks

EXIT_PREEMPTED = 75  # sysexits.h's EX_TEMPFAIL: stopped on request; resubmit with --resume


class StopRequest:
    """SIGTERM or SIGUSR1, what SLURM, Kubernetes and spot instances send before they kill a job,
    asks the run to stop at its next step. The handler only notes it, so a second signal, or one
    during a save, changes nothing. Under torchrun one process receiving it is enough: requested()
    is agreed by every process, through an all-reduce of one number on a gloo group of its own
    (the GPU never waits for it)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._note) for number in self.SIGNALS}
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None

    def _note(self, number, frame):
        self.signal = self.signal or number

    def requested(self):
        """True on every process once any has been signalled (a collective under torchrun)."""
        if self.group is None:
            return self.signal is not None
        flag = torch.tensor([self.signal or 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.signal = self.signal or int(flag) or None
        return self.signal is not None

    def name(self):
        return signal.Signals(self.signal).name if self.signal else "nothing"

    def close(self):
        """The handlers as they were before."""
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def barrier(self):
        """Every process waits here for the others (after the first has written a checkpoint,
        before any exits): on the gloo group, so the GPU does not."""
        if self.group is not None:
            dist.barrier(group=self.group)


@contextmanager
def exclusive(path, what, wait=False):
    """Hold an exclusive lock on the file `path` (made if missing) for the block. Another process
    holding it makes this raise SystemExit naming it, or with wait, wait for it. The kernel drops
    the lock with the process however it ends, kill -9 included, so none is ever left stale."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise SystemExit(f"{what} is in use by {holder} (lock {path})") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------------- files and checkpoints


@contextmanager
def atomic_file(path, mode="wb", **open_kwargs):
    """A temporary file beside `path`, open for writing, that becomes `path` (flushed and synced to
    disk) only when the block ends without an error: a crash never leaves a half-written file, and
    a failed write keeps what was there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(state, path):
    with atomic_file(path) as f:
        torch.save(state, f)


def save_checkpoints(state, paths):
    """One state under several names, serialised once: the first file written, the others copies
    of it (no second pickling, no second copy of the tensors off the GPU). Copies, not hard links:
    a file rewritten in place later changes only itself. Each file is written atomically, and
    one that cannot be (a full disk) does not stop the others: returns {path: OSError}."""
    written, failed = None, {}
    for path in map(Path, paths):
        try:
            if written is None:
                save_checkpoint(state, path)
                written = path
            else:
                with atomic_file(path) as f, open(written, "rb") as source:
                    shutil.copyfileobj(source, f)
        except OSError as error:
            failed[path] = error
    return failed


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint of this project. weights_only=True: a file that would run code is refused."""
    path = resolve_checkpoint(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise SystemExit(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from None


def resolve_checkpoint(path):
    """A bare name such as best.pt that is not a file means checkpoints/best.pt."""
    path = Path(path)
    if not path.exists() and len(path.parts) == 1 and (Path(CHECKPOINT_DIR) / path).exists():
        return Path(CHECKPOINT_DIR) / path
    if not path.exists():
        raise SystemExit(f"no checkpoint {path}")
    return path


def full_history(ckpt_path, state):
    """The whole run's per-epoch records. A checkpoint holds the history up to its own epoch
    (best.pt stops at the best one); history.csv beside it goes on to the run's last epoch."""
    history = state["history"]
    path = Path(ckpt_path).parent / "history.csv"
    if not path.is_file():
        return history
    with open(path, newline="") as f:
        rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    same_run = len(rows) >= len(history) and all(
        (r["phase"], r["epoch"]) == (h["phase"], h["epoch"])
        and math.isclose(r["val_acc"], h["val_acc"])
        for r, h in zip(rows, history)
    )
    return rows if same_run else history


def _number(text):
    if text == "":  # a column an earlier epoch did not have (--ema added on --resume, say)
        return math.nan
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def write_history_csv(history, path):
    if not history:
        return
    with atomic_file(path, "w", newline="") as f:
        # Every column any epoch has: a resumed run may add some (--ema).
        columns = list(dict.fromkeys(key for record in history for key in record))
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


# ----------------------------------------------------------------------------- randomness


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def rng_state():
    """torch's global generators: what draws from them (initialisation, dropout) resumes exactly."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- devices


def pick_device(name="auto", local_rank=0):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (use --device cpu)")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def amp_dtype(amp, device):
    """The autocast dtype, or None. Mixed precision runs on CUDA; the CPU computes in float32."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise SystemExit("--amp bf16: this GPU has no bfloat16 support (use --amp fp16)")
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
