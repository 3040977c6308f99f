"""DDP on the CPU: two gloo processes launched by torchrun, as a user would launch them."""

import csv
import subprocess
import sys

import pytest
import torch

import train
from conftest import NO_AUGMENT, REPO, TINY, make_dataset


def torchrun(*args, script="train.py"):
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
        [*launch, "tests/narrow.py", script, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    result = torchrun(
        "--demo",
        "--data",
        root / "demo",
        "--out",
        root / "ck",
        "--img-size",
        "16",
        "--epochs1",
        "1",
        "--epochs2",
        "2",
    )
    return root, result


def test_torchrun_demo_writes_one_set_of_outputs(demo_run):
    root, result = demo_run
    written = {p.name for p in (root / "ck").iterdir()}
    assert written == {"phase1.pt", "last.pt", "best.pt", "history.csv"}
    assert len(rows(root / "ck" / "history.csv")) == 3
    assert (
        result.stderr.count("best val acc") == 1 and result.stderr.count("phase 2 epoch   2/2") == 1
    )
    assert "batch 64 per process x 2 processes = 128" in result.stderr
    state = torch.load(root / "ck" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2


def test_resume_under_ddp_equals_the_uninterrupted_run(demo_run, tmp_path):
    root, _ = demo_run
    common = [
        "--demo",
        "--data",
        root / "demo",
        "--out",
        tmp_path / "ck",
        "--img-size",
        "16",
        "--epochs1",
        "1",
    ]
    torchrun(*common, "--epochs2", "1")
    torchrun("--resume", tmp_path / "ck" / "last.pt", "--epochs2", "2")
    a = torch.load(root / "ck" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert (b["phase"], b["epoch"]) == (2, 2)
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k


def test_every_process_holds_the_same_weights_after_phase_two_and_augments_its_own_way(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=8, val_per_class=3)
    torchrun(
        tmp_path,
        "--data",
        data,
        "--out",
        tmp_path / "ck",
        *TINY,
        "--epochs1",
        "1",
        "--epochs2",
        "2",
        script="tests/ddp_worker.py",
    )
    rank0, rank1 = (torch.load(tmp_path / f"params_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert {"conv1.weight", "layer4.0.conv2.weight", "fc.weight"} <= set(rank0)  # all, not the head
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # Seeded by (seed, epoch, rank): the same number of draws from the same seed would end alike.
    draws0, draws1 = (
        torch.load(tmp_path / f"augment_rng_rank{r}.pt", weights_only=True) for r in (0, 1)
    )
    assert not torch.equal(draws0, draws1)


def test_two_processes_equal_one_over_the_same_global_batch(tmp_path, narrow_models):
    # 18 training images in batches of 8 (2 x 4); 9 validation images, not a multiple of 2.
    data = make_dataset(tmp_path / "data", per_class=6, val_per_class=3)
    common = ["--data", data, *TINY, "--epochs1", "2", "--epochs2", "0", "--freeze-bn", *NO_AUGMENT]
    common += ["--ema", "0.9"]
    common = [str(a) for a in common]
    torchrun(*common, "--batch-size", "4", "--out", tmp_path / "two")
    i = common.index("--batch-size")
    train.main(common[:i] + common[i + 2 :] + ["--batch-size", "8", "--out", str(tmp_path / "one")])
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    for k in one["model"]:
        assert torch.allclose(one["model"][k].float(), two["model"][k].float(), atol=1e-5), k
        assert torch.allclose(
            one["ema"]["model"][k].float(), two["ema"]["model"][k].float(), atol=1e-5
        )
    for r1, r2 in zip(one["history"], two["history"]):  # validation: exact, over all 9 images
        assert (r1["val_acc"], r1["ema_val_acc"]) == (r2["val_acc"], r2["ema_val_acc"])
        assert r1["val_loss"] == pytest.approx(r2["val_loss"], abs=1e-5)
        assert r1["train_loss"] == pytest.approx(r2["train_loss"], abs=1e-5)


def test_a_process_with_no_validation_images_does_not_hang(tmp_path):
    data = make_dataset(tmp_path / "data", classes=("a", "b"), per_class=6, val_per_class=0)
    (data / "val" / "a").mkdir(parents=True)
    (data / "val" / "a" / "only.png").write_bytes((data / "train" / "a" / "000.png").read_bytes())
    torchrun("--data", data, "--out", tmp_path / "ck", *TINY, "--epochs1", "1", "--epochs2", "1")
    history = rows(tmp_path / "ck" / "history.csv")
    assert len(history) == 2 and all(float(r["val_acc"]) in (0.0, 1.0) for r in history)
