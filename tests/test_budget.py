import re
import types

import pytest
import torch

import train
from twophase import budget, checks, schedule
from twophase.resolve import resolve, split_budget


def test_durations_read_as_a_user_writes_them():
    assert [checks.duration(t) for t in ("90m", "2h", "1h30m", "600s", "1.5h")] == [
        5400,
        7200,
        5400,
        600,
        5400,
    ]
    with pytest.raises(Exception, match="not a duration"):
        checks.duration("90")  # minutes? seconds? said, not guessed


def test_the_largest_budget_of_epochs_that_fits_is_chosen_around_the_epochs_given():
    epoch = {1: 9.0, 2: 17.0}  # seconds an epoch of each phase takes

    def epochs(phase, split):
        return split[f"epochs{phase}"] * epoch[phase]

    assert budget.epochs_within(57, epochs, 0)[:2] == (3, split_budget(3))  # 1 + 2: 43 s
    assert budget.epochs_within(57, epochs, 20)[0] == 2  # the end's 20 s leave room for 1 + 1
    assert budget.epochs_within(25, epochs, 0) is None  # not even 1 + 1 (26 s)
    total, split, cost = budget.epochs_within(100, epochs, 0, kept={"epochs1": 0})

    assert (split["epochs1"], split["epochs2"], cost) == (0, 5, 85)  # Phase II alone


def test_a_time_budget_picks_the_epochs_from_the_speed_measured_and_a_resume_keeps_them(
    tiny_args, tmp_path, monkeypatch, capsys
):
    speed = {"step1": 2.0, "step2": 4.0, "validation": 1.0, "save": 0.0}
    monkeypatch.setattr(train, "time_steps", lambda run, training: speed)  # 4 batches: 9 s and 17 s
    train.main(tiny_args + ["--time-budget", "60s"])
    err = capsys.readouterr().err
    assert "an epoch 9.0 s in Phase I, 17.0 s in Phase II" in err
    assert "So --epochs 3 (1 + 2, 1 warmup)" in err and "within its budget" in err  # TINY's 1
    last = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert [last["args"][k] for k in ("epochs", "epochs1", "epochs2", "time_budget")] == [
        3,
        1,
        2,
        60,
    ]
    assert len(last["history"]) == 3
    # Resumed, with the same budget given again, as a job script does: the run keeps its plan.
    train.main(["--resume", str(tmp_path / "ck" / "last.pt"), "--time-budget", "60s"])
    assert "So --epochs" not in capsys.readouterr().err
    train.main(["--resume", str(tmp_path / "ck" / "last.pt"), "--epochs2", "3"])
    assert torch.load(tmp_path / "ck" / "last.pt", weights_only=True)["epoch"] == 3
    # Phase II alone: Phase I's epochs of the split cost nothing, for they do not train.
    phase2 = tiny_args + ["--time-budget", "60s", "--phase", "2", "--out", str(tmp_path / "p2")]
    train.main(phase2)
    assert torch.load(tmp_path / "p2" / "last.pt", weights_only=True)["args"]["epochs2"] == 3
    # Going on from phase1.pt, Phase I is done: it costs nothing either, as with --phase 2.
    phase1 = tmp_path / "p1"
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0", "--out", str(phase1)])
    budget = ["--time-budget", "60s"]
    train.main(["--resume", str(phase1 / "phase1.pt"), *budget, "--out", str(tmp_path / "r")])
    train.main(["--phase", "2", "--out", str(phase1), *budget])
    planned = [torch.load(tmp_path / f / "last.pt", weights_only=True)["args"] for f in ("r", "p1")]
    assert [(a["epochs1"], a["epochs2"]) for a in planned] == [(1, 3), (1, 3)]

    with pytest.raises(SystemExit, match="--time-budget 120.0 .* a time budget chooses"):
        train.main(["--resume", str(tmp_path / "ck" / "last.pt"), "--time-budget", "2m"])


def test_timing_the_steps_leaves_the_run_as_it_was(tiny_args, tmp_path, monkeypatch):
    """time_steps trains copies: the run's weights, batch norm statistics and random state are
    those it had, so a budgeted run trains as an unbudgeted one of its epochs would."""
    seen = {}

    def spy(run, training):
        before = {k: v.clone() for k, v in run.model.state_dict().items()}
        rng = torch.get_rng_state()
        seen["speed"] = speed = real(run, training)
        assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
        assert torch.equal(rng, torch.get_rng_state())
        return speed

    real = train.time_steps
    monkeypatch.setattr(train, "time_steps", spy)
    with pytest.raises(SystemExit, match="Not even --epochs 2 fits"):
        train.main(tiny_args + ["--time-budget", "0.1s"])
    assert set(seen["speed"]) == {"step1", "step2", "validation", "save", "per_image", "decode"}
    assert all(v > 0 for v in seen["speed"].values())
    assert not (tmp_path / "ck").exists()  # nothing written, no folder left


def test_where_standard_error_is_no_terminal_an_epoch_says_how_it_goes(
    tiny_args, monkeypatch, capsys
):
    monkeypatch.setattr(budget, "PROGRESS_EVERY", 0.0)
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "1"])
    err = capsys.readouterr().err
    # Phase II is not timed until it trains (with --time-budget it is, from the start).
    assert re.search(r"phase 1 epoch 1/1: 2/4 batches, \d+ img/s; Phase II not timed yet", err)
    assert re.search(r"phase 1 epoch   1/1 .* \| Phase II not timed yet", err)
    assert re.search(r"phase 2 epoch 1/1: 2/4 batches, \d+ img/s; run left .*, ends \d\d:\d\d", err)
    assert re.search(r"phase 2 epoch   1/1 .* \| run left \d", err)


def test_the_time_budget_counts_the_caches_test_size_auto_builds(tiny_args, tmp_path):
    run = types.SimpleNamespace(
        args=resolve(tiny_args + ["--test-size", "auto"]).options,
        splits=types.SimpleNamespace(val=[0] * 100, train=[0] * 400),
        world_size=1,
    )
    speed = {"validation": 1.0, "per_image": 0.01, "decode": 0.0}
    without = budget.Forecast(run).end_seconds(speed)
    with_decoding = budget.Forecast(run).end_seconds({**speed, "decode": 0.05})
    assert with_decoding - without == pytest.approx(2 * 100 * 0.05)  # two sizes, 100 images each


def test_a_time_budget_shortens_phase_two_when_its_epochs_run_slower_than_timed(
    tiny_args, tmp_path, monkeypatch, capsys
):
    speed = {"step1": 2.0, "step2": 4.0, "validation": 1.0, "save": 0.0}  # epochs of 9 s, 17 s
    monkeypatch.setattr(train, "time_steps", lambda run, training: speed)
    real = train.epoch_record

    def slow(*args):  # each epoch as it ran: 30 s, where the steps timed foretold 17
        return real(*args) | {"seconds": 29.0, "val_seconds": 1.0}

    monkeypatch.setattr(train, "epoch_record", slow)
    train.main(tiny_args + ["--time-budget", "120s"])
    err = capsys.readouterr().err
    assert "So --epochs 7 (1 + 6, 1 warmup)" in err  # as planned from the steps timed
    assert (
        "at 30.0 s a Phase II epoch as they ran, the run would end past its budget; so 5 Phase "
        "II epochs, not 6, the cosine over the last 4" in err
    )  # decided after Phase II's second epoch: its first warms up
    last = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert (last["args"]["epochs2"], last["args"]["cosine_epochs"], last["epoch"]) == (5, 4, 5)
    rates = [r["lr"] for r in last["history"] if r["phase"] == 2]
    shares = [schedule.WarmupCosine(1, 0.1, 4, 5e-6 / 5e-4)(e) for e in range(5)]
    assert rates == pytest.approx([5e-4 * share for share in shares])  # the first two: alike


def test_a_shortened_phase_two_rises_to_the_full_size_by_its_new_end(
    tiny_args, tmp_path, monkeypatch, capsys
):
    speed = {"step1": 2.0, "step2": 4.0, "validation": 1.0, "save": 0.0}
    monkeypatch.setattr(train, "time_steps", lambda run, training: speed)
    real = train.epoch_record
    monkeypatch.setattr(train, "epoch_record", lambda *a: real(*a) | {"seconds": 29.0})
    train.main(tiny_args + ["--time-budget", "120s", "--img-size", "32", "--progressive", "0.5"])
    assert "so 6 Phase II epochs, not 9" in capsys.readouterr().err
    last = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    sizes = [r["img_size"] for r in last["history"] if r["phase"] == 2]
    assert sizes[0] == 16 and sizes[-1] == 32  # the new ramp ends at the full size


def test_a_resumed_runs_time_budget_line_counts_the_whole_run(
    tiny_args, tmp_path, monkeypatch, capsys
):
    speed = {"step1": 2.0, "step2": 4.0, "validation": 1.0, "save": 0.0}
    monkeypatch.setattr(train, "time_steps", lambda run, training: speed)
    train.main(tiny_args + ["--time-budget", "60s"])
    last = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    torch.save({**last, "history": last["history"][:2], "epoch": 1}, tmp_path / "ck" / "last.pt")
    capsys.readouterr()
    train.main(["--resume", str(tmp_path / "ck" / "last.pt")])
    line = next(s for s in capsys.readouterr().err.splitlines() if s.startswith("--time-budget"))
    words = r"--time-budget 1:00: the run took \S+ s \(this command \S+ s, the epochs before it "
    assert re.match(words + r"\S+ s\), \S+ s within its budget", line), line
