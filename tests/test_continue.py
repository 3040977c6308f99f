"""A continued run does what it is told, or refuses: every option of train.py given on --resume
(and with --phase 2 from phase1.pt) is applied, so that the remaining epochs train as a fresh run
given it would, or refused before anything is read or written, naming the option."""

import math
import os
import re

import pytest
import torch

import model as M
import train
from conftest import REPO, TINY, make_dataset, narrowed, stop_at
from twophase import continuing, schedule
from twophase.loss import loss_of
from twophase.options import OPTIONS, docs_with_tables, get_args_parser
from twophase.resolve import resolve
from utils import Problem

CPU = torch.device("cpu")
BASE = TINY + ["--epochs1", "2", "--epochs2", "3"]

# --labels: the run validates on its val/ folder; with a CSV of labels it would hold out a share
# of the training images.
ALWAYS_REFUSED = {"arch", "mean", "std", "weights", "demo", "labels", "time_budget"}
ALWAYS_REFUSED |= {"drop_copies"}  # once an epoch is validated: both stops are past one
# Mid-epoch in Phase II: Phase I is over, Phase II's NAdam state is saved, the epoch's batches
# are fixed.
REFUSED_IN_PHASE2 = ALWAYS_REFUSED | {"epochs1", "lr1", "wd1", "freeze_bn", "optimizer2"}
REFUSED_IN_PHASE2 |= {"batch_size", "accum_steps", "seed", "sampler"}
REFUSED_IN_PHASE2 |= {"phase1_features"}  # a Phase I option, as --lr1


def options():
    """Every option of train.py but --resume, the one each test resumes with, and --find-lr,
    which trains nothing (tests/test_lr_find.py)."""
    return [option for option in OPTIONS if option.dest not in ("resume", "find_lr")]


class Captured(Exception):
    """Raised where a continued run begins its first epoch, with what it is about to train."""


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory):
    """Two stops of one run of BASE: after Phase I's first epoch (a SIGTERM during its
    validation) and two batches into Phase II's second epoch."""
    root = tmp_path_factory.mktemp("continue")
    data = make_dataset(root / "data")
    points = {}
    with narrowed():
        for name, moment in (("phase1", "validation=1"), ("phase2", "step=14")):
            out = root / name
            with pytest.MonkeyPatch.context() as stop:
                stop_at(stop, moment)
                with pytest.raises(SystemExit):
                    train.main(["--data", str(data), "--out", str(out), *BASE])
            points[name] = out / "last.pt"
    state = torch.load(points["phase2"], weights_only=True)
    assert (state["phase"], state["epoch"], state["step"]) == (2, 1, 2)
    assert torch.load(points["phase1"], weights_only=True)["phase"] == 1
    return root, data, points


def value_of(option, root, data):
    """Another value of `option` than the run's: its row's (options.OPTIONS), or, for a path,
    one made here."""
    if option.dest == "data":
        return [str(data) + "/."]  # the same dataset, named another way
    if option.dest in ("cache_dir", "out", "tensorboard"):
        return [str(root / f"another-{option.dest}")]
    if option.dest in ("labels", "val_labels"):  # a CSV of the same images
        return [str(labels_csv(root / f"{option.dest}.csv", data / "train"))]
    assert option.other is not None, f"{option.flag}: give its row another value (other=...)"
    return list(option.other)


def fresh_equivalent(option, state):
    """The command line of a fresh run that trains the remaining epochs as the continued run
    given `option` should. --epochs N and --recipe NAME resolve on a continued run as in a fresh
    one: a new budget is split again (its Phase I kept once Phase I is over), a recipe's levers
    set again; so the fresh run leaves out what they replace."""
    base, flag = list(BASE), option[0]
    if flag == "--epochs":
        base = drop(base, ["--epochs1", "--epochs2", "--warmup-epochs", "--cosine-epochs"])
        if state["phase"] == 2:
            base += ["--epochs1", str(state["args"]["epochs1"])]
    return base + option


def drop(argv, flags):
    out, skip = [], False
    for word in argv:
        if word in flags:
            skip = True
            continue
        if skip and not word.startswith("--"):
            continue
        skip = False
        out.append(word)
    return out


def settings(args, phase, epoch):
    """What a continued run trains with from `epoch` of `phase` on: its options, the optimizer's
    hyper-parameters in every group, the phase's steps, the rates of the epochs that follow."""
    phase.set_rates(epoch)
    options = {k: v for k, v in vars(args).items() if k not in ("resume", "out", "overwrite")}
    options.pop("mean"), options.pop("std")  # fixed: set from the weights when a run starts
    options["data"] = os.path.realpath(options["data"])
    return {
        "options": options,
        "optimizer": type(phase.optimizer).__name__,
        "groups": [
            {k: v for k, v in group.items() if k not in ("params", "initial_lr")}
            for group in phase.optimizer.param_groups
        ],
        "phase": (phase.number, phase.epochs, phase.clip, phase.freeze_bn, phase.accum_steps),
        "mix": None if phase.mix is None else (phase.mix.mixup, phase.mix.cutmix),
        "loss": (phase.criterion.label_smoothing, weights_of(phase.criterion)),
        "rates": phase.lrs()[epoch:],
        "sizes": [phase.image_size(e) for e in range(epoch, phase.epochs)],
    }


def continued(monkeypatch, argv):
    """train.main(argv) up to the first epoch it trains: (run, phase, epoch), or None if it
    trains nothing."""
    seen = {}

    def first_epoch(run, phase, epoch, first_batch=0, progress=None):
        seen.update(run=run, phase=phase, epoch=epoch)
        raise Captured

    monkeypatch.setattr(train, "train_epoch", first_epoch)
    with pytest.raises(Captured):
        train.main(argv)
    return seen["run"], seen["phase"], seen["epoch"]


class NoBoard:
    """TensorBoard's writer, stood in for: the walk runs where tensorboard is not installed."""

    def __init__(self, *args):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("at", ["phase1", "phase2"])
def test_every_option_given_to_a_continued_run_is_applied_or_refused(
    at, stopped_runs, narrow_models, monkeypatch
):
    monkeypatch.setattr(train, "require_tensorboard", lambda: None)
    of = classmethod(train.Board.of.__func__)
    monkeypatch.setattr(train, "Board", type("Board", (NoBoard,), {"of": of}))

    root, data, points = stopped_runs
    path = points[at]
    state = torch.load(path, weights_only=True)
    refused_here = REFUSED_IN_PHASE2 if at == "phase2" else ALWAYS_REFUSED
    for action in options():
        option = [action.flag, *value_of(action, root, data)]
        argv = ["--resume", str(path), *option]
        before = {p.name: p.stat().st_mtime_ns for p in path.parent.iterdir()}
        if action.dest in refused_here:
            with pytest.raises(SystemExit) as refusal:
                train.main(argv)
            message = str(refusal.value.code)
            assert action.flag in message and "cannot change" in message, message
            assert {p.name: p.stat().st_mtime_ns for p in path.parent.iterdir()} == before
            continue
        run, phase, epoch = continued(monkeypatch, argv)
        fresh, _ = resolve(["--data", str(data), *fresh_equivalent(option, state)])[:2]
        model = M.build_model(fresh.arch, len(run.splits.classes), "none")
        counts = run.splits.train.class_counts(len(run.splits.classes))
        criterion = loss_of(fresh, run.splits.classes, counts)
        expected = train.phase_setup(phase.number, fresh, model, CPU, criterion, None)
        assert settings(run.args, phase, epoch) == settings(fresh, expected, epoch), option
        if phase.number == state["phase"]:  # the saved state, each parameter's, in its place
            assert_optimizer_state_is_the_checkpoints(run.model, phase, state)


def assert_optimizer_state_is_the_checkpoints(model, phase, state):
    saved_order = M.optimizer_order(model, phase.number, state["args"]["lr_decay"])
    saved = state["optimizer"]["state"]
    names = M.parameter_names(model, phase.optimizer)
    params = [p for group in phase.optimizer.param_groups for p in group["params"]]
    for name, param in zip(names, params):
        mine = phase.optimizer.state[param]
        theirs = saved[saved_order.index(name)]
        for key, value in theirs.items():
            assert torch.equal(torch.as_tensor(mine[key]), torch.as_tensor(value)), (name, key)


def test_a_refusal_names_the_option_and_the_way_on_and_is_a_message_not_a_traceback(
    stopped_runs,
):
    _, _, points = stopped_runs
    with pytest.raises(SystemExit) as refusal:
        train.main(["--resume", str(points["phase2"]), "--optimizer2", "sgd", "--arch", "resnet50"])
    message = refusal.value.code  # a string: Python prints it alone and exits with status 1
    assert isinstance(message, str)
    assert "--optimizer2 sgd (the run has nadam)" in message
    assert "python train.py --phase 2 --out" in message  # the way on
    assert "--arch resnet50 (the run has resnet18)" in message  # every refusal at once


def test_the_seed_and_the_held_out_fraction_are_refused_where_they_draw_validation(
    tmp_path, narrow_models
):
    data = make_dataset(tmp_path / "data", val_per_class=0)  # no val/: held out of train/
    train.main(["--data", str(data), "--out", str(tmp_path / "ck"), *TINY, "--epochs2", "0"])
    for option in (["--seed", "3"], ["--val-fraction", "0.3"]):
        for how in (["--resume", str(tmp_path / "ck" / "last.pt")], ["--phase", "2"]):
            argv = how + ["--out", str(tmp_path / "ck"), *option]
            with pytest.raises(Problem, match=f"{option[0]} .*move images the run trained on"):
                resolve(argv)


def test_a_new_budget_keeps_the_phase_one_a_run_has_done(tmp_path):
    """--epochs 50 on a run in Phase II: its Phase I epochs stay, the rest goes to Phase II."""
    args, _ = resolve(["--epochs", "8"])[:2]
    path = tmp_path / "last.pt"
    torch.save({"args": vars(args), "phase": 2, "epoch": 3, "history": []}, path)
    resumed, _ = resolve(["--resume", str(path), "--epochs", "50"])[:2]
    assert (resumed.epochs1, resumed.epochs2) == (1, 49)
    with pytest.raises(Problem, match="--epochs1 4 .* Phase I of this run is over"):
        resolve(["--resume", str(path), "--epochs", "50", "--epochs1", "4"])


def test_lr_decay_changed_in_phase_two_moves_each_parameters_state_to_its_group(
    stopped_runs, narrow_models, monkeypatch
):
    """One group (no --lr-decay) saved, six (by stage) resumed: each parameter keeps its own
    moments and step count, and each group trains at its stage's rate."""
    _, _, points = stopped_runs
    state = torch.load(points["phase2"], weights_only=True)
    run, phase, epoch = continued(
        monkeypatch, ["--resume", str(points["phase2"]), "--lr-decay", "0.5"]
    )
    assert len(phase.optimizer.param_groups) == 6 and len(state["optimizer"]["param_groups"]) == 1
    assert_optimizer_state_is_the_checkpoints(run.model, phase, state)
    rates = [group["lr"] for group in phase.optimizer.param_groups]
    assert rates == pytest.approx([rates[0] * 0.5**depth for depth in range(6)])
    assert math.isclose(rates[0], phase.peak_lrs[0] * phase.schedule(epoch))


def test_the_schedule_changed_mid_phase_two_follows_the_new_options_at_every_epoch(
    stopped_runs, narrow_models, monkeypatch
):
    """The faults this replaces: --warmup-epochs 0 on a run stopped inside its warmup trained
    neither schedule; --epochs on a run without warmup crashed (KeyError: '_schedulers')."""
    _, data, points = stopped_runs
    state = torch.load(points["phase2"], weights_only=True)
    for option in (["--warmup-epochs", "0"], ["--epochs", "20"], ["--lr2", "1e-4"]):
        run, phase, epoch = continued(monkeypatch, ["--resume", str(points["phase2"]), *option])
        fresh, _ = resolve(["--data", str(data), *fresh_equivalent(option, state)])[:2]
        expected = schedule.WarmupCosine.of(fresh)
        assert phase.lrs() == pytest.approx([fresh.lr2 * expected(e) for e in range(fresh.epochs2)])
        assert phase.optimizer.param_groups[0]["lr"] == pytest.approx(fresh.lr2 * expected(epoch))
        assert max(phase.lrs()) <= fresh.lr2


def test_options_given_with_phase_two_from_phase_one_obey_the_same_rules(
    tmp_path, narrow_models, monkeypatch
):
    out = tmp_path / "ck"
    common = ["--data", str(make_dataset(tmp_path / "data")), "--out", str(out), *TINY]
    train.main(common + ["--epochs1", "1", "--phase", "1"])
    with pytest.raises(SystemExit, match="--lr1 0.01 .* does not train again"):
        train.main(["--phase", "2", "--out", str(out), "--lr1", "1e-2"])
    run, phase, epoch = continued(
        monkeypatch, ["--phase", "2", "--out", str(out), "--optimizer2", "sgd", "--lr2", "1e-2"]
    )
    assert isinstance(phase.optimizer, torch.optim.SGD) and epoch == 0
    assert phase.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # warmup from 0.1 x


def test_every_option_has_a_rule_and_the_docs_tables_are_the_tables_made_from_them():
    """One row an option (options.OPTIONS): its rule is one of continuing.py's, and the tables of
    docs/options.md and docs/checkpoints.md are those the rows make (python -m twophase.options
    --docs writes them)."""
    rules = {f for f in vars(continuing).values() if callable(f) and hasattr(f, "words")}
    for option in OPTIONS:
        assert option.rule in rules, option.flag
    parser_dests = {a.dest for a in get_args_parser()._actions} - {"help"}
    assert parser_dests == {option.dest for option in OPTIONS}
    for path, text in docs_with_tables(REPO / "docs").items():
        assert path.read_text() == text, f"{path.name}: run python -m twophase.options --docs"


def labels_csv(path, folder):
    """A CSV of image,label for the class folders of `folder` (names relative to it)."""
    rows = ["image,label"] + [
        f"{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(folder.rglob("*.png"))
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def weights_of(criterion):
    return None if criterion.weight is None else criterion.weight.tolist()


def test_the_out_of_memory_advice_resumes_an_epoch_stopped_in_its_middle(
    stopped_runs, tmp_path, narrow_models
):
    """The advice's smaller batch, with as many more accumulated steps, goes on mid-epoch with
    the epoch's images in their order; another batch is refused there, saying which go on."""
    _, data, points = stopped_runs  # phase2: two batches of 4 into Phase II's second epoch
    last = tmp_path / "ck" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(points["phase2"].read_bytes())
    args, resume = resolve(["--resume", str(last), "--data", str(data)])[:2]
    advice = train.out_of_memory_advice(args, train.RunFolder(last.parent), resume)
    smaller = re.search(r"(--batch-size \d+ --accum-steps \d+)", advice).group(1).split()
    assert smaller == ["--batch-size", "2", "--accum-steps", "2"]
    train.main(["--resume", str(last), "--data", str(data), *smaller])
    state = torch.load(last, weights_only=True)
    assert (state["phase"], state["epoch"], state["args"]["batch_size"]) == (2, 3, 2)
    with pytest.raises(Problem, match=r"--batch-size 3 .* \(a --batch-size that divides 4"):
        resolve(["--resume", str(points["phase2"]), "--batch-size", "3"])


def test_an_epoch_in_flight_is_not_dropped_by_a_shorter_phase(stopped_runs):
    _, _, points = stopped_runs  # phase2: two batches into Phase II's second epoch
    with pytest.raises(Problem, match="--epochs2 1 .* Phase II has 2 epochs, the last in flight"):
        resolve(["--resume", str(points["phase2"]), "--epochs2", "1"])
    assert resolve(["--resume", str(points["phase2"]), "--epochs2", "2"]).options.epochs2 == 2


def test_a_held_out_split_that_has_changed_is_refused_on_resume(tmp_path, narrow_models):
    data = make_dataset(tmp_path / "data", val_per_class=0)  # no val/: held out of train/
    out = tmp_path / "ck"
    train.main(["--data", str(data), "--out", str(out), *TINY, "--epochs1", "1", "--epochs2", "1"])
    for j in range(6, 12):  # new photos in train/: the held-out share drawn anew
        (data / "train" / "cat" / f"{j:03d}.png").write_bytes(
            (data / "train" / "cat" / "000.png").read_bytes()
        )
    with pytest.raises(
        SystemExit, match="validation images held out .* are not those the run held"
    ):
        train.main(["--resume", str(out / "last.pt"), "--epochs2", "2"])


def test_a_labels_csv_moved_with_its_dataset_is_found_by_name(tmp_path, narrow_models, capsys):
    lines = ["image,label"]
    for i, c in enumerate(("a", "b")):
        for j in range(5):
            name = f"{c}{j}.png"
            (tmp_path / "k" / "train").mkdir(parents=True, exist_ok=True)
            import conftest

            conftest.write_image(
                tmp_path / "k" / "train" / name, conftest.COLOURS[i], seed=j + 5 * i
            )
            lines.append(f"{name},{c}")
    (tmp_path / "k" / "train.csv").write_text("\n".join(lines) + "\n")
    options = [
        "--data",
        str(tmp_path / "k"),
        "--labels",
        "train.csv",
        "--out",
        str(tmp_path / "ck"),
    ]
    train.main(options + [*TINY, "--epochs1", "1", "--epochs2", "1"])
    (tmp_path / "k").rename(tmp_path / "moved")
    train.main(
        [
            "--resume",
            str(tmp_path / "ck" / "last.pt"),
            "--data",
            str(tmp_path / "moved"),
            "--epochs2",
            "2",
        ]
    )
    state = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert state["args"]["labels"] == str(tmp_path / "moved" / "train.csv")
