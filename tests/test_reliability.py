"""Runs that go wrong: non-finite losses, out of memory, a process killed at any moment."""

import signal
import subprocess
import sys

import pytest
import torch

import train
from conftest import NO_AUGMENT, REPO, TINY


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tiny_args, tmp_path):
    with pytest.raises(SystemExit, match="not finite") as stop:
        train.main(tiny_args + ["--epochs1", "1", "--epochs2", "2", "--lr2", "1e30"])
    assert "last.pt" in str(stop.value)
    last = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert (last["phase"], last["epoch"]) == (1, 1)  # the epoch before the loss went bad
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_accumulated_small_batches_equal_one_large_batch(dataset, tmp_path, narrow_models):
    common = ["--data", str(dataset), *TINY, "--epochs1", "2", "--epochs2", "0", "--freeze-bn"]
    common += NO_AUGMENT
    train.main(common + ["--batch-size", "8", "--out", str(tmp_path / "large")])
    train.main(
        common + ["--batch-size", "4", "--accum-steps", "2", "--out", str(tmp_path / "small")]
    )
    large = torch.load(tmp_path / "large" / "last.pt", weights_only=True)
    small = torch.load(tmp_path / "small" / "last.pt", weights_only=True)
    for k in large["model"]:
        assert torch.allclose(large["model"][k].float(), small["model"][k].float(), atol=1e-5), k
    assert large["history"][-1]["train_loss"] == pytest.approx(
        small["history"][-1]["train_loss"], abs=1e-5
    )


def test_out_of_memory_names_the_options_that_help(tiny_args, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train_phase", out_of_memory)
    with pytest.raises(SystemExit, match="--batch-size 2 --accum-steps 2"):
        train.main(tiny_args + ["--epochs1", "1", "--epochs2", "1"])
    with pytest.raises(
        SystemExit, match="--batch-size 25 --accum-steps 3"
    ):  # 75 = 25 x 3, not 37 x 2
        train.main(tiny_args + ["--epochs1", "1", "--batch-size", "75"])


def run_until_killed(args, line_seen):
    """Start a training process and SIGKILL it as soon as it logs line_seen: the checkpoints of
    that epoch are being written right then."""
    proc = subprocess.Popen(
        [sys.executable, "tests/narrow.py", "train.py", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr:
        if line_seen in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    return proc.returncode


def test_a_run_killed_at_any_moment_resumes_to_the_same_weights(tiny_args, tmp_path):
    args = tiny_args + ["--epochs1", "2", "--epochs2", "3"]
    train.main(args + ["--out", str(tmp_path / "straight")])
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    # As an epoch's checkpoints are written (the moment a kill could leave half a file); stops
    # at every other moment are test_preemption.py's.
    for i, moment in enumerate(["phase 2 epoch   2/3"]):
        out = tmp_path / f"killed{i}"
        assert run_until_killed(args + ["--out", str(out)], moment) == -signal.SIGKILL
        last = out / "last.pt"
        if last.exists():  # a checkpoint is either the old one or the new one, never half of one
            torch.load(last, weights_only=True)
            train.main(["--resume", str(last)])
        else:  # killed before its first checkpoint: nothing to resume
            train.main(args + ["--out", str(out)])
        resumed = torch.load(last, weights_only=True)
        assert (resumed["phase"], resumed["epoch"]) == (2, 3)
        for k in straight:
            assert torch.equal(straight[k], resumed["model"][k]), (moment, k)
