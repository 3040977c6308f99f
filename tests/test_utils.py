import os
import pickle

import pytest
import torch

import utils


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    state = {
        "model": {"w": torch.arange(3.0)},
        "classes": ["a", "b"],
        "args": {"lr": 5e-4, "scale": [0.9, 1.1]},
        "history": [{"phase": 1, "epoch": 1, "val_acc": 0.5}],
        "rng": utils.rng_state(),
        "scaler": None,
    }
    utils.save_checkpoint(state, tmp_path / "ck" / "last.pt")
    loaded = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert (
        torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["args"] == state["args"]
    )
    assert os.listdir(tmp_path / "ck") == ["last.pt"]  # no temporary file left


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    utils.save_checkpoint({"epoch": 1}, path)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        utils.save_checkpoint({"epoch": 2, "bad": lambda: None}, path)  # cannot be pickled
    assert torch.load(path, weights_only=True) == {"epoch": 1} and os.listdir(tmp_path) == [
        "last.pt"
    ]


def test_one_state_under_several_names_each_file_its_own(tmp_path):
    utils.save_checkpoints({"epoch": 1}, [tmp_path / "last.pt", tmp_path / "best.pt"])
    assert torch.load(tmp_path / "best.pt", weights_only=True) == {"epoch": 1}
    torch.save({"edited": True}, tmp_path / "best.pt")  # a user's script rewriting best.pt in place
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"epoch": 1}
    utils.save_checkpoints({"epoch": 2}, [tmp_path / "last.pt"])
    assert torch.load(tmp_path / "best.pt", weights_only=True) == {"edited": True}
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]


def test_bare_checkpoint_name_resolves_in_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    utils.save_checkpoint({"x": 1}, tmp_path / "checkpoints" / "best.pt")
    assert utils.resolve_checkpoint("best.pt") == utils.Path("checkpoints/best.pt")
    with pytest.raises(SystemExit, match="no checkpoint"):
        utils.resolve_checkpoint("missing.pt")


def test_full_history_goes_past_the_checkpoint_epoch(tmp_path):
    rows = [
        {"phase": 1, "epoch": 1, "val_acc": 0.5, "lr": 5e-4},
        {"phase": 2, "epoch": 1, "val_acc": 0.9, "lr": 5e-5},
        {"phase": 2, "epoch": 2, "val_acc": 0.8, "lr": 5e-4},
    ]
    utils.write_history_csv(rows, tmp_path / "history.csv")
    best = {"history": rows[:2]}
    assert utils.full_history(tmp_path / "best.pt", best) == rows
    other_run = {"history": [{"phase": 1, "epoch": 1, "val_acc": 0.1}]}
    assert utils.full_history(tmp_path / "best.pt", other_run) == other_run["history"]


def test_totals_over_processes_count_exactly_past_float32s_range():
    """2**24 + 1 is the first integer float32 cannot hold: an epoch's image count or summed loss
    past it would be rounded."""
    big = 2**24 + 1
    assert utils.sum_over_processes(torch.tensor(big), big, torch.tensor(0.5)) == [big, big, 0.5]
    assert float(torch.tensor(big, dtype=torch.float32)) != big  # what float32 would have given
    # Apple's MPS has no float64: totals there are float32, exact up to 2**24 images.
    assert utils.totals_dtype(torch.device("mps")) == torch.float32
