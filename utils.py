"""What the scripts share: logging, distributed helpers, stop requests (SIGTERM, SIGUSR1, Ctrl-C)
and locks, atomic files, seeding and random state, devices. It imports nothing of this project's:
every other module may use it.

Under torchrun every collective of a run waits --dist-timeout at most, but for the waits that may
rightly take long (LONG_WAIT: wait_for_others); a collective that fails ends the script with a
line naming the timeout and the way on (exits_on_problems).

Who writes a file that several processes could write (under torchrun, on one machine or on
several that share a filesystem):
- a run's checkpoints and history.csv: the first process of the job alone (run_folder.RunFolder),
  holding the folder's lock;
- a dataset's preprocessing cache and the demo dataset: the first process of each machine, under
  a lock beside them, so that machines sharing a filesystem take turns and the second finds the
  work done (image_cache.build_cache, data.write_demo_dataset); every file atomically
  (atomic_file)."""

import functools
import os
import random
import signal
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from filelock import FileLock, Timeout


class Problem(Exception):
    """What stops the work because of the user's data, files or options, said in a sentence with
    the way on. The library raises it (code of your own catches it as any exception); the scripts
    print it and exit with status 1 (exits_on_problems)."""


class MissingFile(Problem, FileNotFoundError):
    """A file the user named that is not there: a Problem, and a FileNotFoundError."""


class Done(Exception):
    """What ends a script at once with status 0, the work asked of it being done: its message
    says so."""


def exits_on_problems(main):
    """A script's main, which turns a Problem into its message and exit status 1, a Done into its
    message and status 0, and a collective's failure under torchrun into a message naming the
    timeout and the way on (status 1, which torchrun's --max-restarts restarts)."""

    @functools.wraps(main)
    def script(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Problem as problem:
            raise SystemExit(str(problem)) from None
        except Done as done:
            log(str(done))
            return None
        except RuntimeError as error:  # a collective's: another process hung or ended
            if not collective_failed(error):
                raise
            raise SystemExit(peer_lost(error)) from None

    return script


def log(*parts):
    """Messages go to standard error (standard output is for results), from one process only."""
    if is_main_process():
        print(*parts, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- distributed


class Processes(NamedTuple):
    """This process's place in the job: (0, 0, 1) for a plain run."""

    rank: int
    local_rank: int
    world_size: int


# What a process waits for at most where another may rightly take long: the first process of each
# machine building a large cache, the first process alone choosing the run's result. Every other
# wait of a run is a collective, bounded by --dist-timeout.
LONG_WAIT = timedelta(hours=3)
DIST_TIMEOUT = 600  # seconds: --dist-timeout's default, PyTorch's own for NCCL
_job = {"timeout": timedelta(seconds=DIST_TIMEOUT), "long": None}  # init_distributed's


def init_distributed(device_name, timeout=DIST_TIMEOUT):
    """Join the process group when torchrun started this process: NCCL on CUDA, gloo on the CPU,
    each collective bounded by `timeout` seconds, on a namespace of torchrun's store that is this
    start's alone (attempt_store). Returns its Processes."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return Processes(0, 0, 1)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    try:
        store, _, _ = next(dist.rendezvous("env://", timeout=LONG_WAIT))
        store = attempt_store(store, rank, world)
    except RuntimeError as error:
        raise Problem(
            f"the job's {world} processes did not all start within "
            f"{typed_duration(LONG_WAIT)} ({error}); start the job again (with --resume auto)"
        ) from None
    _job["timeout"] = timedelta(seconds=timeout)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=store,
        rank=rank,
        world_size=world,
        timeout=_job["timeout"],
    )
    _job["long"] = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    return Processes(rank, local_rank, world)


def attempt_store(store, rank, world):
    """A namespace of the job's `store` for this start of its processes alone. torchrun's agent
    keeps one store for every restart of a job (TORCHELASTIC_USE_AGENT_STORE), and PyTorch
    (2.14) keys a process group's entries there alike at each start: a restarted process would
    read the addresses of the processes that died and fail ("Gloo connectFullMesh failed ...
    Connection refused"), or wait for them. TORCHELASTIC_RESTART_COUNT cannot name the namespace:
    each machine's agent counts its own restarts. So the first process draws a name, and hands
    it to each other process in answer to a name that process drew itself: nothing left by the
    processes that died can pass for an answer."""
    ours = f"twophase/{uuid.uuid4().hex}"
    if rank != 0:
        store.set(f"twophase/asks/{rank}", ours)
        name = store.get(f"{ours}/answer").decode()  # waits up to the store's timeout
        store.set(f"{name}/joined/{rank}", "")
        return dist.PrefixStore(f"{name}/", store)
    waiting, deadline = set(range(1, world)), time.monotonic() + LONG_WAIT.total_seconds()
    while waiting:
        for other in sorted(waiting):
            if store.check([f"{ours}/joined/{other}"]):
                waiting.discard(other)
            elif store.check([f"twophase/asks/{other}"]):  # its own, or a dead process's
                store.set(f"{store.get(f'twophase/asks/{other}').decode()}/answer", ours)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer from the processes of rank {sorted(waiting)}")
        time.sleep(0.02)
    return dist.PrefixStore(f"{ours}/", store)


def typed_duration(delta):
    """A timedelta or seconds as a duration is typed (checks.duration): 3h, 10m, 1h30m, 5s."""
    seconds = delta.total_seconds() if isinstance(delta, timedelta) else float(delta)
    if seconds < 60 and not seconds.is_integer():
        return f"{seconds:g}s"
    seconds = round(seconds)
    parts = [(seconds // 3600, "h"), (seconds % 3600 // 60, "m"), (seconds % 60, "s")]
    return "".join(f"{n}{unit}" for n, unit in parts if n) or "0s"


def is_main_process():
    """The first process of the job; under torchrun before the process group exists, too."""
    if not dist.is_initialized():
        return int(os.environ.get("RANK", 0)) == 0
    return dist.get_rank() == 0


@contextmanager
def local_main_first(local_rank):
    """The block runs on each machine's first process first (building the cache, writing the demo
    data), then on the others, which find the work done. If the first fails, torchrun ends them
    all."""
    what = "the first process of this machine to write the demo data and build the cache"
    if dist.is_initialized() and local_rank != 0:
        wait_for_others(what)
    yield
    if dist.is_initialized() and local_rank == 0:
        wait_for_others(what)


def wait_for_others(what):
    """Every process waits here for the others, for up to LONG_WAIT rather than --dist-timeout:
    one of them is doing `what`, which may rightly take long. On a gloo group of its own (the GPU
    does not wait); past LONG_WAIT the process stops, saying what it waited for."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier(group=_job["long"])
    except RuntimeError as error:
        if not timed_out(error):
            raise
        raise Problem(
            f"waited {typed_duration(LONG_WAIT)} for {what}, which has not finished (see its "
            "log); this process stops. Once it is unstuck, start the job again with --resume auto"
        ) from None


# What the errors of a failed collective say (gloo's and NCCL's, PyTorch 2.14): a plain
# RuntimeError, but for NCCL's DistBackendError.
COLLECTIVE_ERRORS = ("gloo", "NCCL", "pair closure", "by peer", "Timed out waiting")


def collective_failed(error):
    """Whether `error` is a collective's of the process group failing: another process stopped
    answering (timed_out) or ended."""
    return dist.is_initialized() and (
        isinstance(error, dist.DistError) or any(m in str(error) for m in COLLECTIVE_ERRORS)
    )


def timed_out(error):
    return "timed out" in str(error).lower() or "timeout" in str(error).lower()


def peer_lost(error):
    """What a process says as it stops because a collective failed: why, and the way on."""
    why = "another process of the run ended (its own lines say why)"
    if timed_out(error):
        why = (
            f"no answer from another process of the run in --dist-timeout "
            f"{typed_duration(_job['timeout'])} (it hung, or its machine was lost)"
        )
    return (
        f"{why}, so this one stops too. torchrun --max-restarts N goes on by itself from the "
        "last position saved; otherwise run the command again with --resume auto (it continues "
        "the run in --out)"
    )


def broadcast_buffers(module):
    """Every process takes the first one's buffers (batch norm statistics): those it saves."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def broadcast_module(module):
    """Every process takes the first one's parameters and buffers: a new head initialised from
    each process's own seed becomes one, before anything (a moving average) copies it."""
    if dist.is_initialized():
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)


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
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class StopRequest:
    """SIGTERM or SIGUSR1, what SLURM, Kubernetes and spot instances send before they kill a job,
    or a first Ctrl-C (SIGINT), asks the run to stop at its next step. The handler only notes it,
    so a second SIGTERM, or one during a save, changes nothing; a second Ctrl-C ends the process
    at once (KeyboardInterrupt). Under torchrun one process receiving it is enough: requested()
    is agreed by every process, through an all-reduce of one number on a gloo group of its own
    (the GPU never waits for it)."""

    # Those the platform has: SIGUSR1 is POSIX's; Windows has SIGBREAK (Ctrl-Break) instead, and
    # SIGTERM only by name (nothing outside the process sends it there).
    SIGNALS = tuple(
        getattr(signal, name)
        for name in ("SIGTERM", "SIGUSR1", "SIGBREAK", "SIGINT")
        if hasattr(signal, name)
    )

    def __init__(self):
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._note) for number in self.SIGNALS}
        # The process group's own (--dist-timeout): it is asked at every step.
        timeout = _job["timeout"]
        self.group = (
            dist.new_group(backend="gloo", timeout=timeout) if dist.is_initialized() else None
        )

    def _note(self, number, frame):
        if number == signal.SIGINT:
            if self.signal is not None:
                raise KeyboardInterrupt
            log("Ctrl-C: the run stops after this step and saves its position (again: at once)")
        self.signal = self.signal or number

    def interrupted(self):
        """Whether the stop was asked for at the keyboard rather than by a scheduler."""
        return self.signal == signal.SIGINT

    def requested(self):
        """True on every process once any has been signalled (a collective under torchrun)."""
        if self.group is None:
            return self.signal is not None
        flag = torch.tensor([self.signal or 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.signal = self.signal or int(flag) or None
        return self.signal is not None

    def name(self):
        if self.interrupted():
            return "Ctrl-C"
        return signal.Signals(self.signal).name if self.signal else "nothing"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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
    """Hold an exclusive lock on the file `path` for the block. Another process holding it makes
    this raise Problem naming it (the process and host, kept in `path`.owner while the lock is
    held), or with wait, wait for it. The lock is filelock's, the platform's own: flock on Linux
    and macOS, LockFileEx on Windows, which the system drops with the process however it ends
    (kill -9 included), so none is ever left stale."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = path.with_name(path.name + ".owner")
    lock = FileLock(path)
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        holder = owner.read_text().strip() if owner.is_file() else ""
        raise Problem(f"{what} is in use by {holder or 'another process'} (lock {path})") from None
    try:
        owner.write_text(f"process {os.getpid()} on {socket.gethostname()}\n")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


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
        replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class WriteErrors:
    """A file open for writing that keeps the OSError a write raised (`error`): torch.save turns
    one (a full disk's) into a RuntimeError ("unexpected pos") that no longer says what it was."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.file.flush()


def replace(source, destination, tries=20):
    """os.replace, tried again for a while where the destination is open (Windows refuses to
    replace a file another process is reading, a checkpoint that evaluate.py has open, say)."""
    for attempt in range(tries):
        try:
            return os.replace(source, destination)
        except PermissionError:
            if os.name != "nt" or attempt == tries - 1:
                raise
            time.sleep(0.25)


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


def mps_available():
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def pick_device(name="auto", local_rank=0):
    """--device: auto takes CUDA where there is a GPU, then Apple's (MPS), then the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise Problem("--device cuda: no CUDA device is visible (use --device cpu)")
    if name == "mps" and not mps_available():
        raise Problem("--device mps: no Apple GPU here, or this torch lacks MPS (--device cpu)")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def amp_dtype(amp, device):
    """The autocast dtype, or None. Mixed precision runs on CUDA and on Apple's GPUs (there
    without a grad scaler, which is CUDA's: recipe.phase_setup); the CPU computes in float32."""
    if device.type not in ("cuda", "mps") or amp == "off":
        return None
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise Problem("--amp bf16: this GPU has no bfloat16 support (use --amp fp16)")
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def compile_support(device):
    """Why torch.compile cannot run here, or None."""
    if device.type == "mps":
        return "torch.compile does not support Apple's GPUs (MPS) well enough to train on"
    try:
        import torch._dynamo  # noqa: PLC0415 (only when asked)

        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile is not supported by this Python or platform"
    except ImportError:
        return "this torch has no torch.compile"
    return None
