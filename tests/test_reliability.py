"""Runs that go wrong: non-finite losses, out of memory, a process killed at any moment."""

import re
import signal

import pytest
import torch

import train
from conftest import NO_AUGMENT, TINY, Forked, make_dataset


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

    monkeypatch.setattr(train, "train_epoch", out_of_memory)
    with pytest.raises(SystemExit, match="--batch-size 2 --accum-steps 2"):
        train.main(tiny_args + ["--epochs1", "1", "--epochs2", "1"])
    with pytest.raises(
        SystemExit, match="--batch-size 25 --accum-steps 3"
    ):  # 75 = 25 x 3, not 37 x 2
        train.main(tiny_args + ["--epochs1", "1", "--batch-size", "75"])


def run_until_killed(args, line_seen):
    """Start a training process and SIGKILL it as soon as it logs line_seen: the checkpoints of
    that epoch are being written right then."""
    run = Forked(train.main, args, stderr=True)
    for line in run.stderr:
        if line_seen in line:
            run.kill()
            break
    return run.wait()


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


def nan_at_training_batch(monkeypatch, n):
    """The loss of the n-th training batch (validation's are not counted) comes out NaN, as a
    diverging run's does: its gradients, and after the step the weights, are NaN too."""
    real, calls = train.loss_of, [0]

    class Spoilt(torch.nn.Module):
        def __init__(self, criterion):
            super().__init__()
            self.criterion = criterion

        def forward(self, logits, targets):
            loss = self.criterion(logits, targets)
            if logits.requires_grad:  # training's, not validation's
                calls[0] += 1
                if calls[0] == n:
                    return loss * float("nan")
            return loss

    def loss(*args, **options):
        return Spoilt(real(*args, **options))

    monkeypatch.setattr(train, "loss_of", loss)


def test_a_loss_gone_bad_mid_epoch_is_never_saved_and_the_advice_goes_on_at_a_lower_rate(
    tiny_args, tmp_path, monkeypatch
):
    """Saved after every step (--save-every-steps 1), the run's 7th batch (Phase II's 3rd) goes
    NaN: last.pt stays the position before it, finite, and the command the message gives goes on
    from there at the lower rate, to the end."""
    out = tmp_path / "ck"
    with monkeypatch.context() as patch:
        nan_at_training_batch(patch, 7)
        with pytest.raises(SystemExit) as stop:
            train.main(tiny_args + ["--epochs1", "1", "--epochs2", "2", "--save-every-steps", "1"])
    message = str(stop.value)
    assert "phase 2 epoch 1: the loss was not finite in 1 batches" in message, message
    assert f"{out / 'last.pt'} (phase 2, 2 batches into epoch 1)" in message
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["phase"], last["epoch"], last["step"]) == (2, 0, 2)
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    advice = re.search(r"python train.py (--resume \S+ --lr2 \S+)", message).group(1).split()
    assert float(advice[-1]) < 5e-4
    train.main(advice)
    done = torch.load(out / "last.pt", weights_only=True)
    assert (done["phase"], done["epoch"], done["args"]["lr2"]) == (2, 2, float(advice[-1]))
    lrs = [r["lr"] for r in done["history"] if r["phase"] == 2]
    assert lrs == pytest.approx([float(advice[-1]) * 0.1, float(advice[-1])])  # warmup, peak
    assert all(torch.isfinite(v).all() for v in done["model"].values() if v.is_floating_point())


def test_save_every_zero_keeps_no_periodic_checkpoint(tiny_args, tmp_path):
    train.main(tiny_args + ["--epochs1", "0", "--epochs2", "2", "--save-every", "0"])
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.pt")) == ["best.pt", "last.pt"]


def test_batch_norm_measured_again_never_sees_a_batch_of_one(tmp_path, narrow_models):
    """17 training images in batches of 4 at 16 px: the last batch, one image of 1 x 1 features
    at layer4, is one batch norm cannot measure (it raised at the run's very end)."""
    data = make_dataset(tmp_path / "data")
    (data / "train" / "eel" / "005.png").unlink()
    args = ["--data", str(data), "--out", str(tmp_path / "ck"), *TINY, "--average-last", "2"]
    train.main(args + ["--epochs1", "0", "--epochs2", "2"])
    assert (tmp_path / "ck" / "averaged.pt").is_file()
