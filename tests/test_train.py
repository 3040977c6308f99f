import copy
import csv
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import augment
import data
import model as M
import train
import utils
from conftest import REPO, TINY, make_dataset
from resume import load_optimizer_state

CPU = torch.device("cpu")


def method_lr(epoch):
    """The Phase II learning rate before epoch e (0-based), as the released code's
    SequentialLR(LinearLR(0.1, 5 epochs), CosineAnnealingLR(T_max=45, eta_min=5e-6)) sets it:
    5e-4 * (0.1 + 0.9 e / 5) for e < 5, then 5e-6 + (5e-4 - 5e-6) (1 + cos(pi (e - 5) / 45)) / 2."""
    if epoch < 5:
        return 5e-4 * (0.1 + 0.9 * epoch / 5)
    return 5e-6 + (5e-4 - 5e-6) * (1 + math.cos(math.pi * (epoch - 5) / 45)) / 2


class HeadOnTop(nn.Module):
    """The smallest model with a backbone and an fc head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(2, 2)
        self.fc = nn.Linear(2, 3)


def phase2_lrs(argv, epochs):
    args, _ = train.parse_args(argv)
    phase = train.phase_setup(2, args, HeadOnTop(), CPU)
    lrs = []
    for _ in range(epochs):
        lrs.append(phase.optimizer.param_groups[0]["lr"])
        phase.optimizer.step()
        phase.scheduler.step()
    return lrs


def test_phase_two_learning_rate_follows_the_method_at_every_epoch():
    lrs = phase2_lrs([], 125)
    for epoch, lr in enumerate(lrs):
        assert lr == pytest.approx(method_lr(epoch), rel=1e-9), epoch
    assert lrs[50] == pytest.approx(5e-6) and lrs[95] == pytest.approx(5e-4)
    assert lrs[124] == pytest.approx(1.44e-4, rel=1e-2)


def test_cosine_epochs_120_gives_one_monotone_decay():
    lrs = phase2_lrs(["--cosine-epochs", "120"], 125)
    assert all(b <= a for a, b in zip(lrs[5:], lrs[6:]))
    expected = 5e-6 + (5e-4 - 5e-6) * (1 + math.cos(math.pi * 119 / 120)) / 2
    assert lrs[-1] == pytest.approx(expected)


def test_defaults_are_the_methods_table():
    args, _ = train.parse_args([])
    model = (args.arch, args.weights, args.img_size, args.batch_size, args.cache_workers)
    assert model == ("wide_resnet50_2", "imagenet", 224, 72, 4)
    phases = (args.epochs1, args.lr1, args.wd1, args.epochs2, args.optimizer2, args.lr2, args.wd2)
    assert phases == (10, 5e-4, 1e-4, 125, "nadam", 5e-4, 1e-4)
    rest = (args.clip, args.label_smoothing, args.amp, args.save_every, args.save_min_acc)
    assert rest == (0.8, 0.1, "fp16", 15, 0.82)
    assert (args.p_jitter, args.p_blur, args.p_hflip, args.p_vflip) == (0.5, 0.5, 0.3, 0.3)
    help_text = train.get_args_parser().format_help()
    assert "(default: 72)" in help_text and "(default: nadam)" in help_text
    assert train.parse_args(["--workers", "2"])[0].cache_workers == 2  # the name it had before


def test_each_phase_is_set_up_as_the_methods_table_says():
    args, _ = train.parse_args([])
    net = HeadOnTop()
    one = train.phase_setup(1, args, net, CPU)
    assert isinstance(one.optimizer, torch.optim.AdamW) and one.scheduler is None
    assert (one.epochs, one.clip, one.freeze_bn) == (10, 0.0, False)
    assert [p.requires_grad for p in net.parameters()] == [False, False, True, True]  # fc only
    assert one.optimizer.param_groups[0]["params"] == list(net.fc.parameters())
    group = one.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (5e-4, 1e-4)

    two = train.phase_setup(2, args, net, CPU)
    assert isinstance(two.optimizer, torch.optim.NAdam) and (two.epochs, two.clip) == (125, 0.8)
    assert all(p.requires_grad for p in net.parameters())
    assert len(two.optimizer.param_groups[0]["params"]) == 4
    group = two.optimizer.param_groups[0]
    assert (group["initial_lr"], group["weight_decay"]) == (5e-4, 1e-4)
    assert train.phase_setup(1, train.parse_args(["--freeze-bn"])[0], net, CPU).freeze_bn


def test_demo_preset_yields_to_options_given():
    args, _ = train.parse_args(["--demo", "--epochs2", "3"])
    assert (args.arch, args.weights, args.epochs2, args.data) == (
        "resnet18",
        "none",
        3,
        "data/demo",
    )


@pytest.mark.parametrize("name", sorted(train.OPTIMIZERS))
def test_every_phase_two_optimizer_is_built_with_the_arguments(name):
    args, _ = train.parse_args(["--optimizer2", name, "--lr2", "3e-3", "--wd2", "2e-5"])
    optimizer = train.phase_setup(2, args, HeadOnTop(), CPU).optimizer
    assert type(optimizer) is train.OPTIMIZERS[name][0]
    group = optimizer.param_groups[0]
    assert (group["initial_lr"], group["weight_decay"]) == (3e-3, 2e-5)
    for option, value in train.OPTIMIZERS[name][1].items():
        assert group[option] == value


def test_optimizers_step_fused_on_cuda_where_pytorch_has_a_fused_step():
    cuda = torch.device("cuda")
    assert train.step_on_device(torch.optim.AdamW, cuda) == {"fused": True}
    assert train.step_on_device(torch.optim.SGD, cuda) == {"fused": True}
    assert train.step_on_device(torch.optim.NAdam, cuda) == {}  # PyTorch has no fused NAdam
    assert train.step_on_device(torch.optim.AdamW, CPU) == {"fused": False}


@pytest.mark.parametrize("name,option", [("adamw", "fused"), ("nadam", "capturable")])
def test_optimizer_state_saved_on_cuda_resumes_on_the_cpu(name, option):
    def build(value):
        return train.make_optimizer(
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


def one_epoch(model, loader, preprocess, criterion, optimizer):
    """train_one_epoch on the CPU in float32."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return train.train_one_epoch(model, loader, preprocess, criterion, optimizer, scaler, CPU, None)


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
    loss_sum, counted, correct, nonfinite = train.epoch_totals(losses, hits, sizes, CPU)
    assert (loss_sum.item(), counted.item(), correct.item(), nonfinite.item()) == (
        2**24 + 3,
        2**24 + 1,
        8,
        0,
    )


def test_a_training_step_queues_few_ops_besides_the_model():
    """On a fast GPU the host's launches bound a step. Count, exactly, what train_one_epoch adds to
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
    splits = data.load_splits(dataset, 16, tmp_path / "c")
    net = M.build_model("resnet18", len(splits.classes), weights="none")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.AdamW(M.set_trainable(net, phase=1), lr=1e-2)
    loader = data.make_loader(splits.train, 8, shuffle=True)
    preprocess = augment.BatchPreprocess(augment=augment.DeviceAugment())
    one_epoch(net, loader, preprocess, nn.CrossEntropyLoss(), optimizer)
    after = net.state_dict()
    for name, _ in net.named_parameters():
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith("fc."), name
    # Batch norm statistics still adapt in Phase I (train mode), as in the released code.
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])


def test_validation_accuracy_is_an_exact_count(dataset, tmp_path, narrow_models):
    splits = data.load_splits(dataset, 16, tmp_path / "c")
    net = M.build_model("resnet18", len(splits.classes), weights="none")
    loader = data.make_loader(splits.val, 4, shuffle=False)  # 6 images: batches of 4 and 2
    normalise = augment.BatchPreprocess()
    result = train.evaluate(net, loader, normalise, nn.CrossEntropyLoss(), CPU, None)
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
    columns = "phase epoch lr train_loss train_acc val_loss val_acc val_top5 images_per_s seconds"
    assert list(rows[0]) == columns.split() + ["val_seconds"]

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
    train.main(tiny_args + "--epochs1 0 --epochs2 1 --save-every 1 --save-min-acc 1.01".split())
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
    # lr 0: the weights Phase II ends with are those it started from (batch norm's statistics move).
    args = tiny_args + ["--epochs2", "1", "--phase", "2", "--lr2", "0"]
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


def test_demo_command_runs_end_to_end(tmp_path):
    """The README's first command, shortened: a fresh process, data written, both phases."""
    demo = f"--demo --data {tmp_path / 'demo'} --out {tmp_path / 'ck'} --epochs1 1 --epochs2 1"
    result = subprocess.run(
        [sys.executable, "tests/narrow.py", "train.py", *demo.split(), "--img-size", "16"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # everything but results goes to stderr
    assert "phase 2 epoch   1/1" in result.stderr and "best val acc" in result.stderr
    assert (tmp_path / "demo" / "answers.csv").exists() and (tmp_path / "ck" / "best.pt").exists()


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
    assert train.parse_args(["--compile"])[0].compile == "default"
    assert train.parse_args([])[0].compile is None


def test_resume_of_a_checkpoint_from_an_earlier_version(tiny_args, tmp_path):
    """Saved when --compile took no mode, and before an option existed: the option gets its
    default."""
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0"])
    state = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    state["args"]["compile"] = False
    del state["args"]["accum_steps"]
    torch.save(state, tmp_path / "old.pt")
    args, _ = train.parse_args(["--resume", str(tmp_path / "old.pt")])
    assert args.compile is None and args.accum_steps == 1
    state["args"]["compile"] = True
    torch.save(state, tmp_path / "old.pt")
    assert train.parse_args(["--resume", str(tmp_path / "old.pt")])[0].compile == "default"
    off = train.parse_args(["--resume", str(tmp_path / "old.pt"), "--compile", "off"])[0]
    assert off.compile is None
    state["args"]["workers"] = state["args"].pop("cache_workers") + 3  # its name before
    # A demo run resumes with its own arguments, not the demo's preset.
    state["args"]["demo"] = True
    torch.save(state, tmp_path / "old.pt")
    args, _ = train.parse_args(["--resume", str(tmp_path / "old.pt")])
    assert args.img_size == 16 and args.cache_workers == 3


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


@pytest.mark.parametrize(
    "option, message",
    [
        ("--ema 1.5", "the decay must be between 0 and 1"),
        ("--mixup -1", "alpha must be positive"),
        ("--cutmix -0.5", "alpha must be positive"),
        ("--lr-decay 0", "the factor must be in (0, 1]"),
        ("--keep-last -1", "must be 0 or more"),
        ("--max-params lots", "not a parameter count"),
    ],
)
def test_each_levers_bad_value_is_a_clear_error(option, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(option.split())
    assert message in capsys.readouterr().err


def test_the_start_line_counts_parameters_and_warns_past_max_params(tiny_args, capsys):
    assert train.parameter_count("100M") == 100_000_000 and train.parameter_count("2.5K") == 2500
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0", "--max-params", "1000"])
    err = capsys.readouterr().err
    assert "resnet18 (0.1M parameters)" in err
    assert "parameters, more than --max-params 1,000" in err


def test_layer_wise_decay_keeps_the_stages_ratios_through_the_schedule():
    args, _ = train.parse_args(["--lr-decay", "0.5", "--lr2", "1e-3", "--min-lr", "1e-5"])
    model = M.build_model("resnet18", 3, weights="none")
    phase = train.phase_setup(2, args, model, CPU)
    for epoch in range(125):
        lrs = [group["lr"] for group in phase.optimizer.param_groups]
        factor = 1e-3 * train.schedule_factor(epoch, args)
        assert lrs == pytest.approx([factor * 0.5**depth for depth in range(6)], rel=1e-9)
        phase.optimizer.step()
        phase.scheduler.step()
    # The method's own schedule, one group: the closed form is the released code's.
    default, _ = train.parse_args([])
    for epoch, lr in enumerate(phase2_lrs([], 125)):
        assert lr == pytest.approx(5e-4 * train.schedule_factor(epoch, default), rel=1e-9)


def test_ema_added_on_resume_adds_its_columns_to_history_csv(tiny_args, tmp_path):
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0"])
    train.main(["--resume", str(tmp_path / "ck" / "last.pt"), "--epochs2", "1", "--ema", "0.9"])
    rows = read_history(tmp_path / "ck" / "history.csv")
    assert [r["ema_val_acc"] for r in rows][0] == "" and rows[1]["ema_val_acc"] != ""
    history = utils.full_history(
        tmp_path / "ck" / "last.pt", torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    )
    assert math.isnan(history[0]["ema_val_acc"]) and len(history) == 2


def test_a_budget_of_epochs_is_split_as_the_report_splits_its_135():
    def split(*argv):
        args, _ = train.parse_args(list(argv))
        return args.epochs1, args.epochs2, args.warmup_epochs, args.cosine_epochs

    assert split("--epochs", "135") == (10, 125, 5, 120)  # the report's, one monotone decay
    assert split("--epochs", "8") == (1, 7, 0, 7)
    assert split("--epochs", "30") == (2, 28, 1, 27)
    assert split("--epochs", "8", "--warmup-epochs", "1") == (1, 7, 1, 7)  # given ones win
    assert split() == (10, 125, 5, 45)  # without --epochs: the released code's schedule
    args, _ = train.parse_args(["--epochs", "8"])
    lrs = [train.schedule_factor(epoch, args) for epoch in range(7)]
    assert lrs[0] == 1 and all(a > b for a, b in zip(lrs, lrs[1:]))  # no warmup, then decay
    with pytest.raises(SystemExit):
        train.parse_args(["--epochs", "1"])


def test_recipe_best_sets_its_levers_under_the_options_given():
    def levers(*argv):
        args, _ = train.parse_args(list(argv))
        return args.ema, args.lr_decay, args.p_vflip, args.average_last, args.tta

    assert levers() == (None, 1.0, 0.3, 0, "off")  # --recipe report: Table 1
    assert levers("--recipe", "best") == (0.99, 0.7, 0.0, 3, "auto")
    assert levers("--recipe", "best", "--ema", "0.999", "--p-vflip", "0.3", "--tta", "off") == (
        0.999,
        0.7,
        0.3,
        3,
        "off",
    )
    demo, _ = train.parse_args(["--demo", "--recipe", "best", "--epochs", "8"])
    assert (demo.arch, demo.ema, demo.epochs1, demo.epochs2, demo.warmup_epochs) == (
        "resnet18",
        0.99,
        1,
        7,
        0,
    )
    shown = " ".join(train.get_args_parser().format_help().split())  # unwrapped
    assert "best: --ema 0.99 --lr-decay 0.7 --p-vflip 0.0 --average-last 3 --tta auto" in shown


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
    assert "the average of epochs 2-4: val acc" in err and "test-time augmentation" in err
    # Run again, the run finished: nothing to train, the same choice.
    train.main(["--resume", str(out / "last.pt")])
    again = torch.load(out / "best.pt", weights_only=True)
    assert again["tta"] == best["tta"]
    for key, value in best["model"].items():
        assert torch.equal(value, again["model"][key]), key
