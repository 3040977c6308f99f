"""Preemption and shared machines: a signal at any moment costs at most the step in flight, and
the resumed run ends bit-identical on the CPU (under torchrun: test_distributed.py); full disks
(one faked, one real), two runs in one folder, two cache builds at once."""

import csv
import errno
import random
import re
import signal
import subprocess
import time

import pytest
import torch

import data
import train
import utils
from conftest import Forked, Killed, make_dataset, stop_at
from twophase import image_cache

# Every lever that draws random numbers or keeps state, so that resuming must restore them all.
LEVERS = "--epochs1 2 --epochs2 3 --ema 0.9 --mixup 0.4 --cutmix 1.0 --lr-decay 0.8".split()
LEVERS += ["--accum-steps", "2"]  # stops fall between optimizer steps, never inside one


def same_run(a, b):
    a, b = (torch.load(p, weights_only=True) for p in (a, b))
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in (a["ema"] or {"model": {}})["model"].items():
        assert torch.equal(value, b["ema"]["model"][key]), key
    columns = ("train_loss", "train_acc", "val_loss", "val_acc", "ema_val_acc")
    assert [[r.get(c) for c in columns] for r in a["history"]] == [
        [r.get(c) for c in columns] for r in b["history"]
    ]


def history_csv(folder):
    """history.csv without the columns that time the run."""
    with open(folder / "history.csv") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in rows]


# Drawn once, from a fixed seed: option combinations that change the schedule or keep state, and
# a moment to stop at. 18 training images in batches of 4 make 4 batches an epoch (2 optimizer
# steps with --accum-steps 2); each epoch validates once, twice with --ema.
BUDGETS = [
    ["--epochs", "4"],  # 1 + 3, no warmup
    ["--epochs", "5", "--warmup-epochs", "1"],  # 1 + 4, warmup 1, cosine 3
    ["--epochs", "5", "--epochs1", "2"],  # 2 + 3
    ["--epochs1", "2", "--epochs2", "2"],
    ["--recipe", "best", "--epochs", "4"],
]
LEVER_CHOICES = [
    [],
    ["--ema", "0.9"],
    ["--mixup", "0.4"],
    ["--cutmix", "1.0"],
    ["--lr-decay", "0.7"],
]
LEVER_CHOICES += [["--accum-steps", "2"], ["--keep-last", "2"]]


def draw_cases(n, seed=21):
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        options = rng.choice(BUDGETS) + sum(rng.sample(LEVER_CHOICES, 2), [])
        moment = [
            f"step={rng.randint(2, 11)}",  # mid-epoch, either phase
            "step=4" if "--epochs1" not in options else "step=8",  # Phase I's last batch
            f"validation={rng.randint(1, 3)}",
            f"kill={rng.randint(2, 5)}",  # after a mid-epoch save (every optimizer step)
        ][i % 4]
        if moment.startswith("kill"):
            options = options + ["--save-every-steps", "1"]
        cases.append(pytest.param(options, moment, id=f"{moment} {' '.join(options)}"))
    return cases


# The balanced sampler and class weights, stopped mid-epoch: its draws, like the shuffle's, are a
# function of (seed, epoch), so the resumed epoch takes the batches it would have.
BALANCED = ["--epochs", "4", "--sampler", "balanced", "--class-weights", "auto", "--ema", "0.9"]
# Progressive sizes with MixUp, stopped inside Phase II's second epoch (at its smaller size).
PROGRESSIVE = ["--epochs", "5", "--progressive", "0.5", "--mixup", "0.4", "--img-size", "24"]


@pytest.mark.parametrize(
    "options, moment",
    draw_cases(8)
    + [pytest.param(BALANCED, "step=6", id="step=6 " + " ".join(BALANCED))]
    + [pytest.param(PROGRESSIVE, "step=10", id="step=10 " + " ".join(PROGRESSIVE))],
)
def test_a_run_stopped_at_any_moment_resumes_to_the_uninterrupted_runs_end(
    options, moment, tiny_args, tmp_path, monkeypatch
):
    """The resumed run is given nothing but --resume: its options, schedule, position and random
    state all come from last.pt."""
    train.main(tiny_args + options + ["--out", str(tmp_path / "straight")])
    out = tmp_path / "ck"
    with monkeypatch.context() as patch:
        stop_at(patch, moment)
        with pytest.raises((SystemExit, Killed)) as stopped:
            train.main(tiny_args + options + ["--out", str(out)])
    if stopped.type is SystemExit:
        assert stopped.value.code == utils.EXIT_PREEMPTED
    train.main(["--resume", str(out / "last.pt")])
    same_run(tmp_path / "straight" / "last.pt", out / "last.pt")
    assert history_csv(tmp_path / "straight") == history_csv(out)
    kept = sorted(p.name for p in (tmp_path / "straight").glob("*.pt"))
    assert kept == sorted(p.name for p in out.glob("*.pt"))


def test_a_signalled_run_saves_its_position_and_exits_75_and_a_second_signal_spoils_nothing(
    tiny_args, tmp_path, monkeypatch, capsys
):
    levers = "--epochs1 2 --epochs2 3 --ema 0.9 --mixup 0.4 --cutmix 1.0 --accum-steps 2".split()
    train.main(tiny_args + levers + ["--out", str(tmp_path / "straight")])
    out = tmp_path / "ck"
    with monkeypatch.context() as patch:
        stop_at(patch, "step=9")  # mid-epoch, Phase II
        stop_at(patch, "save=3", times=2)  # during its save of the position, twice more
        with pytest.raises(SystemExit) as stopped:
            train.main(tiny_args + levers + ["--out", str(out)])
    err = capsys.readouterr().err
    assert stopped.value.code == utils.EXIT_PREEMPTED
    assert "stopped by SIGTERM 2 batches into phase 2 epoch 1" in err
    assert f"--resume {out / 'last.pt'}" in err
    assert "2 batches into phase 2 epoch 1" in (out / "preempted").read_text()  # jobs/slurm.sh's
    torch.load(out / "last.pt", weights_only=True)  # loads: the second signal spoilt nothing
    train.main(["--resume", str(out / "last.pt")])
    same_run(tmp_path / "straight" / "last.pt", out / "last.pt")
    assert not (out / "preempted").exists()  # the resumed run took the folder


def failing_writes(monkeypatch, fail):
    """torch.save raising ENOSPC (a full disk) when fail(call number) says so."""
    real, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if fail(calls[0]):
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def full_disk_stop(out, stopped):
    """What a run stopped by a full disk leaves: one sentence naming the folder, the space a
    checkpoint needs and the way on; Phase I's checkpoints as they were, loadable; no partial
    file."""
    message = str(stopped.value.code)
    assert "\n" not in message and "Traceback" not in message
    assert re.search(
        rf"could not write {out}/\S+\.pt in {out} \(No space left on device: a checkpoint needs "
        r"about [\d.]+ [KMG]B, [\d.]+ [KMG]?B free\), so the run stops",
        message,
    ), message
    assert message.endswith(f"then go on with: python train.py --resume auto --out {out}")
    for name in ("last.pt", "best.pt", "phase1.pt"):
        state = torch.load(out / name, weights_only=True)
        assert (state["phase"], state["epoch"]) == (1, 1), name
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_stops_the_run_in_a_sentence_and_the_resumed_run_loses_nothing(
    tiny_args, tmp_path, monkeypatch
):
    """torch.save raising ENOSPC as Phase II's first epoch is saved."""
    options = tiny_args + ["--epochs1", "1", "--epochs2", "2"]
    train.main(options + ["--out", str(tmp_path / "straight")])
    out = tmp_path / "ck"
    with monkeypatch.context() as patch:
        failing_writes(patch, lambda call: call == 2)
        with pytest.raises(SystemExit) as stopped:
            train.main(options)
    full_disk_stop(out, stopped)
    train.main(["--resume", "auto", "--out", str(out)])
    same_run(tmp_path / "straight" / "last.pt", out / "last.pt")


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs: room for a tiny run's Phase I checkpoints (three of 0.4 MB), not for a Phase
    II checkpoint (1.1 MB, its optimizer's moments added) written beside them."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]
    try:
        mounted = subprocess.run(mount, capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here to make a small disk with")
    if mounted.returncode:
        pytest.skip(f"a tmpfs cannot be mounted here (root is needed): {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_disk_that_fills_up_stops_the_run_with_its_files_as_they_were(
    tiny_args, tmp_path, small_disk
):
    """A real full disk: torch.save's own error says nothing of it ("unexpected pos")."""
    options = tiny_args + ["--epochs1", "1", "--epochs2", "2"]
    train.main(options + ["--out", str(tmp_path / "straight")])
    out = small_disk / "ck"
    with pytest.raises(SystemExit) as stopped:
        train.main(options + ["--out", str(out)])
    full_disk_stop(out, stopped)
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space freed
    train.main(["--resume", "auto", "--out", str(out)])
    same_run(tmp_path / "straight" / "last.pt", out / "last.pt")


def test_a_second_run_into_one_folder_is_refused_and_a_killed_runs_lock_is_not(tiny_args, tmp_path):
    out = tmp_path / "ck"
    long = tiny_args + ["--epochs1", "0", "--epochs2", "500", "--out", str(out)]
    first = Forked(train.main, long)
    try:
        deadline = time.time() + 60
        while f"process {first.pid}" not in (
            (out / ".lock.owner").read_text() if (out / ".lock.owner").exists() else ""
        ):
            assert time.time() < deadline
            time.sleep(0.05)
        with pytest.raises(SystemExit, match=f"--out {out} is in use by process {first.pid} on"):
            train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0"])
    finally:
        first.kill()
        assert first.wait() == -signal.SIGKILL
    # kill -9 left no lock behind (--overwrite: the first run may have saved an epoch by then)
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0", "--overwrite"])
    assert torch.load(out / "last.pt", weights_only=True)["phase"] == 1


def build_slowly(folder, cache, report):
    """A cache build that decodes each image slowly enough for two builds to overlap; writes how
    many images it decoded itself, the cache's length and its last image's first bytes."""
    decoded, load = [], image_cache.load_image

    def slow(path, *preprocessing):
        decoded.append(path)
        time.sleep(0.02)
        return load(path, *preprocessing)

    image_cache.load_image = slow  # in this forked process alone
    built = image_cache.build_cache(
        folder, data.list_labelled_images(folder, ["a", "b"]), 12, cache, 2
    )
    report.write_text(f"{len(decoded)} {len(built)} {bytes(built.open()[-1]).hex()[:64]}")


def test_two_runs_building_one_cache_at_once_take_turns(tmp_path):
    folder = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=20) / "train"
    reports = [tmp_path / f"build{i}.txt" for i in range(2)]
    builds = [Forked(build_slowly, folder, tmp_path / "cache", report) for report in reports]
    assert [build.wait() for build in builds] == [0, 0]
    outputs = sorted(report.read_text().split() for report in reports)
    assert [o[0] for o in outputs] == ["0", "40"]  # one decoded every image, the other none
    assert outputs[0][1:] == outputs[1][1:] == [outputs[0][1], outputs[0][2]]
    suffixes = sorted(p.suffix for p in (tmp_path / "cache").iterdir())
    assert suffixes == [".hashes", ".json", ".lock", ".u8"]


def test_a_signal_during_the_last_epochs_validation_lets_the_finished_run_end_well(
    tiny_args, tmp_path, monkeypatch, capsys
):
    # 5 epochs, 2 validations each (the weights and their average): the 9th is the last epoch's.
    stop_at(monkeypatch, "validation=9")
    train.main(tiny_args + LEVERS + ["--out", str(tmp_path / "ck")])  # no SystemExit: it ended
    err = capsys.readouterr().err
    assert "stopped by" not in err and "best val acc" in err


def test_a_recipe_best_run_stopped_mid_phase_two_resumes_to_the_same_result(
    tiny_args, tmp_path, monkeypatch
):
    recipe = tiny_args + ["--recipe", "best", "--epochs1", "1", "--epochs2", "3"]
    train.main(recipe + ["--out", str(tmp_path / "straight")])
    out = tmp_path / "ck"
    with monkeypatch.context() as patch:
        stop_at(patch, "step=10")  # Phase II's second epoch
        with pytest.raises(SystemExit, match=str(utils.EXIT_PREEMPTED)):
            train.main(recipe + ["--out", str(out)])
    train.main(["--resume", str(out / "last.pt")])
    for name in ("last.pt", "averaged.pt", "best.pt"):
        a, b = (torch.load(p / name, weights_only=True) for p in (tmp_path / "straight", out))
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), (name, key)
        assert a.get("tta") == b.get("tta") and a.get("val_acc") == b.get("val_acc")


def test_a_first_ctrl_c_stops_at_the_step_and_saves_and_a_second_ends_at_once(
    tiny_args, tmp_path, monkeypatch, capsys
):
    """Ctrl-C as SIGTERM stops a run (its position saved, a line saying how to resume, exit
    130), but leaves no <out>/preempted: nobody preempted it. A second Ctrl-C ends the process at
    once, with a line, not a traceback."""
    options = tiny_args + ["--epochs1", "1", "--epochs2", "2"]
    train.main(options + ["--out", str(tmp_path / "straight")])
    out = tmp_path / "ck"
    with monkeypatch.context() as patch:
        stop_at(patch, "step=6", signal.SIGINT)  # Phase II's second batch
        with pytest.raises(SystemExit) as stopped:
            train.main(options + ["--out", str(out)])
    err = capsys.readouterr().err
    assert stopped.value.code == utils.EXIT_INTERRUPTED
    assert "stopped by Ctrl-C 2 batches into phase 2 epoch 1" in err
    assert f"Resume with: python train.py --resume {out / 'last.pt'}" in err
    assert not (out / "preempted").exists()
    train.main(["--resume", str(out / "last.pt")])
    same_run(tmp_path / "straight" / "last.pt", out / "last.pt")

    with monkeypatch.context() as patch:
        stop_at(patch, "step=2", signal.SIGINT, times=2)
        with pytest.raises(SystemExit) as ended:
            train.main(options + ["--out", str(tmp_path / "twice")])
    assert ended.value.code == utils.EXIT_INTERRUPTED
    assert "interrupted at once: nothing of this run was saved" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()  # a run that wrote nothing leaves no folder
