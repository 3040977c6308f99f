import subprocess
import sys

import torch

import utils
from conftest import REPO


def test_totals_over_processes_count_exactly_past_float32s_range():
    """2**24 + 1 is the first integer float32 cannot hold: an epoch's image count or summed loss
    past it would be rounded."""
    big = 2**24 + 1
    assert utils.sum_over_processes(torch.tensor(big), big, torch.tensor(0.5)) == [big, big, 0.5]
    assert float(torch.tensor(big, dtype=torch.float32)) != big  # what float32 would have given
    # Apple's MPS has no float64: totals there are float32, exact up to 2**24 images.
    assert utils.totals_dtype(torch.device("mps")) == torch.float32


def test_before_the_process_group_exists_only_the_first_process_logs(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    utils.log("once")
    monkeypatch.setenv("RANK", "0")
    utils.log("once")
    assert capsys.readouterr().err == "once\n"


# What Windows lacks, taken away: fcntl cannot be imported and there is no SIGUSR1. A run, a
# resume, evaluate.py and predict.py run; the folder's lock and the overwrite guard still hold.
WITHOUT_FCNTL = """
import signal, sys, warnings
sys.modules["fcntl"] = None  # import fcntl raises ImportError, as on Windows
del signal.SIGUSR1
warnings.simplefilter("ignore")  # filelock: "only soft file lock is available"
sys.path[:0] = [{repo!r}, {tests!r}]
import torchvision
from narrow import narrow_get_model
torchvision.models.get_model = narrow_get_model(torchvision.models.get_model)
import filelock, utils, train, evaluate, predict
from pathlib import Path
from conftest import TINY, make_dataset
root = Path({root!r})
assert filelock.FileLock.__name__ != "UnixFileLock", filelock.FileLock
assert not hasattr(signal, "SIGUSR1") and signal.SIGTERM in utils.StopRequest.SIGNALS
ck = root / "ck"
run = ["--data", str(make_dataset(root / "data")), *TINY, "--epochs1", "1", "--epochs2", "1"]
train.main([*run, "--out", str(ck)])
train.main(["--resume", str(ck / "last.pt"), "--epochs2", "2"])
evaluate.main(["--ckpt", str(ck / "best.pt"), "--figures", str(root / "figures")])
predict.main(["--ckpt", str(ck / "best.pt"), "--out", str(root / "prediction.csv")])
with utils.exclusive(ck / ".lock", "held by this test"):
    try:
        train.main(["--resume", str(ck / "last.pt"), "--epochs2", "3"])
        raise AssertionError("a run took a folder another holds")
    except SystemExit as refused:
        assert "is in use by process" in str(refused), refused
try:
    train.main([*run, "--out", str(ck)])
    raise AssertionError("a fresh run overwrote a run")
except SystemExit as refused:
    assert "holds a run" in str(refused), refused
print("all held", len(Path(root / "prediction.csv").read_text().splitlines()))
"""


def test_without_fcntl_and_sigusr1_as_on_windows_the_pipeline_runs_and_the_guards_hold(tmp_path):
    code = WITHOUT_FCNTL.format(repo=str(REPO), tests=str(REPO / "tests"), root=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "all held 6" in result.stdout  # a header and the dataset's 5 test images
