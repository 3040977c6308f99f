"""DDP on the CPU: two gloo processes launched by torchrun, as a user would launch them; and, where
torchrun itself is not what is tested, forked from this process (the same DDP, without two more
interpreters importing torch)."""

import csv
import multiprocessing
import os
import socket
import subprocess
import sys
import traceback

import pytest
import torch

import train
from conftest import NO_AUGMENT, REPO, TINY, copy_of, make_dataset


def torchrun(*args, script="train.py", runner="tests/narrow.py", env=None, check=True):
    """The script under torchrun with two processes, the narrow models swapped in."""
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    result = subprocess.run(
        [*launch, *runner.split(), script, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forked_ddp(argv, tmp_path, nproc=2):
    """train.main(argv) in `nproc` processes forked from this one, joined into one gloo process
    group as torchrun's workers are (RANK, WORLD_SIZE, MASTER_ADDR, ...). Returns their exit
    statuses; each process's standard error is in tmp_path/rank<N>.log."""
    port, context = free_port(), multiprocessing.get_context("fork")
    workers = [
        context.Process(target=ddp_worker, args=(rank, nproc, port, argv, tmp_path))
        for rank in range(nproc)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
    return [worker.exitcode for worker in workers]


def ddp_worker(rank, world, port, argv, folder):
    env = dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, LOCAL_WORLD_SIZE=world)
    os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    with open(folder / f"rank{rank}.log", "w") as log:
        os.dup2(log.fileno(), 2)
        sys.stderr = log
        try:
            train.main([str(a) for a in argv])
        except SystemExit as stop:
            log.write(f"{stop.code}\n")
            log.flush()
            os._exit(stop.code if isinstance(stop.code, int) else 1)
        except BaseException:
            traceback.print_exc(file=log)
            log.flush()
            os._exit(1)
        log.flush()
    os._exit(0)


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_images):
    """The demo on one machine with two processes, each saving its parameters and its
    augmentation's random state at the end (tests/ddp_worker.py)."""
    root = tmp_path_factory.mktemp("ddp")
    demo = copy_of(demo_images, root)
    args = [root, *DEMO, "--data", demo, "--out", root / "ck", "--epochs2", "2"]
    return root, torchrun(*args, script="tests/ddp_worker.py")


DEMO = ["--demo", "--img-size", "16", "--epochs1", "1", "--ema", "0.9"]


def test_torchrun_demo_writes_one_set_of_outputs(demo_run):
    root, result = demo_run
    written = {p.name for p in (root / "ck").iterdir()}
    # data_check.csv: the demo's 8 x 8 digits hold many look-alikes (docs/data.md)
    assert written == {"phase1.pt", "last.pt", "best.pt", "history.csv", "data_check.csv", ".lock"}
    assert len(rows(root / "ck" / "history.csv")) == 3
    assert (
        result.stderr.count("best val acc") == 1 and result.stderr.count("phase 2 epoch   2/2") == 1
    )
    assert result.stderr.count("data_check.csv lists every group") == 1
    assert "batch 64 per process x 2 processes = 128" in result.stderr
    state = torch.load(root / "ck" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2


@pytest.mark.slow  # the signal's path is test_preemption's in one process; the two nodes, here
def test_two_machines_stopped_by_a_signal_to_one_resume_to_the_one_machine_run(
    demo_run, tmp_path, narrow_models
):
    """Two torchrun agents on 127.0.0.1, one process each (--nnodes 2 --node_rank 0/1), as two
    machines sharing the data folder and --out: the first process of each writes the demo data
    and builds its cache at once, and they take turns. Rank 1 alone gets SIGTERM mid-epoch: both
    processes stop at the same step, nothing hangs, and the run resumed under torchrun on one
    machine with two processes ends as the demo_run fixture's did, which never stopped."""
    root, _ = demo_run
    out = tmp_path / "ck"
    port = free_port()
    args = [*DEMO, "--data", tmp_path / "demo", "--out", out, "--epochs2", "2"]
    # 1,259 training images, 64 a process: 9 batches an epoch; the 12th is Phase II's 3rd.
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node"]
            + ["1", "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port"]
            + [str(port), "tests/preempt.py", "step=12", "train.py", *map(str, args)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # As torchrun sets it for several processes a machine: the same float sums.
            env={**os.environ, "OMP_NUM_THREADS": "1", "PREEMPT_RANK": "1"},
        )
        for node in (0, 1)
    ]
    errors = [agent.communicate(timeout=240)[1] for agent in agents]
    assert "stopped by SIGTERM 3 batches into phase 2 epoch 1" in errors[0], errors[0][-3000:]
    # torchrun reports the workers' exit status 75 as a failure of its own; the file tells.
    assert [agent.returncode for agent in agents] == [1, 1] and (out / "preempted").is_file()
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 3
    assert forked_ddp(["--resume", out / "last.pt"], tmp_path) == [0, 0]
    a = torch.load(root / "ck" / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    assert (b["phase"], b["epoch"], b.get("step")) == (2, 2, None)
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k
        assert torch.allclose(a["ema"]["model"][k].float(), b["ema"]["model"][k].float(), atol=1e-6)
    assert [r["val_acc"] for r in a["history"]] == [r["val_acc"] for r in b["history"]]


def test_every_process_holds_the_same_weights_after_phase_two_and_augments_its_own_way(demo_run):
    root, _ = demo_run
    rank0, rank1 = (torch.load(root / f"params_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert {"conv1.weight", "layer4.0.conv2.weight", "fc.weight"} <= set(rank0)  # all, not the head
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # The moving average too: it starts from the one head every process trains, not from the
    # head each process drew from its own seed.
    ema0, ema1 = (torch.load(root / f"ema_rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in ema0:
        assert torch.equal(ema0[name], ema1[name]), name
    # Seeded by (seed, epoch, rank): the same number of draws from the same seed would end alike.
    draws0, draws1 = (
        torch.load(root / f"augment_rng_rank{r}.pt", weights_only=True) for r in (0, 1)
    )
    assert not torch.equal(draws0, draws1)


def test_two_processes_equal_one_over_the_same_global_batch(tmp_path, narrow_models):
    """18 training images in batches of 8 (2 x 4); one validation image, so that the second
    process validates none and must not hang waiting for the first."""
    data = make_dataset(tmp_path / "data", per_class=6, val_per_class=0)
    (data / "val" / "cat").mkdir(parents=True)
    (data / "val" / "cat" / "only.png").write_bytes(
        (data / "train" / "cat" / "000.png").read_bytes()
    )
    common = ["--data", data, *TINY, "--epochs1", "2", "--epochs2", "0", "--freeze-bn", *NO_AUGMENT]
    one, two = one_and_two_processes([*common, "--ema", "0.9"], tmp_path)
    for k in one["model"]:
        assert torch.allclose(one["model"][k].float(), two["model"][k].float(), atol=1e-5), k
        assert torch.allclose(
            one["ema"]["model"][k].float(), two["ema"]["model"][k].float(), atol=1e-5
        )
    for r1, r2 in zip(one["history"], two["history"]):  # validation: exact, over the one image
        assert (r1["val_acc"], r1["ema_val_acc"]) == (r2["val_acc"], r2["ema_val_acc"])
        assert r1["val_balanced"] == r2["val_balanced"]
        assert r1["val_loss"] == pytest.approx(r2["val_loss"], abs=1e-5)
        assert r1["train_loss"] == pytest.approx(r2["train_loss"], abs=1e-5)
        assert len(r1["train_loss_curve"]) == len(r2["train_loss_curve"]) > 0
        assert r1["train_loss_curve"] == pytest.approx(r2["train_loss_curve"], abs=1e-5)


def test_class_weights_and_balanced_batches_train_two_processes_as_one(tmp_path, narrow_models):
    """A weighted loss's mean divides by the batch's weights: by the whole batch's, however it is
    split over processes, and the balanced sampler's draws are one epoch's, shared out."""
    data = make_dataset(tmp_path / "data", per_class=6, val_per_class=1)
    weights = tmp_path / "w.csv"
    weights.write_text("cat,3\ndog,0.5\n")
    common = ["--data", data, *TINY, "--epochs1", "2", "--epochs2", "0", "--freeze-bn", *NO_AUGMENT]
    common += ["--class-weights", weights, "--sampler", "balanced"]
    one, two = one_and_two_processes(common, tmp_path)
    for k in one["model"]:
        assert torch.allclose(one["model"][k].float(), two["model"][k].float(), atol=1e-5), k
    for r1, r2 in zip(one["history"], two["history"]):
        assert r1["val_loss"] == pytest.approx(r2["val_loss"], abs=1e-5)


def one_and_two_processes(argv, tmp_path):
    """train.main(argv) in two forked processes at batch 4 each, and in one at batch 8: the same
    global batch. Their last.pt's, one's first."""
    argv = [str(a) for a in argv]
    i = argv.index("--batch-size")
    argv = argv[:i] + argv[i + 2 :]
    assert forked_ddp([*argv, "--batch-size", "4", "--out", tmp_path / "two"], tmp_path) == [0, 0]
    train.main(argv + ["--batch-size", "8", "--out", str(tmp_path / "one")])
    return [torch.load(tmp_path / f / "last.pt", weights_only=True) for f in ("one", "two")]
