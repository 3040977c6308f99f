"""Phase I from cached features (--phase1-features N): the head trained on the frozen backbone's
features of N passes learns what Phase I on the images teaches it where N is --epochs1, computes
the backbone's forward N times where it is fewer, and resumes, plans its time, continues and runs
under DDP as a Phase I does."""

import math
import re
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import model as M
import train
from conftest import NO_AUGMENT, TINY, examples, make_dataset, narrowed, stop_at
from test_distributed import one_and_two_processes
from twophase import augment, features
from utils import seed_everything

PHASE1 = [*TINY, "--phase", "1"]


def phase1(data, out, *options):
    """Phase I of a tiny run in `out`, narrow; its phase1.pt."""
    train.main(["--data", str(data), "--out", str(out), *PHASE1, *options])
    return torch.load(out / "phase1.pt", weights_only=True)


def assert_same_run(a, b, atol=1e-6):
    """Two checkpoints of one run: the same weights (batch norm statistics too), moving average
    and training and validation record, to float tolerance."""
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.allclose(a["model"][key].float(), b["model"][key].float(), atol=atol), key
    if a["ema"] is not None:
        for key, value in a["ema"]["model"].items():
            assert torch.allclose(value.float(), b["ema"]["model"][key].float(), atol=atol), key
    for ra, rb in zip(a["history"], b["history"], strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "steps"):
            assert ra[key] == pytest.approx(rb[key], abs=atol), key


@pytest.mark.parametrize(
    "levers",
    [
        pytest.param(["--freeze-bn", *NO_AUGMENT], id="frozen-bn-no-augmentation"),
        pytest.param([], id="bn-adapts-augmented"),
        pytest.param(
            "--ema 0.9 --accum-steps 2 --class-weights auto --sampler balanced".split(),
            id="ema-accum-weights-balanced",
        ),
    ],
)
def test_with_a_pass_for_every_epoch_the_head_is_phase_ones_head(
    levers, dataset, tmp_path, narrow_models
):
    """The proof of equivalence: each pass is its epoch's draws, so the head steps on the same
    inputs as Phase I's, in the same order; batch norm's statistics adapt as Phase I's do."""
    options = ["--epochs1", "3", "--label-smoothing", "0.2", *levers]
    images = phase1(dataset, tmp_path / "images", *options)
    cached = phase1(dataset, tmp_path / "cached", *options, "--phase1-features", "3")
    assert_same_run(images, cached)
    assert cached["args"]["phase1_features"] == 3


class Counted:
    """The backbone's training-mode forwards (one a batch of a pass) and the augmented batches."""

    def __init__(self, monkeypatch):
        self.augmented, self.forwards = 0, 0
        real = augment.DeviceAugment.forward

        def counted(module, *args, **kwargs):
            self.augmented += 1
            return real(module, *args, **kwargs)

        monkeypatch.setattr(augment.DeviceAugment, "forward", counted)

    def hook(self, model):
        def count(layer, inputs):
            self.forwards += layer.training

        model.layer1.register_forward_pre_hook(count)


def test_with_fewer_passes_than_epochs_the_backbone_runs_once_a_pass(
    dataset, tmp_path, narrow_models, monkeypatch
):
    counted = Counted(monkeypatch)
    real = train.set_up

    def hooked(args, start, splits, model, *rest):
        counted.hook(model)
        return real(args, start, splits, model, *rest)

    monkeypatch.setattr(train, "set_up", hooked)
    state = phase1(dataset, tmp_path / "ck", "--epochs1", "5", "--phase1-features", "2")
    batches = state["history"][0]["steps"]  # 18 images, batch 4, the partial one dropped: 4
    assert counted.augmented == counted.forwards == 2 * batches
    assert len(state["history"]) == 5
    assert all(math.isfinite(r["train_loss"]) for r in state["history"])


def test_the_epochs_that_reuse_a_pass_take_its_images_in_an_order_of_their_own(
    dataset, tmp_path, narrow_models
):
    """Pass e mod N, but not the same steps: a later epoch draws its own order."""
    state = phase1(dataset, tmp_path / "ck", "--epochs1", "3", "--phase1-features", "1")
    curves = [r["train_loss_curve"] for r in state["history"]]
    assert curves[1] != curves[2]
    stream = features.FeatureStream(None, None, 1, seed=0, procs=type("P", (), {"rank": 0}))
    orders = [stream.order(epoch, 16, torch.device("cpu")) for epoch in (1, 2, 1)]
    assert not torch.equal(orders[0], orders[1]) and torch.equal(orders[0], orders[2])
    assert sorted(orders[0].tolist()) == list(range(16))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """Phase I of 4 epochs on 2 passes, uninterrupted, and the same stopped by a signal two
    batches into its second epoch (its own pass) and, resumed, two into its third (pass 0
    again): each stop's last.pt kept."""
    root = tmp_path_factory.mktemp("features")
    data = make_dataset(root / "data")
    options = ["--epochs1", "4", "--phase1-features", "2", "--save-every-steps", "1"]
    argv = ["--data", str(data), *PHASE1, *options]
    stops = {}
    with narrowed():
        train.main([*argv, "--out", str(root / "straight")])
        # 4 batches an epoch, a position saved after each step but an epoch's last, and at its
        # end: the signal comes with the first step's save of the second epoch (the 5th save),
        # and, resumed at its third step, of the third (the 3rd), and stops the step after.
        for name, moment, resume in (("own", "save=5", False), ("again", "save=3", True)):
            with pytest.MonkeyPatch.context() as patch:
                stop_at(patch, moment)
                with pytest.raises(SystemExit):
                    if resume:
                        train.main(["--resume", str(root / "stopped" / "last.pt")])
                    else:
                        train.main([*argv, "--out", str(root / "stopped")])
            stops[name] = root / f"{name}.pt"
            shutil.copy(root / "stopped" / "last.pt", stops[name])
        train.main(["--resume", str(root / "stopped" / "last.pt")])
    return root, data, stops


def test_a_run_stopped_mid_phase_one_resumes_to_the_uninterrupted_runs_head(stopped):
    root, _, stops = stopped
    positions = [torch.load(stops[n], weights_only=True) for n in ("own", "again")]
    assert [(p["phase"], p["epoch"], p["step"]) for p in positions] == [(1, 1, 2), (1, 2, 2)]
    straight = torch.load(root / "straight" / "phase1.pt", weights_only=True)
    resumed = torch.load(root / "stopped" / "phase1.pt", weights_only=True)
    assert_same_run(straight, resumed)
    assert "features" not in str(list(resumed))  # nothing of the passes is saved


def test_another_number_of_passes_goes_on_from_an_epochs_start_alone(
    stopped, tmp_path, narrow_models
):
    root, _, stops = stopped
    with pytest.raises(SystemExit, match="--phase1-features 3 .*stopped 2 batches into an epoch"):
        train.main(["--resume", str(stops["own"]), "--phase1-features", "3"])
    with pytest.raises(SystemExit, match="--phase1-features 0 .*Phase I of this run is over"):
        train.main(["--resume", str(root / "straight" / "phase1.pt"), "--phase1-features", "0"])
    # At an epoch's end another value trains the rest of Phase I: Phase I on the images here.
    state = torch.load(root / "straight" / "phase1.pt", weights_only=True)
    at_epoch_end = {**state, "epoch": 2, "history": state["history"][:2]}
    torch.save(at_epoch_end, tmp_path / "last.pt")
    out = tmp_path / "on"
    train.main(["--resume", str(tmp_path / "last.pt"), "--phase1-features", "0", "--out", str(out)])
    on = torch.load(out / "phase1.pt", weights_only=True)
    assert (on["epoch"], on["args"]["phase1_features"], len(on["history"])) == (4, 0, 4)


def test_the_time_budget_counts_a_feature_pass_and_times_the_heads_step(
    dataset, tmp_path, narrow_models, monkeypatch, capsys
):
    seen, real = {}, train.time_steps
    monkeypatch.setattr(
        train, "time_steps", lambda run, training: seen.setdefault("speed", real(run, training))
    )
    argv = ["--data", str(dataset), *TINY, "--epochs1", "2"]
    with pytest.raises(SystemExit, match="Not even --epochs 2 fits"):
        train.main([*argv, "--phase1-features", "1", "--time-budget", "0.1s"])
    assert {"pass", "step1", "step2"} <= set(seen["speed"]) and seen["speed"]["pass"] > 0

    # 4 batches an epoch: a Phase I epoch 4 x 1 + 1 s, a pass 4 x 2 s; a Phase II epoch 41 s.
    speed = {"step1": 1.0, "pass": 2.0, "step2": 10.0, "validation": 1.0, "save": 0.0}
    monkeypatch.setattr(train, "time_steps", lambda run, training: speed)
    monkeypatch.setattr(train, "train_phase", stop_training)  # planned: no need to train
    plans = {}
    for passes in ("2", "0"):
        with pytest.raises(SystemExit, match="planned"):
            train.main([*argv, "--time-budget", "150s", "--phase1-features", passes])
        plans[passes] = capsys.readouterr().err
    # About 145 s left: 2 x 5 s + 2 x 8 s + 41 s a Phase II epoch fits 2; without passes, 3.
    assert "So --epochs 4 (2 + 2" in plans["2"], plans["2"]
    assert "a Phase I feature pass 2 s a batch, a head step 1 s" in plans["2"]
    assert "an epoch 5.0 s in Phase I (+8.0 s for each of its 2 feature passes)" in plans["2"]
    assert "So --epochs 5 (2 + 3" in plans["0"], plans["0"]
    assert "a Phase I step takes 1 s" in plans["0"]


def stop_training(run, phase):
    raise SystemExit("planned")


def test_under_ddp_each_process_caches_its_share_and_the_head_trains_as_one_processs(
    tmp_path, narrow_models
):
    data = make_dataset(tmp_path / "data", per_class=6, val_per_class=1)
    common = ["--data", data, *TINY, "--epochs1", "2", "--epochs2", "0", "--freeze-bn"]
    common += [*NO_AUGMENT, "--phase1-features", "2"]
    one, two = one_and_two_processes(common, tmp_path)
    assert_same_run(one, two, atol=1e-5)
    log = (tmp_path / "rank0.log").read_text()
    assert re.search(r"2 passes of 8 images x 64 features per process", log), log[-2000:]


def test_passes_that_would_not_fit_are_refused_with_the_most_that_do(
    dataset, tmp_path, narrow_models, monkeypatch
):
    # 16 images x (64 features x 4 + 8) bytes: 4,224 a pass; 3 of them fit in 0.8 x 16,000.
    monkeypatch.setattr(features, "free_memory", lambda device: 16_000)
    with pytest.raises(
        SystemExit,
        match=r"--phase1-features 5: 5 passes of 16 images x 64 "
        r"features take 21\.1 KB, .*give --phase1-features 3, the most that fit",
    ):
        phase1(dataset, tmp_path / "ck", "--epochs1", "6", "--phase1-features", "5")
    state = phase1(dataset, tmp_path / "ok", "--epochs1", "6", "--phase1-features", "3")
    assert len(state["history"]) == 6


@settings(max_examples=examples(4))
@given(
    passes=st.integers(1, 4),
    epochs1=st.integers(1, 4),
    batch=st.sampled_from([3, 4, 8]),
    accum=st.integers(1, 3),
    sampler=st.sampled_from(["shuffle", "balanced"]),
)
def test_any_passes_epochs_batch_accumulation_and_sampler_train_the_head_alone(
    tmp_path_factory, passes, epochs1, batch, accum, sampler
):
    """Whatever combines: each epoch trains every batch of its pass (18 images, the partial
    batch dropped) in steps of --accum-steps, its loss finite; the head learns, the backbone's
    weights stay as they were made."""
    root = tmp_path_factory.mktemp("drawn")
    data = make_dataset(root / "data")
    options = ["--epochs1", str(epochs1), "--phase1-features", str(passes)]
    options += ["--batch-size", str(batch), "--accum-steps", str(accum), "--sampler", sampler]
    with narrowed():
        state = phase1(data, root / "ck", *options)
        seed_everything(0)  # as the run made its model
        made = M.build_model("resnet18", 3, weights="none").state_dict()
    assert len(state["history"]) == epochs1
    for record in state["history"]:
        assert math.isfinite(record["train_loss"]), record
        assert record["steps"] == math.ceil(18 // batch / accum)
    for key, value in made.items():
        if key.endswith(".weight") or key.endswith(".bias"):
            assert torch.equal(value, state["model"][key]) != key.startswith("fc."), key
