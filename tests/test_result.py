import re

import torch

import train


def test_recipe_best_returns_the_better_of_the_best_epoch_and_the_average(
    tiny_args, tmp_path, capsys
):
    train.main(tiny_args + ["--recipe", "best", "--epochs1", "1", "--epochs2", "3"])
    out = tmp_path / "ck"
    assert sorted(p.name for p in out.glob("epoch*.pt")) == [
        "epoch002.pt",
        "epoch003.pt",
        "epoch004.pt",
    ]
    last = torch.load(out / "last.pt", weights_only=True)
    saved = last["args"]  # the resolved values
    assert (saved["recipe"], saved["ema"], saved["lr_decay"], saved["average_last"]) == (
        "best",
        0.99,
        0.7,
        3,
    )
    averaged = torch.load(out / "averaged.pt", weights_only=True)
    assert averaged["averaged"] == [str(out / f"epoch00{n}.pt") for n in (2, 3, 4)]
    best = torch.load(out / "best.pt", weights_only=True)
    best_epoch = max(max(r["val_acc"], r["ema_val_acc"]) for r in last["history"])
    assert ("averaged" in best) == (averaged["val_acc"] > best_epoch)
    assert isinstance(best["tta"], bool)
    err = capsys.readouterr().err
    # Epochs named as the log's lines name them, with the files they were kept in.
    average = "the average of phase 2 epochs 1-3 (epoch002.pt to epoch004.pt): val acc"
    assert average in err and "test-time augmentation" in err
    if "averaged" in best:  # one best: the last line names what best.pt holds
        assert re.search(r"best val acc \S+, the average of phase 2 epochs 1-3 -> ", err)
    else:
        assert re.search(r"best val acc \S+ \(phase \d epoch \d, the weights", err)
    # Run again, the run finished: nothing to train, the same choice.
    train.main(["--resume", str(out / "last.pt")])
    again = torch.load(out / "best.pt", weights_only=True)
    assert again["tta"] == best["tta"]
    for key, value in best["model"].items():
        assert torch.equal(value, again["model"][key]), key


def test_a_run_continued_after_its_average_won_keeps_the_average_unless_an_epoch_beats_it(
    tiny_args, tmp_path
):
    out = tmp_path / "ck"
    train.main(tiny_args + ["--epochs1", "0", "--epochs2", "2"])
    last = torch.load(out / "last.pt", weights_only=True)
    for record in last["history"]:  # epochs any later epoch beats
        record["val_acc"] = 0.0
    torch.save(last, out / "last.pt")
    best = torch.load(out / "best.pt", weights_only=True)  # as --average-last leaves a winner
    torch.save({**best, "averaged": ["e1.pt", "e2.pt"], "val_acc": 0.99}, out / "best.pt")
    train.main(["--resume", str(out / "last.pt"), "--epochs2", "4"])
    kept = torch.load(out / "best.pt", weights_only=True)
    assert kept.get("averaged") == ["e1.pt", "e2.pt"] and kept["val_acc"] == 0.99


def test_the_command_saved_is_the_one_typed_relative_paths_and_all(
    dataset, tmp_path, monkeypatch, narrow_models
):
    from conftest import TINY

    monkeypatch.chdir(dataset.parent)
    typed = ["--data", dataset.name, "--out", "ck", *TINY, "--epochs1", "0", "--epochs2", "1"]
    train.main(typed)
    state = torch.load(dataset.parent / "ck" / "best.pt", weights_only=True)
    assert state["command"] == "python train.py " + " ".join(typed)
    train.main(["--resume", "ck/last.pt", "--epochs2", "2"])  # continued: the first command
    assert (
        torch.load(dataset.parent / "ck" / "best.pt", weights_only=True)["command"]
        == (state["command"])
    )


def test_average_last_continued_with_more_epochs_than_were_kept_says_how_many_and_what_to_do(
    tiny_args, tmp_path, capsys
):
    out = tmp_path / "ck"
    train.main(tiny_args + ["--epochs1", "0", "--epochs2", "3", "--average-last", "2"])
    assert sorted(p.name for p in out.glob("epoch*.pt")) == ["epoch002.pt", "epoch003.pt"]
    capsys.readouterr()
    train.main(["--resume", str(out / "last.pt"), "--average-last", "3"])
    err = capsys.readouterr().err
    assert (
        "--average-last 3: of the last 3 Phase II epochs (phase 2 epochs 1-3), 2 are kept in "
        f"{out} "
        "(epoch002.pt, epoch003.pt): the run kept fewer as they ended. No average; "
        "--average-last 2 averages the 2 kept"
    ) in err
    train.main(["--resume", str(out / "last.pt"), "--average-last", "2"])  # as it says
    assert (
        "the average of phase 2 epochs 2-3 (epoch002.pt to epoch003.pt): val acc"
        in capsys.readouterr().err
    )


def test_average_last_of_a_run_with_one_phase_ii_epoch_says_to_train_more(
    tiny_args, tmp_path, capsys
):
    out = tmp_path / "ck"
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "1", "--average-last", "2"])
    assert (
        "--average-last 2: the run has 1 Phase II epoch, and an average needs 2: no average; "
        f"train more (--resume {out / 'last.pt'} --epochs2 N)"
    ) in capsys.readouterr().err
    assert not (out / "averaged.pt").exists()
