"""The checkpoint format: what a checkpoint holds, and that one written by an earlier version of
the code loads and resumes."""

from pathlib import Path

import torch
import torchvision

import train
from conftest import TINY, make_dataset
from narrow import narrow_get_model

# Written by the code as it was before its run state was redesigned (tests/data/README.md): a run
# with every lever that keeps state, stopped by SIGTERM two batches into Phase II.
V1_MID_EPOCH = Path(__file__).parent / "data" / "stopped_mid_epoch_v1.pt"
V1_OPTIONS = (
    TINY
    + (
        "--epochs1 2 --epochs2 3 --ema 0.9 --mixup 0.4 --cutmix 1.0 --lr-decay 0.8 --accum-steps 2"
    ).split()
)


def test_a_checkpoint_of_the_earlier_format_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setattr(
        torchvision.models,
        "get_model",
        narrow_get_model(torchvision.models.get_model, {"resnet18": 4}),  # as it was written
    )
    data = make_dataset(tmp_path / "data")  # the very images it was trained on
    train.main(V1_OPTIONS + ["--data", str(data), "--out", str(tmp_path / "straight")])
    old = torch.load(V1_MID_EPOCH, weights_only=True)
    assert (old["phase"], old["epoch"], old["step"]) == (2, 0, 2)
    resumed = tmp_path / "resumed" / "last.pt"
    resumed.parent.mkdir()
    torch.save(old, resumed)
    train.main(["--resume", str(resumed), "--data", str(data), "--out", str(resumed.parent)])
    a, b = (torch.load(p, weights_only=True) for p in (tmp_path / "straight" / "last.pt", resumed))
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["ema"]["model"].items():
        assert torch.equal(value, b["ema"]["model"][key]), key
    assert [r["val_acc"] for r in a["history"]] == [r["val_acc"] for r in b["history"]]
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
