"""What a cluster does to a run (twophase/cluster.py, utils.init_distributed): torchrun starting
its workers again after one died, a worker that hangs, --resume auto, another number of
processes on resume. Two gloo processes on the CPU, forked from this one where torchrun itself
is not what is tested."""

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import train
import utils
from conftest import REPO, TINY, Killed, examples, make_dataset, stop_at
from test_distributed import ddp_worker, forked_ddp, free_port
from twophase import augment, cluster, run_folder
from twophase.resolve import resolve
from utils import Problem

# 36 training images, 18 a process in batches of 4: 4 batches an epoch (with one process, 9).
EPOCHS = ["--epochs1", "1", "--epochs2", "2"]


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "data", per_class=12, val_per_class=1)


def same_weights(a, b):
    a, b = (torch.load(p, weights_only=True) for p in (a, b))
    assert (a["phase"], a["epoch"], a.get("step")) == (b["phase"], b["epoch"], b.get("step"))
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-6), key
    assert [r["val_acc"] for r in a["history"]] == [r["val_acc"] for r in b["history"]]


def torchrun(*args, env=None, restarts=1):
    """train.py under torchrun --max-restarts with two processes and the narrow models, rank 1
    signalled at its first start as tests/preempt.py's PREEMPT_* say. Its Popen."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    launch += ["2", "--max-restarts", str(restarts), "tests/preempt.py"]
    return subprocess.Popen(
        [*launch, *map(str, args)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PREEMPT_RANK": "1", **(env or {})},
    )


# ----------------------------------------------------------------------------- restarts


def join_group(rank, port, delay):
    """A process of a two-process job on the agent's store at `port`, as torchrun starts one:
    joins the process group and adds one to an all-reduce. Exit status 0 where the group formed."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"
    time.sleep(delay)
    utils.init_distributed("cpu")
    total = torch.ones(1)
    dist.all_reduce(total)
    os._exit(0 if total.item() == 2 else 1)


def start_group(port, delays=(0, 0)):
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=join_group, args=(rank, port, delay))
        for rank, delay in enumerate(delays)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=20)
    codes = [worker.exitcode for worker in workers]
    for worker in workers:
        if worker.exitcode is None:
            worker.kill()
            worker.join()
    return codes


def test_processes_started_again_on_the_store_of_those_that_died_form_their_group():
    """torchrun's agent keeps one store for every start of a job's workers, and the dead
    workers' entries stay in it: PyTorch's own init_process_group reads the addresses of the
    dead ones there (the second worker started a moment later, so that the first surely does)
    and fails with "Gloo connectFullMesh failed ... Connection refused", or waits for ever."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # the agent's
    assert start_group(store.port) == [0, 0]  # its first start, which then dies
    assert store.num_keys() > 0
    started = time.monotonic()
    assert start_group(store.port, delays=(0, 1)) == [0, 0]  # torchrun's restart
    assert time.monotonic() - started < 20


def test_a_worker_killed_under_torchrun_is_restarted_and_the_run_ends_as_an_uninterrupted_one(
    data, tmp_path, narrow_models
):
    """kill -9 to one of two workers in Phase II; the last position saved two steps before.
    torchrun --max-restarts 1 starts both again, which go on from it by themselves, though the
    command is a fresh run's (which would refuse a folder holding a run)."""
    run = ["--data", data, *TINY, *EPOCHS, "--save-every-steps", "2"]
    assert forked_ddp([*run, "--out", tmp_path / "straight"], tmp_path) == [0, 0]
    out = tmp_path / "ck"
    # The 7th training batch is Phase II's 3rd; its position was saved after its 2nd.
    job = torchrun("step=7", "train.py", *run, "--out", out, env={"PREEMPT_SIGNAL": "KILL"})
    errors = job.communicate(timeout=240)[1]
    assert job.returncode == 0, errors[-3000:]
    assert "exitcode: -9" in errors  # the kill, which torchrun saw
    assert (
        f"torchrun restart 1: the run goes on from {out / 'last.pt'} (phase 2, 2 batches into "
        "epoch 1), whatever the command says"
    ) in errors
    assert "holds a run" not in errors
    same_weights(tmp_path / "straight" / "last.pt", out / "last.pt")


# ----------------------------------------------------------------------------- a hung worker


def stopped_worker(rank, world, port, argv, folder):
    """ddp_worker; the process of rank 1 stops itself (SIGSTOP) as its 7th training batch is
    augmented, noting when."""
    if rank == 1:
        real, calls = augment.DeviceAugment.forward, [0]

        def forward(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 7:
                (folder / "stopped_at").write_text(str(time.time()))
                os.kill(os.getpid(), signal.SIGSTOP)
            return real(self, *args, **kwargs)

        augment.DeviceAugment.forward = forward  # in this forked process alone
    ddp_worker(rank, world, port, argv, folder)


def test_a_hung_worker_ends_the_other_within_the_timeout_saying_how_to_go_on(
    data, tmp_path, narrow_models
):
    """SIGSTOP to one of two workers in Phase II, --dist-timeout 5s: the other stops in about
    five seconds (not the three hours every collective once waited), naming the timeout and the
    way on, and the files it leaves load."""
    out = tmp_path / "ck"
    argv = [
        str(a)
        for a in ["--data", data, *TINY, *EPOCHS, "--save-every-steps", "2", "--out", out]
        + ["--dist-timeout", "5s"]
    ]
    context, port = multiprocessing.get_context("fork"), free_port()
    workers = [
        context.Process(target=stopped_worker, args=(rank, 2, port, argv, tmp_path))
        for rank in range(2)
    ]
    for worker in workers:
        worker.start()
    workers[0].join(timeout=120)
    ended = time.time()
    workers[1].kill()
    workers[1].join()
    assert workers[0].exitcode == 1
    waited = ended - float((tmp_path / "stopped_at").read_text())
    print(f"the first worker stopped {waited:.1f} s after the second hung")
    assert 5 <= waited < 15
    message = (tmp_path / "rank0.log").read_text().strip().splitlines()[-1]
    assert message.startswith(
        "no answer from another process of the run in --dist-timeout 5s (it hung, or its "
        "machine was lost), so this one stops too"
    )
    assert "--resume auto" in message and "torchrun --max-restarts" in message
    for name in ("last.pt", "phase1.pt", "best.pt"):
        torch.load(out / name, weights_only=True)
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2


@pytest.mark.slow
def test_a_hung_worker_under_torchrun_is_restarted_and_the_run_ends_as_an_uninterrupted_one(
    data, tmp_path, narrow_models
):
    """SIGSTOP to one of two workers: the other stops after --dist-timeout, torchrun kills the
    hung one (after its shutdown timeout) and starts both again, which go on from the position
    saved."""
    run = ["--data", data, *TINY, *EPOCHS, "--save-every-steps", "2"]
    assert forked_ddp([*run, "--out", tmp_path / "straight"], tmp_path) == [0, 0]
    out = tmp_path / "ck"
    note = tmp_path / "stopped_at"
    job = torchrun(
        "step=7",
        "train.py",
        *run,
        "--out",
        out,
        "--dist-timeout",
        "5s",
        env={"PREEMPT_SIGNAL": "STOP", "PREEMPT_NOTE": str(note)},
    )
    deadline = time.monotonic() + 120
    while not note.is_file() or len(note.read_text().split()) < 2:
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.1)
    time.sleep(8)  # the other worker's timeout, and torchrun seeing it end
    os.kill(int(note.read_text().split()[1]), signal.SIGKILL)  # else torchrun waits 30 s for it
    errors = job.communicate(timeout=240)[1]
    assert job.returncode == 0, errors[-3000:]
    assert "no answer from another process of the run in --dist-timeout 5s" in errors
    assert "torchrun restart 1: the run goes on from" in errors
    same_weights(tmp_path / "straight" / "last.pt", out / "last.pt")


# ----------------------------------------------------------------------------- --resume auto


def first_line(capsys):
    return capsys.readouterr().err.splitlines()[0]


def test_resume_auto_starts_a_run_continues_it_and_leaves_it_once_finished(
    tiny_args, tmp_path, monkeypatch, capsys
):
    """The one command a job script gives every time it starts: a fresh run where --out holds
    none, the run it holds continued, a finished one left as it is (nothing written), each said
    in the first line."""
    run = tiny_args + ["--epochs1", "1", "--epochs2", "2"]
    train.main(run + ["--out", str(tmp_path / "straight")])
    capsys.readouterr()
    out, command = tmp_path / "ck", run + ["--resume", "auto"]
    with monkeypatch.context() as patch:
        stop_at(patch, "step=6")  # Phase II's second batch
        with pytest.raises(SystemExit, match=str(utils.EXIT_PREEMPTED)):
            train.main(command)
    assert first_line(capsys) == (
        f"--resume auto: {out} holds no run (no last.pt, no phase1.pt), so a fresh run starts there"
    )
    train.main(command)
    assert first_line(capsys) == (
        f"--resume auto: the run in {out} goes on from last.pt (phase 2, 2 batches into epoch 1)"
    )
    same_weights(tmp_path / "straight" / "last.pt", out / "last.pt")
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert train.main(command) is None  # exit status 0
    assert first_line(capsys) == (
        f"--resume auto: the run in {out} is finished (after phase 2 epoch 2, every epoch its "
        "options ask for), so it is left as it is"
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
    train.main(command[:-2] + ["--resume", "auto", "--epochs2", "3"])  # asked for more: it trains
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 3


def test_resume_auto_goes_on_from_phase1_pt_where_a_run_stopped_before_last_pt(
    tiny_args, tmp_path, monkeypatch, capsys
):
    """Stopped as Phase I's last epoch was being saved, after phase1.pt and before last.pt (the
    last file an epoch writes): phase1.pt is the further, and the run goes on from it."""
    run = tiny_args + ["--epochs1", "2", "--epochs2", "1"]
    train.main(run + ["--out", str(tmp_path / "straight")])
    real, calls = run_folder.save_checkpoints, [0]

    def killed_before_last(state, paths):
        calls[0] += 1
        if calls[0] == 2:  # Phase I's second epoch: phase1.pt, (best.pt,) last.pt
            real(state, paths[:-1])
            raise Killed
        real(state, paths)

    with monkeypatch.context() as patch:
        patch.setattr(run_folder, "save_checkpoints", killed_before_last)
        with pytest.raises(Killed):
            train.main(run)
    out = tmp_path / "ck"
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    capsys.readouterr()
    train.main(["--resume", "auto", "--out", str(out)])
    assert first_line(capsys) == (
        f"--resume auto: the run in {out} goes on from phase1.pt (after phase 1 epoch 2)"
    )
    same_weights(tmp_path / "straight" / "last.pt", out / "last.pt")


def test_a_restart_goes_on_from_its_own_jobs_position_only(
    tiny_args, tmp_path, monkeypatch, capsys
):
    """Under torchrun's restarts the run goes on from what this job saved, whatever the command
    says; a run another job left in --out is met as the command says (a fresh one refuses it)."""
    run = tiny_args + ["--epochs1", "1", "--epochs2", "1"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job0")
    train.main(run)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    capsys.readouterr()
    with pytest.raises(SystemExit, match="holds a run"):
        train.main(run)
    out = tmp_path / "ck"
    assert first_line(capsys) == (
        f"torchrun restart 1: {out} holds no position this job saved, so the command goes as "
        "given (a fresh run)"
    )
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job0")  # job0's restart: its run, finished
    train.main(run)  # chooses its result again (its processes may have died doing so)
    assert first_line(capsys) == (
        f"torchrun restart 1: the run goes on from {out / 'last.pt'} (after phase 2 epoch 1), "
        "whatever the command says"
    )


# ----------------------------------------------------------------------------- other processes


def test_a_run_goes_on_with_another_number_of_processes_from_an_epochs_end(
    tiny_args, tmp_path, capsys
):
    """One process, then two: the next epoch is shared out two ways (18 images: 4 batches of 4
    for one process, 2 for each of two), and the first lines say the global batch and rates."""
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "1"])
    out = tmp_path / "ck"
    argv = ["--resume", "auto", "--out", out, "--epochs2", "2"]
    assert forked_ddp(argv, tmp_path) == [0, 0]
    lines = (tmp_path / "rank0.log").read_text().splitlines()
    assert lines[:2] == [
        f"--resume auto: the run in {out} goes on from last.pt (after phase 2 epoch 1)",
        "the run had 1 process(es), this one has 2: each epoch from here is shared out 2 way(s), "
        "a global batch of 8 (it was 4), at the learning rates the options give, not rescaled "
        "(--lr1 0.0005, --lr2 0.0005); --batch-size 2 keeps the global batch of 4",
    ]
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and [r["steps"] for r in state["history"]] == [4, 4, 2]


def test_a_run_stopped_mid_epoch_is_refused_another_number_of_processes_in_a_sentence(
    tiny_args, tmp_path, monkeypatch
):
    with monkeypatch.context() as patch:
        stop_at(patch, "step=6")
        with pytest.raises(SystemExit):
            train.main(tiny_args + ["--epochs1", "1", "--epochs2", "1"])
    last = tmp_path / "ck" / "last.pt"
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc-per-node 2 would start it
    with pytest.raises(Problem) as refused:
        resolve(["--resume", str(last)])
    assert str(refused.value) == (
        f"{last} stopped phase 2, 2 batches into epoch 1 with 1 process(es), among which that "
        "epoch's batches are shared out, and this run has 2: finish that epoch with 1 (python "
        f"train.py --resume {last}), after which any number of processes goes on from an epoch's "
        "end"
    )


@settings(max_examples=examples(50))
@given(*[st.integers(1, n) for n in (16, 16, 128, 4, 4)])
def test_the_global_batch_said_is_the_one_trained_and_the_batch_offered_keeps_the_old(
    saved, world, batch, accum, saved_accum
):
    saved_args = {"batch_size": batch, "accum_steps": saved_accum}
    options = {"batch_size": batch, "accum_steps": accum, "lr1": 5e-4, "lr2": 1e-3}
    line = cluster.global_batch_line(saved_args, options, saved, world)
    was, now = batch * saved_accum * saved, batch * accum * world
    assert f"a global batch of {now} (it was {was})" in line
    offered = re.search(r"--batch-size (\d+) keeps the global batch of (\d+)$", line)
    if offered:
        assert int(offered[1]) * accum * world == int(offered[2]) == was != now
    else:
        assert was == now or was % (accum * world)
