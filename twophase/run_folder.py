"""A run's folder (--out): held by one run at a time (its lock), never overwritten by accident
(a fresh run refuses a folder holding a run it does not continue, unless --overwrite or the
demo's; a continued run refuses to drop epochs past its checkpoint), and the run's files written
into it whole or not at all, a failed write said in one sentence."""

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from twophase.checkpoint import (
    BEST_PT,
    CHECKPOINT_DIR,
    HISTORY_CSV,
    LAST_PT,
    LOCK_FILE,
    PHASE1_PT,
    PREEMPTED,
    RUN_FILES,
    peek,
    save_checkpoint,
    write_history_csv,
)
from utils import Problem, atomic_file, exclusive, log

FIGURES = Path("figures")  # where a run's figures go (evaluate.py's, the range test's)


def run_figures(folder):
    """The figures folder of the run in `folder`: figures/ for a run in checkpoints/ (train.py's
    --out by default), figures/RUN for a run in a folder RUN."""
    name = Path(folder).resolve().name
    return FIGURES if name == CHECKPOINT_DIR else FIGURES / name


def save_checkpoints(state, paths):
    """One state under several names, in order, serialised once: the first file written, the
    others copies of it (no second pickling, no second copy of the tensors off the GPU). Copies,
    not hard links: a file rewritten in place later changes only itself. Each file is written
    atomically; the first that cannot be (a full disk) raises its OSError, it and the files after
    it as they were."""
    written = None
    for path in map(Path, paths):
        try:
            if written is None:
                save_checkpoint(state, path)
                written = path
            else:
                with atomic_file(path) as f, open(written, "rb") as source:
                    shutil.copyfileobj(source, f)
        except OSError as error:
            error.filename = error.filename or str(path)  # a write's error names no file
            raise


class RunFolder:
    """A run's --out: the lock that keeps other runs out while it trains, the guard that keeps a
    fresh run from overwriting a run the folder holds, and every file written into it. Only the
    first process writes (`writer`); under torchrun the others hold no lock and write nothing."""

    def __init__(self, path, writer=True):
        self.path, self.writer = Path(path), writer
        self.replaced = []  # the files of the run this one replaces, deleted at its first save
        self.written = False

    @contextmanager
    def claimed(self, start, args):
        """The folder, held for the block. Refused if another run holds it, or if it holds a run
        that this one does not continue, unless --overwrite (or the run it holds is the demo's:
        a throwaway that any fresh run replaces). Nothing of a replaced run is deleted before
        this one writes its first file, and a run that fails before that leaves no trace: no
        folder it made, no lock."""
        if not self.writer:
            yield self
            return
        made = not self.path.exists()
        try:
            with exclusive(self.path / LOCK_FILE, f"--out {self.path}"):
                try:
                    self.guard(start, args.overwrite, args.weights)
                    self.remove(PREEMPTED)
                    yield self
                finally:
                    # Removed while still held: a run waiting for it then holds a lock that is
                    # gone, and the next makes a new one, which it holds alone.
                    if not self.written and not self.held():
                        try:
                            (self.path / LOCK_FILE).unlink(missing_ok=True)
                        except PermissionError:  # Windows: an open file stays; filelock removes it
                            pass
        finally:
            if made and self.path.is_dir() and not self.written and not any(self.path.iterdir()):
                self.path.rmdir()

    def holds_last_of(self, start):
        """Whether the folder's last.pt is this run's: written by it, or the one it continues
        (not that of a run --overwrite is replacing)."""
        last = self.path / LAST_PT
        return last.is_file() and (self.written or start.continues_in(self.path))

    def averaged_acc(self, start):
        """The validation accuracy of the folder's best.pt where it is an average of the epochs of
        the run continued here (--average-last), which a later epoch must beat; else -1."""
        best = peek(self.path / BEST_PT) if start.continues_in(self.path) else None
        if best and best.get("averaged") and best.get("val_acc") is not None:
            return best["val_acc"]
        return -1.0

    def held(self):
        """The run files in the folder, by name."""

        return sorted({p.name for pattern in RUN_FILES for p in self.path.glob(pattern)})

    def guard(self, start, overwrite, weights):
        held = self.held()
        keep = [PHASE1_PT] if start.from_phase1_in(self.path) else []
        checkpoints = [name for name in held if name.endswith(".pt") and name not in keep]
        # Phase II from phase1.pt: refused once any other checkpoint is past Phase I.
        phase2_begun = keep and any(
            (peek(self.path / name) or {"phase": 2})["phase"] != 1 for name in checkpoints
        )
        last = peek(self.path / LAST_PT) if LAST_PT in held else None
        behind = start.continues_in(self.path) and behind_last(start, last)
        if behind and not overwrite:
            raise Problem(self.behind_refusal(start, last))
        if behind:  # --overwrite: the epochs past the checkpoint the run goes on from
            later = [name for name in checkpoints if name != start.path.name]
            later = [
                n for n in later if place(peek(self.path / n) or start.state) > place(start.state)
            ]
            self.replace(later, "--overwrite")
            return
        if not checkpoints or (start.continues_in(self.path) and not phase2_begun):
            return  # nothing to lose (a history.csv alone, at most), or the run goes on
        demo_run = start.fresh and last is not None and last["args"].get("demo")
        if not (overwrite or demo_run):
            raise Problem(self.refusal(held, last, phase2_begun))
        if Path(weights).is_file() and Path(weights).resolve().parent == self.path.resolve():
            keep.append(Path(weights).name)  # the weights the run starts from: read first
        why = "--overwrite" if overwrite else "replacing the demo's run"
        self.replace([name for name in held if name not in keep], why)

    def replace(self, names, why):
        """`names` deleted when this run saves its first file, and said now."""
        self.replaced, self.why_replaced = names, why
        if names:
            log(
                f"{why}: {', '.join(names)} in {self.path} will be deleted when this run saves "
                "its first file"
            )

    def behind_refusal(self, start, last):
        return (
            f"{start.path} is {position(start.state)} of the run in {self.path}, whose last.pt "
            f"is {position(last)}: going on from it there would overwrite last.pt and "
            f"history.csv's later epochs. Either\n"
            f"  continue the run:       python train.py --resume {self.path / LAST_PT}\n"
            f"  go on from it apart:    --out ANOTHER_FOLDER\n"
            f"  replace the later ones: --overwrite"
        )

    def refusal(self, held, last, phase2_begun):
        where = f" (last.pt: phase {last['phase']} epoch {last['epoch']})" if last else ""
        if phase2_begun:
            what = f"{self.path} holds this run's Phase II{where}: starting from phase1.pt again "
            what += "would overwrite it"
            over = "start Phase II over:   --overwrite (then deletes every file but phase1.pt)"
        else:
            what = f"--out {self.path} holds a run{where}: {', '.join(held)}; a fresh run would "
            what += "overwrite it"
            over = "start over there:      --overwrite (deletes them when the new run first saves)"
        ways = [f"continue it:           python train.py --resume {self.path / LAST_PT}"] * bool(
            last
        )
        ways += ["train somewhere else:  --out ANOTHER_FOLDER"] * (not phase2_begun) + [over]
        return f"{what}. Either\n" + "\n".join(f"  {way}" for way in ways)

    def save(self, state, names, history):
        """history.csv, then `state` under each of `names` (last.pt last), each file atomically.
        A file that cannot be written (a full disk, an unwritable folder) stops the run: it and
        the files after it stay as they were, loadable, its partial file deleted, and the message
        names the folder, the space a checkpoint needs and the way on. history.csv comes first: a
        run stopped between the writes holds a history.csv ahead of last.pt, which the resumed
        run writes again, never one behind that no later save would mend."""
        self.delete_replaced()
        self.written = True
        try:
            write_history_csv(history, self.path / HISTORY_CSV)
            save_checkpoints(state, [self.path / name for name in names])
        except OSError as error:
            raise Problem(unwritten_advice(self.path, error, state)) from None

    def delete_replaced(self):
        """The replaced run's files, once this run is about to write its own."""
        for name in self.replaced:
            (self.path / name).unlink(missing_ok=True)
        if self.replaced:
            log(f"{self.why_replaced}: deleted {', '.join(self.replaced)} from {self.path}")
        self.replaced = []

    def remove(self, name):
        (self.path / name).unlink(missing_ok=True)

    def mark_preempted(self, why):
        """The sign for a job script that the run stopped on request and wants resuming."""
        if self.writer:
            with atomic_file(self.path / PREEMPTED, "w") as f:
                f.write(why + "\n")


def behind_last(start, last):
    """Whether the checkpoint a run continues from (best.pt, a periodic or kept epoch's) is
    behind its folder's last.pt: its run has trained on past it."""
    if last is None or start.path.name in (LAST_PT, PHASE1_PT):
        return False
    return place(start.state) < place(last)


def unwritten_advice(folder, error, state):
    """Why a save failed, in one sentence with the way on: for a full disk, the space a
    checkpoint needs (its tensors' bytes) and what is free."""
    why = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(folder).free
        why += f": a checkpoint needs about {in_bytes(tensor_bytes(state))}, {in_bytes(free)} free"
    return (
        f"could not write {error.filename or 'a file'} in {folder} ({why}), so the run stops with "
        f"its files there as they were; free the space (or fix the folder), then go on with: "
        f"python train.py --resume auto --out {folder}"
    )


def tensor_bytes(value):
    """The bytes of the tensors in a nested dict or list: a checkpoint's size, near enough."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def in_bytes(n):
    """A number of bytes as 512 B, 1.2 MB, 3.4 GB."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def place(state):
    return (state["phase"], state["epoch"], state.get("step") or 0)


def position(state):
    where = f"phase {state['phase']} epoch {state['epoch']}"
    return where + (f" and {state['step']} batches" if state.get("step") else "")
