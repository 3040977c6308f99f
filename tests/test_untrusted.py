"""Checkpoints and weights are untrusted files: loading one never runs code it carries."""

import os

import pytest
import torch

import evaluate
import predict
import train
from conftest import TINY


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "it-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": RunsACommand(marker), "classes": ["a"], "args": {}}, path)
    return path, marker


def test_every_script_refuses_a_checkpoint_that_would_run_code(evil, dataset, tmp_path):
    path, marker = evil
    calls = [
        lambda: train.main(["--resume", str(path)]),
        lambda: train.main(
            ["--data", str(dataset), "--out", str(tmp_path / "ck"), *TINY, "--weights", str(path)]
        ),
        lambda: evaluate.main(["--ckpt", str(path)]),
        lambda: evaluate.main(["--compare", str(path)]),
        lambda: predict.main(["--ckpt", str(path)]),
    ]
    for call in calls:
        with pytest.raises(SystemExit, match="(?i)cannot load|weights only|unpickl"):
            call()
    assert not marker.exists()
