"""The LR range test: its rates, its smoothing and its valley rule on curves drawn here; --find-lr,
which writes its curves, prints the rates and trains nothing; --lr1/--lr2 auto, which leave the
run as it was but for the rate, save it as a number and never run again on a resume; drawn
options of the run; and two processes that agree."""

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import train
from conftest import NO_AUGMENT, TINY, examples, make_dataset
from test_distributed import forked_ddp
from twophase import lr_find, schedule
from twophase.lr_find import Curve, Training, rates, smoothed, suggestion
from twophase.table1 import table1

STEPS = ["--find-lr-steps", "20"]


def curve_of(losses, planned=None):
    """A sweep's curve as lr_find records one: `losses` at the rates of a sweep of `planned`
    steps (of len(losses) by default)."""
    losses = [float(v) for v in losses]
    return Curve(
        rates(planned or len(losses))[: len(losses)],
        losses,
        smoothed(losses),
        planned or len(losses),
    )


def fastai_valley(losses):
    """fastai's valley, as fastai 2.7 writes it (fastai/callback/schedule.py), for comparison:
    the index of the rate it suggests."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1):
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return max_start + int(sections) + int(sections / 2)


# ----------------------------------------------------------------------------- the rule


def test_the_rates_rise_by_one_factor_from_1e7_to_10():
    swept = rates(100)
    assert swept[0] == pytest.approx(1e-7) and swept[-1] == pytest.approx(10)
    ratios = np.array(swept[1:]) / np.array(swept[:-1])
    assert np.allclose(ratios, ratios[0]) and ratios[0] > 1


def test_the_smoothed_loss_is_debiased_and_a_sweep_stops_where_it_diverges():
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # not pulled towards 0
    assert not lr_find.diverging([2.0, 1.0, 3.9])
    assert lr_find.diverging([2.0, 1.0, 4.1])  # 4 times its lowest
    assert lr_find.diverging([2.0, 1.0, math.nan])


def test_a_curve_with_a_valley_suggests_a_rate_on_its_way_down():
    """The loss falls from 1e-4 to 1e-1 and rises past it: the rate is in the fall, before the
    lowest loss, as fastai's valley puts it."""
    lrs = np.array(rates(100))
    x = np.log10(lrs)
    losses = 2 - 1 / (1 + np.exp(-2 * (x + 2.5))) + np.maximum(0, x + 1) ** 2
    found = suggestion(curve_of(losses))
    lowest = lrs[np.argmin(losses)]
    assert 1e-4 < found.lr < lowest
    assert found.lr == curve_of(losses).lrs[found.index]


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.floats(0.1, 10), min_size=5, max_size=60))
def test_the_valley_is_fastais(losses):
    """Over drawn curves: the index lr_find's valley takes is the one fastai's code takes, but
    where fastai's is -1 (a valley from the first point, two or three long), which Python reads
    as the last rate, the diverging end: there it is the first."""
    assert lr_find.valley(losses) == max(0, fastai_valley(losses))


@pytest.mark.parametrize(
    "losses, words",
    [
        ([1.0 + 1e-4 * math.sin(i) for i in range(100)], "flat, or rises from the start"),
        ([1.0 + 0.01 * i for i in range(100)], "flat, or rises from the start"),
        ([1.0, 1.2, 1.5, 2.0, 3.0, 9.0], "diverged after 6 of 100 steps"),
    ],
    ids=["flat", "rising", "diverged at once"],
)
def test_a_curve_without_a_valley_suggests_nothing_and_says_why(losses, words):
    found = suggestion(curve_of(losses, planned=100))
    assert found.lr is None and words in found.why


# ----------------------------------------------------------------------------- --find-lr


def test_find_lr_writes_its_curves_prints_the_rates_and_trains_nothing(
    tiny_args, tmp_path, capsys, monkeypatch
):
    """Both phases' curves in the run's figures folder (figures/ck for --out ck), a user's file
    at their names set aside, not replaced; the rates on standard output, swept as specified (the
    --lr-decay groups scaled together); no run written."""
    steps = recorded_rates(monkeypatch)
    figures = Path("figures") / "ck"
    figures.mkdir(parents=True)
    (figures / "lr_find_phase1.png").write_text("a file of mine")
    run = train.main(tiny_args + ["--find-lr", *STEPS, "--lr-decay", "0.7"])
    out, err = capsys.readouterr()
    assert re.fullmatch(r"--lr1 (\S+) --lr2 (\S+)\n", out), out
    lr1, lr2 = (float(v) for v in re.findall(r"--lr\d (\S+)", out))
    assert 0 < lr1 < 10 and 0 < lr2 < 10
    assert "valley rule: --lr1" in err and "starts from a head fitted 20 steps" in err
    assert not (tmp_path / "ck").exists()  # no checkpoint, no history, no folder
    assert run.history == []
    assert sorted(p.name for p in figures.iterdir()) == [
        ".written.json",
        "lr_find_phase1.csv",
        "lr_find_phase1.png",
        "lr_find_phase1.replaced.png",
        "lr_find_phase2.csv",
        "lr_find_phase2.png",
    ]
    assert (figures / "lr_find_phase1.replaced.png").read_text() == "a file of mine"
    sweep1, fit, sweep2 = steps[:20], steps[20:40], steps[40:]
    assert {number for number, _ in sweep1 + fit} == {1} and {n for n, _ in sweep2} == {2}
    assert all(lrs == [pytest.approx(lr1, rel=0.01)] for _, lrs in fit)  # the head, fitted
    for number, sweep in ((1, sweep1), (2, sweep2)):
        with open(figures / f"lr_find_phase{number}.csv") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["step", "lr", "loss", "smoothed_loss"]
        assert [float(r["lr"]) for r in rows] == pytest.approx(rates(20)[: len(rows)], rel=1e-5)
        assert [lrs[0] for _, lrs in sweep] == pytest.approx(rates(20)[: len(rows)])
        smooth = [float(r["smoothed_loss"]) for r in rows]
        assert len(rows) == 20 or smooth[-1] > 4 * min(smooth)  # fewer only where it diverged
    shares = {tuple(round(lr / lrs[0], 9) for lr in lrs) for _, lrs in sweep2}
    assert len(shares) == 1 and len(next(iter(shares))) > 1  # the groups, scaled together


def test_phase_twos_range_test_starts_from_the_runs_trained_head(tiny_args, tmp_path, capsys):
    """--phase 2 --find-lr from <out>/phase1.pt: its head, trained; a fresh --find-lr in that
    folder: phase1.pt's head too; without one, a head fitted first (the test above)."""
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0"])
    capsys.readouterr()
    train.main(tiny_args + ["--phase", "2", "--epochs2", "2", "--find-lr", *STEPS])
    err = capsys.readouterr().err
    assert "Phase II (every layer) LR range test" in err
    assert "head fitted" not in err and "starts from the head of" not in err  # the run's own
    train.main(tiny_args + ["--find-lr", *STEPS])
    err = capsys.readouterr().err
    assert f"starts from the head of {tmp_path / 'ck' / 'phase1.pt'}" in err
    assert "head fitted" not in err


def recorded_rates(monkeypatch):
    """The rate of every parameter group at each optimizer step train.py takes, by phase."""
    seen, real = [], train.optimizer_steps

    def recording(net, batches, total, phase, ema, tally):
        for done in real(net, batches, total, phase, ema, tally):
            seen.append((phase.number, [group["lr"] for group in phase.optimizer.param_groups]))
            yield done

    monkeypatch.setattr(train, "optimizer_steps", recording)
    return seen


# ----------------------------------------------------------------------------- auto


def test_an_auto_rate_leaves_the_run_as_it_was_and_trains_at_the_suggestion(
    tiny_args, tmp_path, monkeypatch, capsys
):
    """--lr2 auto sweeps a copy as Phase II starts from the head Phase I trained, and puts back
    the weights, batch norm statistics and global random state (drawn from here by every step of
    the sweep, so that a missed restore shows): the run then trains exactly as one given the
    rate found. The rate is saved as --lr2's value (Table 1 says it was found so); a resume, given
    `--lr2 auto` again, trains on at it without a new test; a run whose Phase II began at a rate
    given is refused `--lr2 auto`, in a sentence."""
    tests = []

    def spy(run, number, training, head_rate=None):
        before = {k: v.clone() for k, v in run.model.state_dict().items()}
        trainable = [p.requires_grad for p in run.model.parameters()]
        rng = torch.get_rng_state()
        tests.append([r["phase"] for r in run.history])
        found = real(run, number, Training(training.phase_setup, drawing(training)), head_rate)
        assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
        assert trainable == [p.requires_grad for p in run.model.parameters()]
        assert torch.equal(rng, torch.get_rng_state())
        return found

    real = lr_find.range_test
    monkeypatch.setattr(lr_find, "range_test", spy)
    two = ["--epochs1", "1", "--epochs2", "2", *STEPS]
    train.main(tiny_args + two + ["--lr2", "auto"])
    assert tests == [[1]]  # Phase II's alone, after Phase I's epoch
    state = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    lr2 = state["args"]["lr2"]
    assert isinstance(lr2, float) and lr2 > 0 and state["args"]["lr_found"] == {"lr2": lr2}
    assert "the LR range test's, valley rule" in "\n".join(table1(state, tmp_path))
    err = capsys.readouterr().err
    assert "--lr2 auto: Phase II (every layer) LR range test: " in err
    assert "head fitted" not in err  # from the head Phase I trained

    given = tiny_args[:3] + [str(tmp_path / "given")] + tiny_args[4:]
    train.main(given + two + ["--lr2", repr(lr2)])
    other = torch.load(tmp_path / "given" / "last.pt", weights_only=True)
    assert [r["train_loss"] for r in other["history"]] == [
        r["train_loss"] for r in state["history"]
    ]
    for key, value in state["model"].items():  # weights and batch norm statistics alike
        assert torch.equal(value, other["model"][key]), key

    train.main(["--resume", str(tmp_path / "ck" / "last.pt"), "--epochs2", "3", "--lr2", "auto"])
    resumed = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert len(tests) == 1 and resumed["args"]["lr2"] == lr2 and resumed["epoch"] == 3
    with pytest.raises(SystemExit, match="the range test runs as Phase II starts"):
        train.main(["--resume", str(tmp_path / "given" / "last.pt"), "--lr2", "auto"])


def drawing(training):
    """`training`'s steps, each drawing from the global random generator."""

    def steps(*args):
        for done in training.optimizer_steps(*args):
            torch.rand(1)
            yield done

    return steps


def test_an_auto_rate_of_a_phase_to_come_is_saved_as_auto_and_found_when_it_comes(
    tiny_args, tmp_path
):
    """A run stopped before Phase II saves --lr2 auto as it is: resumed, Phase II's range test
    runs as it starts (from phase1.pt with --phase 2 too)."""
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0", "--lr2", "auto", *STEPS])
    assert torch.load(tmp_path / "ck" / "phase1.pt", weights_only=True)["args"]["lr2"] == "auto"
    train.main(["--phase", "2", "--out", str(tmp_path / "ck"), "--epochs2", "1"])
    args = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)["args"]
    assert isinstance(args["lr2"], float) and args["lr_found"] == {"lr2": args["lr2"]}


@pytest.mark.parametrize(
    "recipe, rate, whose",
    [([], 5e-4, "Table 1's"), (["--recipe", "fast"], 1e-2, "--recipe fast's")],
)
def test_a_curve_without_a_valley_trains_at_the_rate_without_auto_saying_so(
    tiny_args, tmp_path, monkeypatch, capsys, recipe, rate, whose
):
    """A run left to train by itself is not stopped by a curve too noisy to read: it trains at
    the rate it would have had, says so, and Table 1 too; a continued run keeps that rate."""
    monkeypatch.setattr(lr_find, "suggestion", lambda curve: lr_find.Suggestion(None, why="flat"))
    run = train.main(
        tiny_args + recipe + ["--lr1", "auto", "--epochs1", "1", "--epochs2", "0", *STEPS]
    )
    err = capsys.readouterr().err
    assert (
        f"warning: --lr1 auto: no rate suggested, so Phase I trains at --lr1 {rate:g}, {whose}"
        in err
    )
    assert run.args.lr1 == rate and run.args.lr_unfound == ["lr1"]
    state = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert "the LR range test suggested none" in "\n".join(table1(state, tmp_path))
    again = train.main(
        ["--resume", str(tmp_path / "ck" / "last.pt"), "--lr1", "auto", "--epochs1", "2"]
    )
    assert again.args.lr1 == rate and "range test" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--lr1", "fast"], "not a learning rate: 'fast'"),
        (["--lr2", "0"], "--lr2 0.0: a learning rate must be more than 0"),
        (["--find-lr-steps", "5"], "--find-lr-steps 5: the range test needs 20 steps or more"),
    ],
)
def test_a_rate_is_a_positive_number_or_auto(argv, words, capsys):
    with pytest.raises(SystemExit):
        train.main(argv)
    assert words in capsys.readouterr().err


# ----------------------------------------------------------------------------- drawn options


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """A dataset whose head a few steps fit (8 images a class), for the drawn runs."""
    return make_dataset(tmp_path_factory.mktemp("learnable") / "data", per_class=8)


@settings(
    max_examples=examples(3),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    batch=st.integers(3, 6),
    accum=st.integers(1, 3),
    optimizer=st.sampled_from(sorted(schedule.OPTIMIZERS)),
    levers=st.sampled_from(
        [[], ["--lr-decay", "0.7"], ["--class-weights", "auto"], ["--sampler", "balanced"]]
    ),
)
def test_over_drawn_options_the_sweep_runs_and_suggests_a_finite_positive_rate(
    learnable, tmp_path_factory, narrow_models, capsys, batch, accum, optimizer, levers
):
    """Phase II's range test (its head fitted first: --phase 2 without phase1.pt) over a drawn
    batch, accumulation, optimizer and lever: it runs, within the rates swept, and suggests a
    finite rate above 0."""
    out = tmp_path_factory.mktemp("drawn") / "ck"
    options = ["--batch-size", str(batch), "--accum-steps", str(accum), "--optimizer2", optimizer]
    argv = ["--data", str(learnable), "--out", str(out), *TINY, *NO_AUGMENT, "--lr1", "1e-2"]
    train.main(argv + ["--phase", "2", "--find-lr", "--find-lr-steps", "30", *options, *levers])
    printed = capsys.readouterr().out
    assert re.fullmatch(r"--lr2 \S+\n", printed), printed
    lr2 = float(printed.split()[1])
    assert math.isfinite(lr2) and 1e-7 <= lr2 <= 10


# ----------------------------------------------------------------------------- processes


def test_two_processes_sweep_their_shares_and_agree_on_the_suggestion(
    tmp_path, narrow_models, monkeypatch
):
    """Under DDP (two gloo processes) every process sweeps its own share of each batch, the
    losses averaged over both: the same curve and the same suggestion in each."""
    real = lr_find.range_test

    def recorded(run, number, training, head_rate=None):
        curve, found, start = real(run, number, training, head_rate)
        record = {"losses": curve.losses, "lr": found.lr}
        (tmp_path / f"phase{number}_rank{run.rank}.json").write_text(json.dumps(record))
        return curve, found, start

    monkeypatch.setattr(lr_find, "range_test", recorded)  # forked: the processes have it too
    data = make_dataset(tmp_path / "data", per_class=8)
    argv = ["--data", data, "--out", tmp_path / "ck", *TINY, *NO_AUGMENT, "--find-lr"]
    assert forked_ddp([*argv, "--find-lr-steps", "30", "--phase", "1"], tmp_path) == [0, 0]
    one, two = (json.loads((tmp_path / f"phase1_rank{r}.json").read_text()) for r in (0, 1))
    assert one == two and one["lr"] is not None and one["lr"] > 0
    assert len(one["losses"]) > 1


def test_a_time_budget_counts_the_range_tests_to_come(tiny_args, monkeypatch, capsys):
    """--lr2 auto under --time-budget: the planner counts Phase II's range test (20 steps at 4 s
    a Phase II step: 80 s) before it chooses the epochs."""
    speed = {"step1": 2.0, "step2": 4.0, "validation": 1.0, "save": 0.0}
    monkeypatch.setattr(train, "time_steps", lambda run, training: speed)  # epochs of 9 s and 17 s
    auto = ["--lr2", "auto", *STEPS]
    with pytest.raises(SystemExit, match="1:20 for the LR range tests to come. Not even"):
        train.main(tiny_args + auto + ["--time-budget", "70s"])  # 1 + 1 epochs would fit
    train.main(tiny_args + auto + ["--time-budget", "150s"])
    assert "So --epochs 4 (1 + 3" in capsys.readouterr().err  # 1 + 8 without the test


def test_with_l2sp_the_sweep_decays_only_the_head_as_training_does(tiny_args, monkeypatch):
    """--lr2 auto --l2sp: the range test steps the objective Phase II trains, the backbone pulled
    towards its start and not decayed as well."""
    seen, real = [], lr_find.set_rate

    def spy(phase, lr):
        if phase.number == 2 and not seen:
            seen.extend(
                (g["weight_decay"], phase.l2sp.pulls(g)) for g in phase.optimizer.param_groups
            )
        return real(phase, lr)

    monkeypatch.setattr(lr_find, "set_rate", spy)
    argv = ["--epochs1", "1", "--epochs2", "1", "--l2sp", "0.01", "--wd2", "0.5"]
    train.main(tiny_args + argv + ["--phase", "2", "--find-lr", *STEPS])
    assert sorted(seen) == [(0.0, True), (0.5, False)]


@pytest.mark.parametrize(
    "argv, seconds",
    [
        (["--lr1", "auto"], 20 * 2.0),
        (["--lr1", "auto", "--epochs1", "0"], 0.0),  # no Phase I: no test of its rate
        (["--lr1", "auto", "--phase1-features", "1"], 20 * (0.5 + 3.0)),  # it sweeps on images
        (["--lr2", "auto"], 20 * 4.0),
        (["--lr2", "auto", "--epochs1", "0"], 20 * (4.0 + 2.0)),  # the head fitted first
        (["--lr2", "auto", "--epochs1", "0", "--phase1-features", "1"], 20 * (4.0 + 3.5)),
    ],
)
def test_the_budget_prices_each_range_test_at_the_steps_it_takes(argv, seconds):
    """The range tests' seconds, at a Phase I step of 2 s (with --phase1-features: a head step
    of 0.5 s on features and a feature pass of 3 s a batch, the sweep stepping on images), a
    Phase II step of 4 s."""
    from types import SimpleNamespace

    from twophase.budget import range_test_seconds
    from twophase.resolve import resolve

    args = resolve([*argv, *STEPS]).options
    features = "--phase1-features" in argv
    speed = {"step1": 0.5 if features else 2.0, "step2": 4.0} | ({"pass": 3.0} if features else {})
    run = SimpleNamespace(args=args, history=[])
    assert range_test_seconds(run, speed, phase1_over=False) == pytest.approx(seconds)
