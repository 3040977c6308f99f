import copy
import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import model as M
import train
from conftest import TINY

REPO = Path(__file__).resolve().parents[1]


def spec_lr(epoch):
    """SPEC section 3: the Phase II learning rate before epoch e (0-based)."""
    if epoch < 5:
        return 5e-4 * (0.1 + 0.9 * epoch / 5)
    return 5e-6 + (5e-4 - 5e-6) * (1 + math.cos(math.pi * (epoch - 5) / 45)) / 2


def phase2_lrs(argv, epochs):
    args, _ = train.parse_args(argv)
    optimizer = train.make_optimizer(args.optimizer2, [torch.nn.Parameter(torch.zeros(1))], args.lr2, args.wd2,
                                     torch.device("cpu"))
    scheduler = train.warmup_cosine(optimizer, args)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_phase_two_learning_rate_follows_the_method_at_every_epoch():
    lrs = phase2_lrs([], 125)
    for epoch, lr in enumerate(lrs):
        assert lr == pytest.approx(spec_lr(epoch), rel=1e-9), epoch
    assert lrs[50] == pytest.approx(5e-6) and lrs[95] == pytest.approx(5e-4)
    assert lrs[124] == pytest.approx(1.44e-4, rel=1e-2)


def test_cosine_epochs_120_gives_one_monotone_decay():
    lrs = phase2_lrs(["--cosine-epochs", "120"], 125)
    assert all(b <= a for a, b in zip(lrs[5:], lrs[6:]))
    assert lrs[-1] == pytest.approx(5e-6 + (5e-4 - 5e-6) * (1 + math.cos(math.pi * 119 / 120)) / 2)


def test_defaults_are_the_methods_table():
    args, _ = train.parse_args([])
    assert (args.arch, args.weights, args.img_size, args.batch_size, args.workers) == \
        ("wide_resnet50_2", "imagenet", 224, 72, 4)
    assert (args.epochs1, args.lr1, args.wd1, args.epochs2, args.optimizer2, args.lr2, args.wd2) == \
        (10, 5e-4, 1e-4, 125, "nadam", 5e-4, 1e-4)
    assert (args.clip, args.label_smoothing, args.amp, args.save_every, args.save_min_acc) == \
        (0.8, 0.1, "fp16", 15, 0.82)
    assert (args.p_jitter, args.p_blur, args.p_hflip, args.p_vflip) == (0.5, 0.5, 0.3, 0.3)
    help_text = train.get_args_parser().format_help()
    assert "(default: 72)" in help_text and "(default: nadam)" in help_text


def test_demo_preset_yields_to_options_given():
    args, _ = train.parse_args(["--demo", "--epochs2", "3"])
    assert (args.arch, args.weights, args.epochs2, args.data) == ("resnet18", "none", 3, "data/demo")


def test_every_phase_two_optimizer_builds():
    params = [torch.nn.Parameter(torch.zeros(2))]
    for name in ("nadam", "adamw", "adam", "sgd", "rmsprop"):
        assert train.make_optimizer(name, params, 1e-3, 1e-4, torch.device("cpu")).param_groups[0]["lr"] == 1e-3


def test_optimizers_step_fused_on_cuda_where_pytorch_has_a_fused_step():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert train.step_on_device(torch.optim.AdamW, cuda) == {"fused": True}
    assert train.step_on_device(torch.optim.SGD, cuda) == {"fused": True}
    assert train.step_on_device(torch.optim.NAdam, cuda) == {}  # none for NAdam; capturable measured slower
    assert train.step_on_device(torch.optim.AdamW, cpu) == {"fused": False}


@pytest.mark.parametrize("name,option", [("adamw", "fused"), ("nadam", "capturable")])
def test_optimizer_state_saved_on_cuda_resumes_on_the_cpu(name, option):
    def build(value):
        return train.make_optimizer(name, [torch.nn.Parameter(value.clone())], 1e-2, 1e-4, torch.device("cpu"))

    def step(optimizer):
        optimizer.param_groups[0]["params"][0].grad = torch.tensor([1.0, -2.0, 0.5])
        optimizer.step()

    running = build(torch.ones(3))
    step(running)
    saved = copy.deepcopy(running.state_dict())  # as a checkpoint holds it: not the running state's tensors
    saved["param_groups"][0][option] = True  # as a run on CUDA may save it (capturable NAdam fails on the CPU)
    resumed = build(running.param_groups[0]["params"][0].detach())
    train.load_optimizer_state(resumed, saved)
    assert not resumed.param_groups[0][option]
    step(running), step(resumed)
    assert torch.equal(running.param_groups[0]["params"][0], resumed.param_groups[0]["params"][0])


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
    out = train.train_one_epoch(model, loader, lambda x: x.float(), criterion, optimizer,
                                torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), None)
    assert out["train_loss"] == pytest.approx((1.0 * 4 + 4.0 * 2) / 6)  # the nan batch left out
    assert out["nonfinite"] == 1 and out["batches"] == 3 and out["images"] == 10
    assert out["train_acc"] == pytest.approx(6 / 10)  # every image counts for accuracy


def test_a_training_step_queues_few_ops_besides_the_model():
    """On a fast GPU the host's launches bound a step. Count, exactly, what train_one_epoch adds to
    a bare step (forward, loss, backward, optimizer step) of a tiny model: the epoch's bookkeeping."""
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
        train.train_one_epoch(model, [(images, labels)] * steps, lambda x: x, criterion, optimizer,
                              torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), None)

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


def test_phase_one_step_changes_the_head_and_nothing_else(dataset, tmp_path):
    splits = data.load_splits(dataset, 16, tmp_path / "c")
    net = M.build_model("resnet18", len(splits.classes), weights="none")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.AdamW(M.set_trainable(net, phase=1), lr=1e-2)
    loader = data.make_loader(splits.train, 8, shuffle=True, workers=0)
    train.train_one_epoch(net, loader, data.BatchPreprocess(augment=data.DeviceAugment()),
                          torch.nn.CrossEntropyLoss(), optimizer, torch.amp.GradScaler("cpu", enabled=False),
                          torch.device("cpu"), None)
    after = net.state_dict()
    for name, param in net.named_parameters():
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith("fc."), name
    # Batch norm statistics still adapt in Phase I (train mode), as in the released code.
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])


def test_validation_accuracy_is_an_exact_count(dataset, tmp_path):
    splits = data.load_splits(dataset, 16, tmp_path / "c")
    net = M.build_model("resnet18", len(splits.classes), weights="none")
    loader = data.make_loader(splits.val, 4, shuffle=False, workers=0)  # 6 images: batches of 4 and 2
    result = train.evaluate(net, loader, data.BatchPreprocess(), torch.nn.CrossEntropyLoss(),
                            torch.device("cpu"), None)
    with torch.no_grad():
        images, labels = splits.val[list(range(len(splits.val)))]
        logits = net.eval()(data.BatchPreprocess()(images))
    assert result["val_acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert result["val_top5"] == 1.0  # 3 classes: the top 5 holds every class


def read_history(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_two_phase_run_writes_checkpoints_and_history(tiny_args, tmp_path):
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "2", "--save-every", "1", "--save-min-acc", "0"])
    out = tmp_path / "ck"
    assert {"phase1.pt", "last.pt", "best.pt", "history.csv", "phase2_epoch001.pt", "phase2_epoch002.pt"} \
        <= {p.name for p in out.iterdir()}
    rows = read_history(out / "history.csv")
    assert [(r["phase"], r["epoch"]) for r in rows] == [("1", "1"), ("2", "1"), ("2", "2")]
    assert set(rows[0]) == {"phase", "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                            "val_top5", "images_per_s", "seconds"}

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


def test_periodic_checkpoints_need_the_accuracy_threshold(tiny_args, tmp_path):
    train.main(tiny_args + ["--epochs1", "0", "--epochs2", "1", "--save-every", "1", "--save-min-acc", "1.01"])
    names = {p.name for p in (tmp_path / "ck").iterdir()}
    assert "phase2_epoch001.pt" not in names and "phase1.pt" not in names and "last.pt" in names


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
    train.main(tiny_args + ["--epochs2", "1", "--phase", "2"])
    assert "no " in capsys.readouterr().err and (tmp_path / "ck" / "last.pt").exists()


def test_missing_data_folder_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="--demo"):
        train.main(["--data", str(tmp_path / "nowhere")] + TINY)


def test_demo_command_runs_end_to_end(tmp_path):
    """The README's first command, shortened: a fresh process, data written, both phases."""
    result = subprocess.run(
        [sys.executable, "train.py", "--demo", "--data", str(tmp_path / "demo"), "--out", str(tmp_path / "ck"),
         "--epochs1", "1", "--epochs2", "1", "--img-size", "16"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # everything but results goes to stderr
    assert "phase 2 epoch   1/1" in result.stderr and "best val acc" in result.stderr
    assert (tmp_path / "demo" / "answers.csv").exists() and (tmp_path / "ck" / "best.pt").exists()


def test_the_run_summary_counts_skipped_images(tiny_args, dataset, capsys):
    (dataset / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0"])
    assert "1 unreadable images were skipped" in capsys.readouterr().err


def test_compile_mode_reaches_torch_compile_and_checkpoints_stay_plain(tiny_args, tmp_path, monkeypatch):
    modes = []
    real_compile = torch.compile

    def spy(net, mode=None):  # the eager backend: dynamo's wrapping without inductor's compile time
        modes.append(mode)
        return real_compile(net, backend="eager")

    monkeypatch.setattr(torch, "compile", spy)
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "1", "--compile", "reduce-overhead"])
    assert modes == ["reduce-overhead", "reduce-overhead"]  # anew for each phase
    saved = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert not [k for k in saved["model"] if "_orig_mod" in k]
    assert saved["args"]["compile"] == "reduce-overhead"
    assert train.parse_args(["--compile"])[0].compile == "default"
    assert train.parse_args([])[0].compile is None


def test_resume_of_a_checkpoint_from_an_earlier_version(tiny_args, tmp_path):
    """Saved when --compile took no mode, and before an option existed: the option gets its default."""
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
    assert train.parse_args(["--resume", str(tmp_path / "old.pt"), "--compile", "off"])[0].compile is None
    state["args"]["demo"] = True  # a demo run resumes with its own arguments, not the demo's preset
    torch.save(state, tmp_path / "old.pt")
    assert train.parse_args(["--resume", str(tmp_path / "old.pt")])[0].img_size == 16
