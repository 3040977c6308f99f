import sys
import types

import pytest

import train
from conftest import stop_at


class Scalars:
    """torch.utils.tensorboard's SummaryWriter, stood in for (tensorboard is not required)."""

    runs = []

    def __init__(self, folder, purge_step=None, flush_secs=None):
        self.folder, self.purge_step, self.scalars = folder, purge_step, []
        Scalars.runs.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step, value))

    def close(self):
        pass


def test_tensorboard_curves_go_on_from_a_resumed_runs_step_and_need_their_package(
    tiny_args, tmp_path, monkeypatch
):
    board = types.ModuleType("torch.utils.tensorboard")
    board.SummaryWriter = Scalars
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", board)
    require = train.require_tensorboard
    monkeypatch.setattr(train, "require_tensorboard", lambda: None)
    options = tiny_args + [
        "--epochs1",
        "1",
        "--epochs2",
        "2",
        "--tensorboard",
        "--tensorboard-every",
        "3",
    ]
    with monkeypatch.context() as patch:
        stop_at(patch, "step=10")  # two batches into Phase II's second epoch, step 10 of 12
        with pytest.raises(SystemExit):
            train.main(options)
    train.main(["--resume", str(tmp_path / "ck" / "last.pt")])
    first, resumed = Scalars.runs[-2:]
    assert first.folder == str(tmp_path / "ck") and (first.purge_step, resumed.purge_step) == (
        0,
        10,
    )
    steps = [
        step for tag, step, _ in first.scalars + resumed.scalars if tag == "train/loss_per_step"
    ]
    assert steps == [3, 6, 9, 12]  # every 3 steps, none twice
    epochs = [step for tag, step, _ in first.scalars + resumed.scalars if tag == "val/accuracy"]
    assert epochs == [4, 8, 12]
    monkeypatch.setattr(train, "require_tensorboard", require)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as where it is not installed
    with pytest.raises(SystemExit, match="needs the tensorboard package.*pip install tensorboard"):
        train.main(tiny_args + ["--tensorboard", "--out", str(tmp_path / "other")])
