import argparse
import csv
import json
import math
import re
from contextlib import closing

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import evaluate
import model as M
import predict
import train
from conftest import COLOURS, TINY, copy_of, load_splits, make_dataset, write_image
from twophase import augment, checkpoint, inference
from twophase.checks import parameter_count
from twophase.loader import make_loader
from twophase.prefetch import on_device
from twophase.resolve import resolve
from twophase.run import SMALL_EPOCH, SMALLEST_BATCH, small_data
from twophase.schedule import Phase
from twophase.tally import EpochTally, epoch_totals

CPU = torch.device("cpu")


def one_epoch(model, loader, preprocess, criterion, optimizer):
    """optimizer_steps over a whole loader, on the CPU in float32, as a phase without clipping;
    returns the epoch's training metrics."""
    phase = Phase(
        number=1,
        epochs=1,
        optimizer=optimizer,
        peak_lrs=[group["lr"] for group in optimizer.param_groups],
        schedule=lambda epoch: 1.0,
        image_size=lambda epoch: None,
        weight_decay=0.0,
        clip=0.0,
        freeze_bn=False,
        mix=None,
        criterion=criterion,
        dtype=None,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
    )
    record = EpochTally()
    with closing(on_device(loader, preprocess, CPU)) as batches:
        steps = list(train.optimizer_steps(model, batches, len(loader), phase, None, record))
    assert steps == list(range(1, len(loader) + 1))  # it yields after each optimizer step
    return record.summary(CPU)


class ConstantLogits(torch.nn.Module):
    """Predicts class 1 for every image."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([0.0, 1.0]))

    def forward(self, x):
        return self.bias.expand(len(x), 2)


def test_an_epoch_averages_finite_losses_over_their_images_and_counts_the_others():
    labels = [torch.tensor([1, 1, 0, 1]), torch.tensor([0, 0, 1, 1]), torch.tensor([1, 0])]
    loader = [(torch.zeros(len(y), 2, 2, 3, dtype=torch.uint8), y) for y in labels]
    losses = iter([1.0, float("nan"), 4.0])  # each batch's mean loss

    def criterion(logits, target):
        return logits.sum() * 0 + next(losses)

    model = ConstantLogits()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    out = one_epoch(model, loader, lambda x: x.float(), criterion, optimizer)
    assert out["train_loss"] == pytest.approx((1.0 * 4 + 4.0 * 2) / 6)  # the nan batch left out
    assert out["nonfinite"] == 1 and out["batches"] == 3 and out["images"] == 10
    assert out["train_acc"] == pytest.approx(6 / 10)  # every image counts for accuracy


def test_epoch_totals_are_exact_past_float32s_range():
    """An epoch of 2**24 + 1 images (a large dataset's few epochs under DDP): float32 would round
    its image count and summed loss to 2**24."""
    losses, hits, sizes = (
        [torch.tensor(1.0), torch.tensor(3.0)],
        [torch.tensor(7), torch.tensor(1)],
        [2**24, 1],
    )
    loss_sum, counted, correct, nonfinite = epoch_totals(losses, hits, sizes, CPU)
    assert (loss_sum.item(), counted.item(), correct.item(), nonfinite.item()) == (
        2**24 + 3,
        2**24 + 1,
        8,
        0,
    )


def test_a_training_step_queues_few_ops_besides_the_model():
    """On a fast GPU the host's launches bound a step. Count, exactly, what optimizer_steps adds to
    a bare step (forward, loss, backward, optimizer step) of a tiny model: the epoch's
    bookkeeping."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    images, labels = torch.zeros(4, 2, 2, 3), torch.tensor([1, 0, 1, 1])
    criterion = torch.nn.CrossEntropyLoss()

    def bare(model, optimizer, steps):
        for _ in range(steps):
            criterion(model(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def epoch(model, optimizer, steps):
        one_epoch(model, [(images, labels)] * steps, lambda x: x, criterion, optimizer)

    def ops_per_step(run):
        counts = []
        for steps in (4, 8):  # the difference leaves out what an epoch does once
            model = ConstantLogits()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            Count.ops = 0
            with Count():
                run(model, optimizer, steps)
            counts.append(Count.ops)
        return (counts[1] - counts[0]) / 4

    assert ops_per_step(epoch) - ops_per_step(bare) <= 4  # argmax, eq, sum and a detach; it was 20


def test_phase_one_step_changes_the_head_and_nothing_else(dataset, tmp_path, narrow_models):
    splits = load_splits(dataset, 16, tmp_path / "c")
    net = M.build_model("resnet18", len(splits.classes), weights="none")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.AdamW(M.set_trainable(net, phase=1), lr=1e-2)
    loader = make_loader(splits.train, 8, shuffle=True)
    preprocess = augment.BatchPreprocess(augment=augment.DeviceAugment())
    one_epoch(net, loader, preprocess, nn.CrossEntropyLoss(), optimizer)
    after = net.state_dict()
    for name, _ in net.named_parameters():
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith("fc."), name
    # Batch norm statistics still adapt in Phase I (train mode), as in the released code.
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])


def test_validation_accuracy_is_an_exact_count(dataset, tmp_path, narrow_models):
    splits = load_splits(dataset, 16, tmp_path / "c")
    net = M.build_model("resnet18", len(splits.classes), weights="none")
    loader = make_loader(splits.val, 4, shuffle=False)  # 6 images: batches of 4 and 2
    normalise = augment.BatchPreprocess()
    result = inference.validation_metrics(net, loader, normalise, nn.CrossEntropyLoss(), CPU, None)
    with torch.no_grad():
        images, labels = splits.val[list(range(len(splits.val)))]
        logits = net.eval()(normalise(images))
    assert result["val_acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert result["val_top5"] == 1.0  # 3 classes: the top 5 holds every class


def read_history(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_two_phase_run_writes_checkpoints_and_history(tiny_args, tmp_path):
    train.main(tiny_args + "--epochs1 1 --epochs2 2 --save-every 1 --save-min-acc 0".split())
    out = tmp_path / "ck"
    written = {p.name for p in out.iterdir()}
    assert {"phase1.pt", "last.pt", "best.pt", "history.csv"} <= written
    assert {"phase2_epoch001.pt", "phase2_epoch002.pt"} <= written
    rows = read_history(out / "history.csv")
    assert [(r["phase"], r["epoch"]) for r in rows] == [("1", "1"), ("2", "1"), ("2", "2")]
    columns = "phase epoch lr train_loss train_acc val_loss val_acc val_top5 val_balanced"
    columns += " images_per_s seconds val_seconds steps img_size train_loss_curve"
    assert list(rows[0]) == columns.split()

    last = torch.load(out / "last.pt", weights_only=True)
    assert last["classes"] == ["cat", "dog", "eel"] and last["arch"] == "resnet18"
    assert (last["phase"], last["epoch"], last["img_size"]) == (2, 2, 16)
    assert isinstance(last["args"], dict) and last["args"]["epochs2"] == 2
    assert len(last["history"]) == 3 and last["optimizer"]["state"]
    best = torch.load(out / "best.pt", weights_only=True)
    best_acc = max(float(r["val_acc"]) for r in rows)
    assert best["history"][-1]["val_acc"] == best_acc
    phase1 = torch.load(out / "phase1.pt", weights_only=True)
    assert (phase1["phase"], phase1["epoch"]) == (1, 1)


def test_periodic_checkpoints_need_the_accuracy_threshold(tiny_args, tmp_path, capsys):
    train.main(tiny_args + "--epochs1 0 --epochs2 1 --save-every 1 --save-min-acc 1".split())
    names = {p.name for p in (tmp_path / "ck").iterdir()}
    assert "phase2_epoch001.pt" not in names and "phase1.pt" not in names and "last.pt" in names
    assert "phase2_epoch001.pt not kept: val acc" in capsys.readouterr().err


def same_state(a, b):
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    return a, b


def test_resume_equals_an_uninterrupted_run(tiny_args, tmp_path):
    straight = tiny_args + ["--epochs1", "1", "--epochs2", "2"]
    train.main(straight)
    (tmp_path / "ck").rename(tmp_path / "straight")

    # Stopped after Phase I's only epoch and after Phase II's first: resumed each time.
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "2", "--phase", "1"])
    train.main(["--resume", str(tmp_path / "ck" / "last.pt"), "--phase", "all", "--epochs2", "1"])
    train.main(["--resume", str(tmp_path / "ck" / "last.pt"), "--epochs2", "2"])
    a, b = same_state(tmp_path / "straight" / "last.pt", tmp_path / "ck" / "last.pt")
    assert (b["phase"], b["epoch"]) == (2, 2)
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]


def test_phase_one_then_phase_two_equals_both_at_once(tiny_args, tmp_path):
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "1"])
    (tmp_path / "ck").rename(tmp_path / "both")
    train.main(tiny_args + ["--epochs1", "1", "--phase", "1"])
    train.main(tiny_args + ["--epochs2", "1", "--phase", "2"])
    rows = read_history(tmp_path / "ck" / "history.csv")
    assert [r["phase"] for r in rows] == ["1", "2"]
    same_state(tmp_path / "both" / "last.pt", tmp_path / "ck" / "last.pt")


def test_phase_two_without_phase_one_warns_and_uses_weights(tiny_args, tmp_path, capsys):
    weights = M.build_model("resnet18", 3, weights="none").state_dict()
    torch.save(weights, tmp_path / "weights.pth")
    # A rate too small to move a float32 weight: the weights Phase II ends with are those it
    # started from (batch norm's statistics move).
    args = tiny_args + ["--epochs2", "1", "--phase", "2", "--lr2", "1e-30"]
    train.main(args + ["--weights", str(tmp_path / "weights.pth")])
    err = capsys.readouterr().err
    assert f"warning: no {tmp_path / 'ck' / 'phase1.pt'}, so Phase II starts from --weights" in err
    trained = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)["model"]
    assert torch.equal(trained["conv1.weight"], weights["conv1.weight"])
    assert torch.equal(trained["layer4.0.conv2.weight"], weights["layer4.0.conv2.weight"])
    assert not torch.equal(trained["fc.weight"], weights["fc.weight"])  # a new head, as always


def test_a_pretraining_run_is_the_weights_of_a_fine_tune(tiny_args, tmp_path, capsys):
    """Pretrain on one dataset, fine-tune on another with --weights <its best.pt>: every tensor
    but the head loads, the log says so, and the pretraining's normalisation comes along."""
    pretrain = tmp_path / "pretrain"
    train.main(
        tiny_args
        + [
            "--epochs1",
            "0",
            "--epochs2",
            "1",
            "--out",
            str(pretrain),
            "--mean",
            "0.5",
            "0.5",
            "0.5",
            "--std",
            "0.25",
            "0.25",
            "0.25",
        ]
    )
    target = make_dataset(tmp_path / "target", classes=("x", "y", "z", "w"))
    capsys.readouterr()
    train.main(
        tiny_args
        + [
            "--data",
            str(target),
            "--weights",
            str(pretrain / "best.pt"),
            "--epochs1",
            "1",
            "--epochs2",
            "0",
            "--out",
            str(tmp_path / "fine"),
        ]
    )
    err = capsys.readouterr().err
    assert f"of {pretrain / 'best.pt'}: resnet18 trained on 3 classes at 16 px" in err
    assert "inputs normalised with mean (0.500, 0.500, 0.500), std (0.250, 0.250, 0.250)" in err
    source = torch.load(pretrain / "best.pt", weights_only=True)
    fine = torch.load(tmp_path / "fine" / "last.pt", weights_only=True)
    assert (fine["mean"], fine["std"], fine["classes"]) == ([0.5] * 3, [0.25] * 3, list("wxyz"))
    # Phase I trains the head alone: the backbone is the pretraining's, to the bit.
    assert torch.equal(
        fine["model"]["layer2.0.conv1.weight"], source["model"]["layer2.0.conv1.weight"]
    )
    assert fine["model"]["fc.weight"].shape[0] == 4


def test_phase_two_says_when_its_learning_rate_climbs_back(tiny_args, tmp_path, capsys):
    train.main(tiny_args + ["--epochs1", "0", "--epochs2", "5"])  # warmup 1 + cosine 3 < 5
    assert "reaches --min-lr after 4 epochs and then climbs back" in capsys.readouterr().err
    train.main(tiny_args + ["--epochs1", "0", "--epochs2", "4", "--out", str(tmp_path / "b")])
    assert "climbs back" not in capsys.readouterr().err


def test_missing_data_folder_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="--demo"):
        train.main(["--data", str(tmp_path / "nowhere")] + TINY)


def test_demo_command_runs_end_to_end(tmp_path, demo_images, narrow_models, monkeypatch, capsys):
    """The README's first command, shortened: both phases (on the demo data test_data.py sees
    written); then the commands it prints: the figures, the report, the submission file and its
    score. (Fresh processes run the demo in test_distributed.py.)"""
    demo = copy_of(demo_images, tmp_path)
    demo = f"--demo --data {demo} --out {tmp_path / 'ck'} --epochs1 1 --epochs2 1"
    train.main([*demo.split(), "--img-size", "16"])
    out, err = capsys.readouterr()
    assert out == ""  # everything but results goes to stderr
    assert "phase 2 epoch   1/1" in err and "best val acc" in err
    assert (tmp_path / "demo" / "answers.csv").exists() and (tmp_path / "ck" / "best.pt").exists()
    commands = err.split("the rest of the pipeline, a few seconds each:\n")[1]
    evaluate_line, predict_line, check_line = commands.strip().splitlines()
    monkeypatch.chdir(tmp_path)  # figures/, prediction.csv
    evaluate.main(evaluate_line.split()[2:])
    assert (tmp_path / "figures" / "ck" / "report.md").is_file()  # a run in ck/: figures/ck
    predict.main(predict_line.split()[2:-2] + ["--out", "prediction.csv"])
    capsys.readouterr()
    predict.main(check_line.split()[2:])
    assert "prediction.csv: accuracy" in capsys.readouterr().out


def test_the_run_summary_counts_skipped_images(tiny_args, dataset, capsys):
    (dataset / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0"])
    assert "1 unreadable images were skipped" in capsys.readouterr().err


def test_compile_mode_reaches_torch_compile_and_checkpoints_stay_plain(
    tiny_args, tmp_path, monkeypatch
):
    modes = []
    real_compile = torch.compile

    def spy(net, mode=None):  # the eager backend: dynamo's wrapping without inductor's compile time
        modes.append(mode)
        return real_compile(net, backend="eager")

    monkeypatch.setattr(torch, "compile", spy)
    args = ["--epochs1", "1", "--epochs2", "1", "--compile", "reduce-overhead", "--ema", "0.9"]
    train.main(tiny_args + args)
    assert modes == ["reduce-overhead", "reduce-overhead"]  # anew for each phase
    saved = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert not [k for k in saved["model"] if "_orig_mod" in k]
    assert saved["args"]["compile"] == "reduce-overhead"
    assert saved["ema"]["updates"] > 0 and not [
        k for k in saved["ema"]["model"] if "_orig_mod" in k
    ]
    assert resolve(["--compile"]).options.compile == "default"
    assert resolve([]).options.compile is None


def test_resume_with_every_lever_on_ends_where_the_uninterrupted_run_does(tiny_args, tmp_path):
    levers = "--ema 0.9 --mixup 0.4 --cutmix 1.0 --lr-decay 0.7 --epochs1 1".split()
    train.main(tiny_args + levers + ["--epochs2", "3"])
    (tmp_path / "ck").rename(tmp_path / "straight")
    train.main(tiny_args + levers + ["--epochs2", "1"])
    for epochs in ("2", "3"):
        train.main(["--resume", str(tmp_path / "ck" / "last.pt"), "--epochs2", epochs])
    a, b = same_state(tmp_path / "straight" / "last.pt", tmp_path / "ck" / "last.pt")
    assert a["ema"]["updates"] == b["ema"]["updates"] > 0
    for key, value in a["ema"]["model"].items():
        assert torch.equal(value, b["ema"]["model"][key]), key
    for ra, rb in zip(a["history"], b["history"]):
        assert (ra["val_acc"], ra["ema_val_acc"]) == (rb["val_acc"], rb["ema_val_acc"])
        assert ra["train_loss"] == rb["train_loss"]
    assert len(b["optimizer"]["param_groups"]) == 6  # head, four stages, stem


def test_ema_is_validated_beside_the_weights_and_best_pt_says_which_it_holds(tiny_args, tmp_path):
    train.main(tiny_args + ["--ema", "0.5", "--epochs1", "1", "--epochs2", "2"])
    rows = read_history(tmp_path / "ck" / "history.csv")
    assert all(r["ema_val_acc"] != "" for r in rows)
    best = torch.load(tmp_path / "ck" / "best.pt", weights_only=True)
    record = best["history"][-1]
    expected = "ema" if record["ema_val_acc"] > record["val_acc"] else "model"
    assert best["eval_weights"] == expected
    scores = [max(float(r["val_acc"]), float(r["ema_val_acc"])) for r in rows]
    assert max(record["val_acc"], record["ema_val_acc"]) == max(scores)


def test_the_start_line_counts_parameters_and_warns_past_max_params(tiny_args, capsys):
    assert parameter_count("100M") == 100_000_000 and parameter_count("2.5K") == 2500
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0", "--max-params", "1000"])
    err = capsys.readouterr().err
    assert "resnet18 (0.1M parameters)" in err
    assert "parameters, more than --max-params 1,000" in err


def test_ema_added_on_resume_adds_its_columns_to_history_csv(tiny_args, tmp_path):
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0"])
    train.main(["--resume", str(tmp_path / "ck" / "last.pt"), "--epochs2", "1", "--ema", "0.9"])
    rows = read_history(tmp_path / "ck" / "history.csv")
    assert [r["ema_val_acc"] for r in rows][0] == "" and rows[1]["ema_val_acc"] != ""
    history = checkpoint.full_history(
        tmp_path / "ck" / "last.pt", torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    )
    assert math.isnan(history[0]["ema_val_acc"]) and len(history) == 2


def test_a_kaggle_style_run_trains_evaluates_and_predicts_without_being_told_again(
    tmp_path, narrow_models, monkeypatch, capsys
):
    """A flat train/ and a train.csv of id,breed with the ids' extensions left out, weighted
    classes and balanced batches: evaluate.py and predict.py read the run's labels, resize mode
    and classes from its checkpoint; --check scores the submission."""
    root = tmp_path / "kaggle"
    lines = ["id,breed"]
    for i, c in enumerate(("husky", "pug", "corgi")):
        for j in range(6 if i else 12):  # uneven: 12, 6, 6
            name = f"{c[0]}{j:02d}"
            write_image(root / "train" / f"{name}.jpg", COLOURS[i], seed=10 * i + j)
            lines.append(f"{name},{c}")
        write_image(root / "test" / f"t{i}.jpg", COLOURS[i], seed=100 + i)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    (root / "answers.csv").write_text("image_name,pred_label\nt0,husky\nt1,pug\nt2,corgi\n")
    monkeypatch.chdir(root)
    options = ["--data", ".", "--labels", "train.csv", "--out", "ck", *TINY, "--resize", "pad"]
    options += [
        "--class-weights",
        "auto",
        "--sampler",
        "balanced",
        "--epochs1",
        "1",
        "--epochs2",
        "1",
    ]
    train.main(options)
    assert "train/ images labelled by train.csv, val held out" in capsys.readouterr().err
    state = torch.load(root / "ck" / "best.pt", weights_only=True)
    assert state["classes"] == ["corgi", "husky", "pug"] and state["args"]["resize"] == "pad"
    assert state["args"]["labels"] == str(root / "train.csv")  # resolved: read from anywhere
    assert sorted(state["class_counts"]) == [5, 5, 11]  # a class's sixth image validates
    monkeypatch.chdir(tmp_path)
    evaluate.main(["--ckpt", str(root / "ck" / "best.pt"), "--figures", "figs"])
    predict.main(["--ckpt", str(root / "ck" / "best.pt"), "--out", "p.csv"])
    capsys.readouterr()
    predict.main(
        [
            "--ckpt",
            str(root / "ck" / "best.pt"),
            "--check",
            "p.csv",
            "--answers",
            str(root / "answers.csv"),
        ]
    )
    assert "p.csv: accuracy" in capsys.readouterr().out
    assert any("-pad-" in p.name for p in (root / ".cache").iterdir())  # predict used the pad cache


def test_a_progressive_run_trains_each_epoch_at_its_size_and_validates_at_the_full_one(
    tiny_args, tmp_path, monkeypatch, capsys
):
    seen = []
    real = M.build_model

    def spying(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, x: seen.append((m.training, x[0].shape[-1])))
        return model

    monkeypatch.setattr(train, "build_model", spying)
    options = ["--epochs1", "1", "--epochs2", "3", "--img-size", "32", "--progressive", "0.5"]
    train.main(tiny_args + options + ["--test-size", "auto"])
    history = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)["history"]
    assert [r["img_size"] for r in history] == [32, 16, 24, 32]  # Phase I at the full size
    assert {side for training, side in seen if training} == {16, 24, 32}
    assert {side for training, side in seen if not training} == {32}  # validation: the full size
    best = torch.load(tmp_path / "ck" / "best.pt", weights_only=True)
    err = capsys.readouterr().err
    assert (
        best["test_size"] in (32, 40, 48) and "--test-size auto: best.pt validated at 32 px" in err
    )
    assert "40 px, batch norm measured again" in err
    predict.main(
        [
            "--ckpt",
            str(tmp_path / "ck" / "best.pt"),
            "--img-size",
            "56",
            "--out",
            str(tmp_path / "p.csv"),
        ]
    )
    assert (
        "--img-size 56: testing at 56 px, where the run trained at 32 px" in capsys.readouterr().err
    )


def test_the_layout_of_two_label_files_over_one_flat_train_folder_trains(
    tmp_path, narrow_models, capsys
):
    from test_data import flat_with_two_csvs

    root = flat_with_two_csvs(tmp_path / "k")
    labels = ["--labels", "train.csv", "--val-labels", "val.csv", "--epochs", "2"]
    train.main(["--data", str(root), *labels, "--out", str(tmp_path / "ck"), *TINY])
    assert "8 train / 4 val images" in capsys.readouterr().err
    assert (tmp_path / "ck" / "best.pt").is_file()


def test_test_size_auto_caches_only_the_held_out_images_at_the_larger_sizes(
    tmp_path, narrow_models, capsys
):
    """Validation held out of the training images: at each larger size tried, the validation
    images alone are cached (not the training set, twice), and evaluate.py reads them so too."""
    root = make_dataset(tmp_path / "data", per_class=6, val_per_class=0)  # no val/
    options = [*TINY, "--epochs1", "1", "--epochs2", "1", "--test-size", "auto"]
    train.main(["--data", str(root), "--out", str(tmp_path / "ck"), *options])
    held_out = torch.load(tmp_path / "ck" / "best.pt", weights_only=True)
    indexes = {p: json.loads(p.read_text()) for p in (root / ".cache").glob("*.json")}
    by_size = {}
    for index in indexes.values():
        by_size.setdefault(index["size"], []).append(len(index["files"]))
    # 3 of the 18 validate; test/'s 5 are cached at the run's size, checked for copies
    assert {size: sorted(n) for size, n in by_size.items()} == {16: [5, 18], 24: [3], 32: [3]}
    evaluate.main(["--ckpt", str(tmp_path / "ck" / "best.pt"), "--img-size", "40"])
    assert "3 validation images" in capsys.readouterr().out
    assert len(list((root / ".cache").glob("*-40px-*.json"))) == 1
    assert held_out["args"]["test_size"] == "auto"


def test_uneven_classes_are_said_as_the_run_starts_with_balanced_accuracy_in_its_lines(
    tmp_path, narrow_models, capsys
):
    root = make_dataset(tmp_path / "data", per_class=9)
    for image in sorted((root / "train" / "eel").iterdir())[2:]:
        image.unlink()  # 9, 9 and 2 training images: the largest 4 times the smallest
    train.main(["--data", str(root), "--out", str(tmp_path / "ck"), *TINY, "--epochs", "2"])
    err = capsys.readouterr().err
    assert "the classes are uneven: 2 to 9 training images a class" in err
    assert "--class-weights auto or --sampler balanced weigh the small ones up (off here" in err
    assert re.search(r"phase 2 epoch   1/1 .* val loss \S+ acc \S+ bal \S+ \|", err)
    assert "top5" not in err  # of 3 classes, top-5 is 1 by definition
    assert re.search(r"best val acc \S+, balanced \S+ \(phase", err)
    history = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)["history"]
    assert all(0 <= r["val_balanced"] <= 1 for r in history)


def small_args(batch=72, accum=1, epochs1=1, lr1=5e-4, lr2=5e-4):
    return argparse.Namespace(
        batch_size=batch, accum_steps=accum, epochs1=epochs1, lr1=lr1, lr2=lr2
    )


def test_small_data_is_said_with_a_batch_that_makes_enough_steps_and_rates_for_it():
    line = small_data(240, small_args(), world_size=1)
    assert line.startswith("small data: 240 training images make 4 optimizer steps an epoch")
    assert "Phase I gives the new head 4 steps in all" in line
    assert "try --batch-size 8 --lr1 auto --lr2 auto: 30 steps an epoch" in line
    assert "--batch-size 16 --lr1 auto" in small_data(600, small_args(), world_size=1)
    assert small_data(20_000, small_args(), world_size=1) is None  # 278 steps an epoch
    assert small_data(240, small_args(batch=8), world_size=1) is None  # already the smallest
    assert "--lr1" not in small_data(240, small_args(lr1="auto", lr2="auto"), world_size=1)
    # Under torchrun the batch is each process's: 4 processes of 72 on 2,000 images.
    assert "--batch-size 16 " in small_data(2000, small_args(), world_size=4)
    assert "--accum-steps 1" in small_data(600, small_args(batch=36, accum=2), world_size=1)


@settings(max_examples=200, deadline=None)
@given(
    images=st.integers(1, 100_000),
    batch=st.integers(1, 512),
    accum=st.integers(1, 8),
    world=st.sampled_from([1, 2, 4, 8]),
)
def test_small_data_suggests_a_smaller_batch_only_and_as_many_steps_as_it_can(
    images, batch, accum, world
):
    line = small_data(images, small_args(batch, accum), world)
    steps = -(-images // (batch * accum * world))
    if steps >= SMALL_EPOCH:
        assert line is None
        return
    if line is None:  # no smaller batch to offer
        assert SMALLEST_BATCH >= batch * accum
        return
    suggested = int(re.search(r"--batch-size (\d+)", line)[1])
    assert SMALLEST_BATCH <= suggested < batch * accum
    assert suggested & (suggested - 1) == 0  # a power of two
    assert suggested == SMALLEST_BATCH or -(-images // (suggested * world)) >= SMALL_EPOCH
    assert -(-images // (2 * suggested * world)) < SMALL_EPOCH  # the largest that makes enough


def test_train_says_as_it_starts_that_an_epoch_of_small_data_is_a_few_steps(
    tmp_path, narrow_models, capsys
):
    root = make_dataset(tmp_path / "data", per_class=9)  # 27 training images
    out = tmp_path / "ck"
    options = [*TINY, "--batch-size", "16", "--epochs1", "1", "--epochs2", "0"]
    train.main(["--data", str(root), "--out", str(out), *options])
    err = capsys.readouterr().err
    assert "small data: 27 training images make 2 optimizer steps an epoch at batch 16" in err
    assert "try --batch-size 8 --lr1 auto --lr2 auto: 4 steps an epoch" in err
    saved = checkpoint.load_checkpoint(out / "phase1.pt")["args"]
    assert saved["batch_size"] == 16  # said, not changed: the user decides
