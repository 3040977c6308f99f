"""The checkpoint: its files, written atomically; a run's folder, never overwritten by a fresh run;
reading a checkpoint back, one of an earlier version too; the optimizer state across devices."""

import copy
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
import torchvision

import train
import utils
from conftest import TINY, make_dataset
from narrow import narrow_get_model
from twophase import checkpoint, run_folder, schedule
from twophase.resolve import resolve
from twophase.start import Start, load_optimizer_state
from utils import Problem

# Written by the code as it was before its run state was redesigned (tests/fixtures/README.md):
# a run with every lever that keeps state, stopped by SIGTERM two batches into Phase II.
V1_MID_EPOCH = Path(__file__).parent / "fixtures" / "stopped_mid_epoch_v1.pt"
V1_OPTIONS = (
    TINY
    + (
        "--epochs1 2 --epochs2 3 --ema 0.9 --mixup 0.4 --cutmix 1.0 --lr-decay 0.8 --accum-steps 2"
    ).split()
)


@pytest.fixture
def one_thread():
    """Float sums as the checkpoint below was written: by one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def as_written(monkeypatch, one_thread):
    """The fixtures' model: the narrow resnet18 at a width of 4, in one thread."""
    narrow = narrow_get_model(torchvision.models.get_model, {"resnet18": 4})
    monkeypatch.setattr(torchvision.models, "get_model", narrow)


def test_a_checkpoint_of_the_earlier_format_resumes_to_the_uninterrupted_run(tmp_path, as_written):
    data = make_dataset(tmp_path / "data")  # the very images it was trained on
    train.main(V1_OPTIONS + ["--data", str(data), "--out", str(tmp_path / "straight")])
    old = torch.load(V1_MID_EPOCH, weights_only=True)
    assert (old["phase"], old["epoch"], old["step"]) == (2, 0, 2)
    resumed = tmp_path / "resumed" / "last.pt"
    resumed.parent.mkdir()
    torch.save(old, resumed)
    train.main(["--resume", str(resumed), "--data", str(data)])  # in its own folder
    a, b = (torch.load(p, weights_only=True) for p in (tmp_path / "straight" / "last.pt", resumed))
    # The fixture's first two batches were trained on another CPU, whose kernels round float sums
    # in other last bits: the same run to a few ulps here (bit-for-bit equality on one machine is
    # what the resume tests of test_preemption.py and test_continue.py hold to).
    close = dict(rtol=1e-4, atol=1e-5)
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], **close, msg=key)
    for key, value in a["ema"]["model"].items():
        torch.testing.assert_close(value, b["ema"]["model"][key], **close, msg=key)
    assert [r["val_acc"] for r in a["history"]] == [r["val_acc"] for r in b["history"]]
    assert [r["train_loss"] for r in a["history"]] == pytest.approx(
        [r["train_loss"] for r in b["history"]], rel=1e-5
    )


# Written by the code as it was before its options became one table and its machinery one package
# (tests/fixtures/README.md): stopped two batches into Phase II's second epoch, with the levers
# that keep state; `_end` holds the weights that code resumed it to.
V2_MID_EPOCH = Path(__file__).parent / "fixtures" / "stopped_mid_epoch_v2.pt"
V2_END = Path(__file__).parent / "fixtures" / "stopped_mid_epoch_v2_end.pt"


def test_a_checkpoint_of_the_second_format_resumes_to_the_weights_its_own_code_gave(
    tmp_path, as_written
):
    data = make_dataset(tmp_path / "data")  # the very images it was trained on
    old = torch.load(V2_MID_EPOCH, weights_only=True)
    assert (old["phase"], old["epoch"], old["step"]) == (2, 1, 2)
    resumed = tmp_path / "resumed" / "last.pt"
    resumed.parent.mkdir()
    torch.save(old, resumed)
    train.main(["--resume", str(resumed), "--data", str(data)])
    end, expected = (torch.load(p, weights_only=True) for p in (resumed, V2_END))
    close = dict(rtol=1e-4, atol=1e-5)  # another CPU rounds float sums in other last bits
    for key, value in expected["model"].items():
        torch.testing.assert_close(end["model"][key], value, **close, msg=key)
    for key, value in expected["ema"]["model"].items():
        torch.testing.assert_close(end["ema"]["model"][key], value, **close, msg=key)
    assert [r["train_loss"] for r in end["history"]] == pytest.approx(
        [r["train_loss"] for r in expected["history"]], rel=1e-5
    )


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    state = {
        "model": {"w": torch.arange(3.0)},
        "classes": ["a", "b"],
        "args": {"lr": 5e-4, "scale": [0.9, 1.1]},
        "history": [{"phase": 1, "epoch": 1, "val_acc": 0.5}],
        "rng": utils.rng_state(),
        "scaler": None,
    }
    checkpoint.save_checkpoint(state, tmp_path / "ck" / "last.pt")
    loaded = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert (
        torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["args"] == state["args"]
    )
    assert os.listdir(tmp_path / "ck") == ["last.pt"]  # no temporary file left


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint({"epoch": 1}, path)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        checkpoint.save_checkpoint({"epoch": 2, "bad": lambda: None}, path)  # cannot be pickled
    assert torch.load(path, weights_only=True) == {"epoch": 1} and os.listdir(tmp_path) == [
        "last.pt"
    ]


def test_one_state_under_several_names_each_file_its_own(tmp_path):
    run_folder.save_checkpoints({"epoch": 1}, [tmp_path / "last.pt", tmp_path / "best.pt"])
    assert torch.load(tmp_path / "best.pt", weights_only=True) == {"epoch": 1}
    torch.save({"edited": True}, tmp_path / "best.pt")  # a user's script rewriting best.pt in place
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"epoch": 1}
    run_folder.save_checkpoints({"epoch": 2}, [tmp_path / "last.pt"])
    assert torch.load(tmp_path / "best.pt", weights_only=True) == {"edited": True}
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]


def test_bare_checkpoint_name_resolves_in_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    checkpoint.save_checkpoint({"x": 1}, tmp_path / "checkpoints" / "best.pt")
    assert checkpoint.resolve_checkpoint("best.pt") == Path("checkpoints/best.pt")
    with pytest.raises(Problem, match="no checkpoint"):
        checkpoint.resolve_checkpoint("missing.pt")


def test_full_history_goes_past_the_checkpoint_epoch(tmp_path):
    rows = [
        {"phase": 1, "epoch": 1, "val_acc": 0.5, "lr": 5e-4},
        {"phase": 2, "epoch": 1, "val_acc": 0.9, "lr": 5e-5},
        {"phase": 2, "epoch": 2, "val_acc": 0.8, "lr": 5e-4},
    ]
    checkpoint.write_history_csv(rows, tmp_path / "history.csv")
    best = {"history": rows[:2]}
    assert checkpoint.full_history(tmp_path / "best.pt", best) == rows
    other_run = {"history": [{"phase": 1, "epoch": 1, "val_acc": 0.1}]}
    assert checkpoint.full_history(tmp_path / "best.pt", other_run) == other_run["history"]


@pytest.mark.parametrize("name,option", [("adamw", "fused"), ("nadam", "capturable")])
def test_optimizer_state_saved_on_cuda_resumes_on_the_cpu(name, option):
    def build(value):
        return schedule.make_optimizer(
            name, [torch.nn.Parameter(value.clone())], 1e-2, 1e-4, torch.device("cpu")
        )

    def step(optimizer):
        optimizer.param_groups[0]["params"][0].grad = torch.tensor([1.0, -2.0, 0.5])
        optimizer.step()

    running = build(torch.ones(3))
    step(running)
    # As a checkpoint holds it (not the running state's tensors), and as a run on CUDA may save it
    # (capturable NAdam fails on the CPU).
    saved = copy.deepcopy(running.state_dict())
    saved["param_groups"][0][option] = True
    resumed = build(running.param_groups[0]["params"][0].detach())
    load_optimizer_state(resumed, saved)
    assert not resumed.param_groups[0][option]
    step(running), step(resumed)
    assert torch.equal(running.param_groups[0]["params"][0], resumed.param_groups[0]["params"][0])


def test_resume_of_a_checkpoint_from_an_earlier_version(tiny_args, tmp_path):
    """Saved when --compile took no mode, and before an option existed: the option gets its
    default."""
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0"])
    state = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    state["args"]["compile"] = False
    del state["args"]["accum_steps"]
    torch.save(state, tmp_path / "old.pt")
    args, _ = resolve(["--resume", str(tmp_path / "old.pt")])[:2]
    assert args.compile is None and args.accum_steps == 1
    state["args"]["compile"] = True
    torch.save(state, tmp_path / "old.pt")
    assert resolve(["--resume", str(tmp_path / "old.pt")]).options.compile == "default"
    off = resolve(["--resume", str(tmp_path / "old.pt"), "--compile", "off"]).options
    assert off.compile is None
    state["args"]["workers"] = state["args"].pop("cache_workers") + 3  # its name before
    # A demo run resumes with its own arguments, not the demo's preset.
    state["args"]["demo"] = True
    torch.save(state, tmp_path / "old.pt")
    args, _ = resolve(["--resume", str(tmp_path / "old.pt")])[:2]
    assert args.img_size == 16 and args.cache_workers == 3


def test_a_fresh_run_never_overwrites_a_run_and_says_the_ways_on(tiny_args, tmp_path):
    out = tmp_path / "ck"
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "1"])
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}
    with pytest.raises(SystemExit) as refused:
        train.main(tiny_args + ["--epochs1", "1", "--epochs2", "2"])
    message = str(refused.value)
    assert f"--out {out} holds a run (last.pt: phase 2 epoch 1)" in message
    assert "best.pt, history.csv, last.pt, phase1.pt" in message
    assert f"python train.py --resume {out / 'last.pt'}" in message
    assert "--out ANOTHER_FOLDER" in message and "--overwrite" in message
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"} == before
    # Asked for explicitly: the old run's files go, the new run trains from scratch.
    (out / "epoch009.pt").write_bytes(b"a kept epoch of the old run")
    train.main(tiny_args + ["--epochs1", "0", "--epochs2", "1", "--overwrite"])
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
    assert len(torch.load(out / "last.pt", weights_only=True)["history"]) == 1


def test_phase_two_continues_phase_one_and_is_not_started_twice_by_accident(tiny_args, tmp_path):
    out = tmp_path / "ck"
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "2", "--phase", "1", "--lr2", "2e-3"])
    train.main(["--phase", "2", "--out", str(out)])  # phase1.pt's options: data, sizes, --lr2
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["phase"], last["epoch"], last["args"]["lr2"]) == (2, 2, 2e-3)
    assert last["args"]["data"] == tiny_args[1] and last["img_size"] == 16
    with pytest.raises(SystemExit, match="holds this run's Phase II .* would overwrite it"):
        train.main(["--phase", "2", "--out", str(out)])
    train.main(["--phase", "2", "--out", str(out), "--optimizer2", "adamw", "--overwrite"])
    again = torch.load(out / "last.pt", weights_only=True)
    assert again["args"]["optimizer2"] == "adamw" and [r["phase"] for r in again["history"]] == [
        1,
        2,
        2,
    ]
    assert (out / "phase1.pt").is_file()  # where Phase II started again


def test_any_fresh_run_replaces_the_demos_run_and_a_demo_replaces_no_other(
    tiny_args, dataset, capsys
):
    """The README's first command works every time, and its next one (a real run into the same
    checkpoints/) is not stopped by the demo's throwaway run."""
    (dataset / "answers.csv").write_text("image_name,pred_label\n")  # the demo's data, written
    demo = tiny_args + ["--demo", "--epochs1", "1", "--epochs2", "1"]
    train.main(demo)
    train.main(demo)  # run twice
    assert "replacing the demo's run: deleted" in capsys.readouterr().err
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0"])  # a real run, no --overwrite
    assert "replacing the demo's run: deleted" in capsys.readouterr().err
    assert not torch.load(tiny_args[3] + "/last.pt", weights_only=True)["args"]["demo"]
    with pytest.raises(SystemExit, match="holds a run"):  # a demo never replaces a real run
        train.main(demo)


def test_the_guard_keeps_what_a_run_needs_and_sees_phase_two_without_last_pt(tiny_args, tmp_path):
    out = tmp_path / "ck"
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "1"])
    # --overwrite starting from the folder's own best.pt: kept, and read before it is replaced.
    again = ["--weights", str(out / "best.pt"), "--epochs1", "1", "--epochs2", "0", "--overwrite"]
    train.main(tiny_args + again)
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["phase"], last["epoch"], last["args"]["weights"]) == (1, 1, str(out / "best.pt"))
    # Phase II has begun even when last.pt is gone: epoch002.pt is a Phase II checkpoint.
    b = ["--epochs1", "1", "--epochs2", "1", "--keep-last", "1", "--out", str(tmp_path / "b")]
    train.main(tiny_args + b)
    (tmp_path / "b" / "last.pt").unlink()
    with pytest.raises(SystemExit, match="Phase II"):
        train.main(["--phase", "2", "--out", str(tmp_path / "b")])


def test_a_demo_continued_elsewhere_never_replaces_a_demo_run(tiny_args, dataset, tmp_path):
    (dataset / "answers.csv").write_text("image_name,pred_label\n")  # the demo's data, written
    demo = tiny_args + ["--demo", "--epochs1", "1", "--epochs2", "1"]
    train.main(demo)
    train.main(demo[:-4] + ["--epochs1", "1", "--epochs2", "0", "--out", str(tmp_path / "other")])
    with pytest.raises(SystemExit, match="holds a run"):  # a continuation, not a fresh demo
        train.main(["--resume", str(tmp_path / "other" / "last.pt"), "--out", str(tmp_path / "ck")])


def test_going_on_from_an_earlier_checkpoint_of_a_run_never_overwrites_its_later_epochs(
    tiny_args, tmp_path
):
    out = tmp_path / "ck"
    periodic = ["--save-every", "1", "--save-min-acc", "0"]
    train.main(tiny_args + ["--epochs1", "0", "--epochs2", "3", *periodic])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".pt", ".csv")}
    for earlier in ("phase2_epoch001.pt", "phase2_epoch002.pt"):
        with pytest.raises(SystemExit, match=f"{earlier} is phase 2 epoch .* whose last.pt is"):
            train.main(["--resume", str(out / earlier)])
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".pt", ".csv")}
    assert after == before
    train.main(["--resume", str(out / "phase2_epoch001.pt"), "--out", str(tmp_path / "apart")])
    folder, start = (
        run_folder.RunFolder(out),
        Start.of(str(out / "phase2_epoch001.pt"), out, "all", "none"),
    )
    folder.guard(start, overwrite=True, weights="none")
    later = {"phase2_epoch002.pt", "phase2_epoch003.pt", "last.pt"}
    assert later <= set(folder.replaced) and "phase2_epoch001.pt" not in folder.replaced
    started = time.time_ns()
    train.main(["--resume", str(out / "phase2_epoch001.pt"), "--overwrite"])
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["phase"], last["epoch"], len(last["history"])) == (2, 3, 3)
    # No file of the abandoned epochs past it is left: each is this run's, or gone.
    for path in out.glob("*.pt"):
        if torch.load(path, weights_only=True)["epoch"] > 1:
            assert path.stat().st_mtime_ns >= started, path.name


def test_an_average_is_not_a_position_to_resume_from(tiny_args, tmp_path):
    train.main(tiny_args + ["--epochs1", "0", "--epochs2", "2", "--average-last", "2"])
    with pytest.raises(SystemExit, match="an average of checkpoints, not a position"):
        train.main(["--resume", str(tmp_path / "ck" / "averaged.pt"), "--epochs2", "3"])


def test_overwrite_deletes_nothing_of_the_old_run_until_the_new_one_writes(
    tiny_args, tmp_path, capsys
):
    out = tmp_path / "ck"
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "1"])
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}
    broken = make_dataset(tmp_path / "broken")
    for image in (broken / "train").rglob("*.png"):
        image.write_bytes(b"not an image")  # the start fails as the cache is built
    with (
        pytest.raises(SystemExit, match="none of the 18 images .* could be read"),
        pytest.warns(UserWarning, match="skipped unreadable image"),
    ):
        train.main(tiny_args + ["--data", str(broken), "--overwrite"])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"} == before
    assert "will be deleted when this run saves its first file" in capsys.readouterr().err
    train.main(tiny_args + ["--epochs1", "0", "--epochs2", "1", "--overwrite"])  # one that starts
    assert (
        "--overwrite: deleted best.pt, history.csv, last.pt, phase1.pt" in capsys.readouterr().err
    )
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]


@pytest.mark.parametrize(
    "mistake, message",
    [
        (["--arch", "resnet1"], "unknown --arch 'resnet1'"),
        (["--weights", "IMAGENET1K_V9"], "--weights IMAGENET1K_V9: no such file"),
        (["--weights", "imagenet"], "could not download the resnet18 ImageNet weights"),
        (["--data", "no-such-folder"], "no training data at no-such-folder/train"),
    ],
)
def test_a_mistyped_start_fails_in_seconds_before_any_cache_or_folder(
    mistake, message, tiny_args, dataset, tmp_path
):
    """Before a preprocessing cache is built (minutes for a real dataset) or --out is touched.
    (The narrow models have no ImageNet weights: asking for them fails as a download does.)"""
    with pytest.raises(SystemExit, match=message):
        train.main(tiny_args + mistake)
    assert not (dataset / ".cache").exists() and not (tmp_path / "ck").exists()


def test_a_missing_dataset_is_named_before_a_folder_holding_a_run_is(tiny_args, tmp_path):
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0"])
    with pytest.raises(SystemExit, match="no training data at"):
        train.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "ck")])
