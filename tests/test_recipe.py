"""Table 1 and how a run's options resolve: the defaults, the presets, the --epochs split, each
phase's optimizer and schedule, and one precedence for fresh, resumed and Phase II runs."""

import math

import pytest
import torch
from torch import nn

import model as M
import train
from twophase import options, schedule
from twophase.checkpoint import PHASE1_PT
from twophase.loss import loss_of
from twophase.resolve import resolve
from utils import Problem

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


def setup(number, args, model):
    """train.phase_setup on the CPU in float32, as train.py calls it."""
    return train.phase_setup(number, args, model, CPU, loss_of(args), None)


def rates_at(phase, epochs):
    """Each parameter group's learning rate at each epoch, as the optimizer holds them."""
    rates = []
    for epoch in range(epochs):
        phase.set_rates(epoch)
        rates.append([group["lr"] for group in phase.optimizer.param_groups])
    return rates


def phase2_lrs(argv, epochs):
    args, _ = resolve(argv)[:2]
    return [lrs[0] for lrs in rates_at(setup(2, args, HeadOnTop()), epochs)]


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
    args, _ = resolve([])[:2]
    model = (args.arch, args.weights, args.img_size, args.batch_size, args.cache_workers)
    assert model == ("wide_resnet50_2", "imagenet", 224, 72, 4)
    phases = (args.epochs1, args.lr1, args.wd1, args.epochs2, args.optimizer2, args.lr2, args.wd2)
    assert phases == (10, 5e-4, 1e-4, 125, "nadam", 5e-4, 1e-4)
    rest = (args.clip, args.label_smoothing, args.amp, args.save_every, args.save_min_acc)
    assert rest == (0.8, 0.1, "fp16", 15, 0.82)
    assert (args.p_jitter, args.p_blur, args.p_hflip, args.p_vflip) == (0.5, 0.5, 0.3, 0.3)
    help_text = options.get_args_parser().format_help()
    assert "(default: 72)" in help_text and "(default: nadam)" in help_text
    assert resolve(["--workers", "2"]).options.cache_workers == 2  # the name it had before


def test_each_phase_is_set_up_as_the_methods_table_says():
    args, _ = resolve([])[:2]
    net = HeadOnTop()
    one = setup(1, args, net)
    assert isinstance(one.optimizer, torch.optim.AdamW) and rates_at(one, 10) == [[5e-4]] * 10
    assert (one.epochs, one.clip, one.freeze_bn) == (10, 0.0, False)
    assert [p.requires_grad for p in net.parameters()] == [False, False, True, True]  # fc only
    assert one.optimizer.param_groups[0]["params"] == list(net.fc.parameters())
    group = one.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (5e-4, 1e-4)

    two = setup(2, args, net)
    assert isinstance(two.optimizer, torch.optim.NAdam) and (two.epochs, two.clip) == (125, 0.8)
    assert all(p.requires_grad for p in net.parameters())
    assert len(two.optimizer.param_groups[0]["params"]) == 4
    assert (two.peak_lrs, two.optimizer.param_groups[0]["weight_decay"]) == ([5e-4], 1e-4)
    assert setup(1, resolve(["--freeze-bn"]).options, net).freeze_bn


def test_demo_preset_yields_to_options_given():
    args, _ = resolve(["--demo", "--epochs2", "3"])[:2]
    assert (args.arch, args.weights, args.epochs2, args.data) == (
        "resnet18",
        "none",
        3,
        "data/demo",
    )


@pytest.mark.parametrize("name", sorted(schedule.OPTIMIZERS))
def test_every_phase_two_optimizer_is_built_with_the_arguments(name):
    args, _ = resolve(["--optimizer2", name, "--lr2", "3e-3", "--wd2", "2e-5"])[:2]
    phase = setup(2, args, HeadOnTop())
    phase.set_rates(5)  # the warmup's end: the peak rate
    assert type(phase.optimizer) is schedule.OPTIMIZERS[name][0]
    group = phase.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (3e-3, 2e-5)
    for option, value in schedule.OPTIMIZERS[name][1].items():
        assert group[option] == value


def test_optimizers_step_fused_on_cuda_where_pytorch_has_a_fused_step():
    cuda = torch.device("cuda")
    assert schedule.step_on_device(torch.optim.AdamW, cuda) == {"fused": True}
    assert schedule.step_on_device(torch.optim.SGD, cuda) == {"fused": True}
    assert schedule.step_on_device(torch.optim.NAdam, cuda) == {}  # PyTorch has no fused NAdam
    assert schedule.step_on_device(torch.optim.AdamW, CPU) == {"fused": False}


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
        resolve(option.split())
    assert message in capsys.readouterr().err


def test_layer_wise_decay_keeps_the_stages_ratios_through_the_schedule():
    args, _ = resolve(["--lr-decay", "0.5", "--lr2", "1e-3", "--min-lr", "1e-5"])[:2]
    phase = setup(2, args, M.build_model("resnet18", 3, weights="none"))
    for epoch, lrs in enumerate(rates_at(phase, 125)):
        share = schedule.WarmupCosine.of(args)(epoch)
        assert lrs == pytest.approx([1e-3 * share * 0.5**depth for depth in range(6)], rel=1e-9)
    # The method's own schedule, one group: the closed form is the released code's.
    default, _ = resolve([])[:2]
    for epoch, lr in enumerate(phase2_lrs([], 125)):
        assert lr == pytest.approx(5e-4 * schedule.WarmupCosine.of(default)(epoch), rel=1e-9)


def test_the_closed_form_is_the_released_codes_sequential_lr_at_every_epoch():
    """SequentialLR(LinearLR, CosineAnnealingLR) as the released code builds it, stepped per
    epoch, against the closed form train.py sets: the same rate before every epoch."""
    for argv in ([], ["--cosine-epochs", "120"], ["--warmup-epochs", "2", "--warmup-start", "0.2"]):
        args, _ = resolve(argv)[:2]
        optimizer = torch.optim.NAdam([nn.Parameter(torch.zeros(1))], lr=args.lr2)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=args.cosine_epochs, eta_min=args.min_lr
        )
        warmup = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=args.warmup_start, total_iters=args.warmup_epochs
        )
        released = torch.optim.lr_scheduler.SequentialLR(
            optimizer, [warmup, cosine], milestones=[args.warmup_epochs]
        )
        for lr in phase2_lrs(argv, 125):
            assert lr == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
            optimizer.step()
            released.step()


def test_a_budget_of_epochs_is_split_as_the_report_splits_its_135():
    def split(*argv):
        args, _ = resolve(list(argv))[:2]
        return args.epochs1, args.epochs2, args.warmup_epochs, args.cosine_epochs

    assert split("--epochs", "135") == (10, 125, 5, 120)  # the report's, one monotone decay
    assert split("--epochs", "8") == (1, 7, 0, 7)
    assert split("--epochs", "30") == (2, 28, 1, 27)
    # Given ones win, and the rest of the budget is divided around them.
    assert split("--epochs", "8", "--warmup-epochs", "1") == (1, 7, 1, 6)
    assert split("--epochs", "8", "--epochs1", "2") == (2, 6, 0, 6)
    assert split("--epochs", "8", "--epochs2", "6") == (2, 6, 0, 6)
    assert split("--epochs", "16", "--epochs1", "0") == (0, 16, 1, 15)
    assert split() == (10, 125, 5, 45)  # without --epochs: the released code's schedule
    args, _ = resolve(["--epochs", "8"])[:2]
    lrs = [schedule.WarmupCosine.of(args)(epoch) for epoch in range(7)]
    assert lrs[0] == 1 and all(a > b for a, b in zip(lrs, lrs[1:]))  # no warmup, then decay
    with pytest.raises(SystemExit):
        resolve(["--epochs", "1"])


def test_recipe_best_sets_its_levers_under_the_options_given():
    def levers(*argv):
        args, _ = resolve(list(argv))[:2]
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
    demo, _ = resolve(["--demo", "--recipe", "best", "--epochs", "8"])[:2]
    assert (demo.arch, demo.ema, demo.epochs1, demo.epochs2, demo.warmup_epochs) == (
        "resnet18",
        0.99,
        1,
        7,
        0,
    )
    (shown,) = [a.help for a in options.get_args_parser()._actions if a.dest == "recipe"]
    assert "best: --ema 0.99 --lr-decay 0.7 --average-last 3 --tta auto --p-vflip 0.0" in shown
    assert (
        "fast: --lr1 0.01 --lr2 0.001 --ema 0.99 --lr-decay 0.7 --average-last 3 --tta auto "
        "--p-vflip 0.0" in shown
    )


def test_recipe_fast_keeps_only_what_reached_an_accuracy_sooner_and_no_time_lever():
    """What measured worse against the clock (RESULTS.md, "Time to accuracy") stays off; Phase
    II's peak rate is twice the report's, Phase I's twenty times."""
    args, _ = resolve(["--recipe", "fast", "--epochs", "4"])[:2]
    levers = (args.ema, args.lr_decay, args.p_vflip, args.average_last, args.tta)
    assert levers == (0.99, 0.7, 0.0, 3, "auto")
    assert (args.lr1, args.lr2) == (1e-2, 1e-3)
    assert (args.progressive, args.test_size, args.epochs1, args.epochs2) == (1.0, "train", 1, 3)
    timed, _ = resolve(["--recipe", "fast", "--time-budget", "30m"])[:2]
    assert (timed.recipe, timed.time_budget, timed.ema) == ("fast", 1800, 0.99)


def test_a_recipe_given_on_resume_sets_its_levers_as_a_fresh_run_would(tmp_path):
    path = str(saved_run(tmp_path, ["--recipe", "best", "--epochs", "8", "--progressive", "0.5"]))
    args, _ = resolve(["--resume", path, "--recipe", "fast"])[:2]
    assert (args.ema, args.lr_decay, args.average_last, args.progressive) == (0.99, 0.7, 3, 0.5)
    assert args.lr2 == 1e-3
    assert args.lr1 == 5e-4  # Phase I is over: fast's --lr1 would change nothing there
    back, _ = resolve(["--resume", path, "--recipe", "report"])[:2]
    assert (back.ema, back.lr_decay, back.p_vflip, back.average_last) == (None, 1.0, 0.3, 0)
    assert back.lr2 == 5e-4
    # The demo's own values stay under a recipe, on a fresh run and a continued one alike.
    demo = str(saved_run(tmp_path, ["--demo", "--recipe", "fast"], name="demo.pt"))
    for name in ("best", "report"):
        fresh, _ = resolve(["--demo", "--recipe", name])[:2]
        continued, _ = resolve(["--resume", demo, "--recipe", name])[:2]
        assert fresh.lr2 == continued.lr2 == options.DEMO["lr2"]
        assert fresh.ema == continued.ema


def test_a_recipe_given_again_sets_its_phase_i_levers_only_where_phase_i_trains_on(
    tmp_path, capsys
):
    """--recipe fast on a run still in Phase I sets its --lr1 as on a fresh run; past Phase I (in
    Phase II, or with its last epoch saved), or with --phase 2, the run keeps its own and says
    so, where --lr1 alone is refused. A longer --epochs1 opens Phase I again, a budget whose
    split ends it closes it."""
    two_epochs = ["--epochs", "16", "--epochs1", "2"]
    in_phase1 = str(saved_run(tmp_path, two_epochs, name="p1/last.pt", phase=1, epoch=1))
    phase1_done = str(saved_run(tmp_path, two_epochs, name="p1/phase1.pt", phase=1, epoch=2))
    for argv in (["--resume", in_phase1], ["--resume", phase1_done, "--epochs1", "3"]):
        args, _ = resolve(argv + ["--recipe", "fast"])[:2]
        assert (args.lr1, args.lr2) == (1e-2, 1e-3)
    for argv, why in (
        (["--resume", in_phase1, "--phase", "2"], "does not train again (--phase 2)"),
        (["--resume", phase1_done], "is over"),
        (["--resume", in_phase1, "--epochs", "9"], "is over"),  # the split's 1 + 8: Phase I done
        (["--resume", str(saved_run(tmp_path, two_epochs))], "is over"),
    ):
        args, _ = resolve(argv + ["--recipe", "fast"])[:2]
        assert (args.lr1, args.lr2) == (5e-4, 1e-3)
        assert (
            f"--recipe fast: its --lr1 0.01 is for Phase I, and Phase I of this run {why}; it "
            "keeps 0.0005" in capsys.readouterr().err
        )
        with pytest.raises(Problem, match=r"--lr1 0.01 .*Phase I of this run"):
            resolve(argv + ["--lr1", "1e-2"])


def saved_run(folder, argv, name="last.pt", phase=2, epoch=1):
    """A checkpoint of a run started with `argv`, as far as options are concerned: its resolved
    options (what resolving a continued run reads of it), saved after `phase`'s `epoch`."""
    args, _ = resolve(argv)[:2]
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"args": vars(args), "phase": phase, "epoch": epoch, "history": []}, path)
    return path


SHAPING = "epochs1 epochs2 warmup_epochs cosine_epochs warmup_start min_lr lr1 lr2 lr_decay".split()
SHAPING += "ema mixup cutmix p_vflip average_last tta keep_last accum_steps data arch".split()


@pytest.mark.parametrize(
    "argv",
    [
        ["--epochs", "5", "--warmup-epochs", "1"],
        ["--epochs", "8", "--epochs1", "2"],
        ["--epochs1", "3", "--epochs2", "9", "--warmup-epochs", "2", "--cosine-epochs", "7"],
        ["--warmup-start", "0.2", "--min-lr", "1e-6", "--lr2", "1e-3", "--lr-decay", "0.8"],
        ["--recipe", "best", "--epochs", "8", "--mixup", "0.2", "--accum-steps", "2"],
        ["--demo", "--epochs2", "4", "--cutmix", "1.0", "--keep-last", "2"],
    ],
)
def test_a_resumed_run_keeps_every_option_that_shapes_it(argv, tmp_path):
    """Resumed with --resume alone: the options it was started with, as they resolved then, and
    so the same learning rate at every epoch."""
    started, _ = resolve(argv)[:2]
    resumed, start = resolve(["--resume", str(saved_run(tmp_path, argv))])[:2]
    assert start.path == tmp_path / "last.pt"
    for key in SHAPING:
        assert getattr(resumed, key) == getattr(started, key), key
    epochs = started.epochs2
    lrs = [phase2_lrs_of(args, epochs) for args in (started, resumed)]
    assert lrs[0] == lrs[1]


def phase2_lrs_of(args, epochs):
    return rates_at(setup(2, args, M.build_model("resnet18", 3, "none")), epochs)


def test_on_resume_options_given_win_and_the_split_is_redone_only_if_given_again(tmp_path):
    path = str(saved_run(tmp_path, ["--epochs", "8", "--ema", "0.9"]))

    def phases(*argv):
        args, _ = resolve(["--resume", path, *argv])[:2]
        return args.epochs1, args.epochs2, args.warmup_epochs, args.cosine_epochs, args.ema

    assert phases() == (1, 7, 0, 7, 0.9)
    assert phases("--epochs2", "9") == (1, 9, 0, 7, 0.9)  # train longer, on the same schedule
    assert phases("--epochs", "16") == (1, 15, 1, 14, 0.9)  # a new budget, split again
    assert phases("--ema", "0.99") == (1, 7, 0, 7, 0.99)
    state = torch.load(path, weights_only=True)
    torch.save({**state, "optimizer": {"state": {}}}, path)  # Phase II's
    assert resolve(["--resume", path, "--lr-decay", "0.7"]).options.lr_decay == 0.7
    with pytest.raises(Problem, match="--optimizer2 sgd .* start it again from phase1.pt"):
        resolve(["--resume", path, "--optimizer2", "sgd"])


def test_a_resumed_run_goes_on_in_its_checkpoints_folder_unless_told_otherwise(tmp_path):
    path = saved_run(tmp_path / "copied", ["--out", str(tmp_path / "where-it-ran"), "--overwrite"])
    args, _ = resolve(["--resume", str(path)])[:2]
    assert args.out == str(tmp_path / "copied")
    assert not args.overwrite  # an order for one command, never inherited
    assert resolve(["--resume", str(path), "--out", "x"]).options.out == "x"


def test_phase_two_alone_continues_with_phase_ones_options(tmp_path, capsys):
    out = tmp_path / "ck"
    phase1 = ["--data", "photos", "--arch", "resnet50", "--img-size", "128", "--lr2", "1e-3"]
    saved_run(out, phase1 + ["--phase", "1", "--batch-size", "32"], name=PHASE1_PT)
    args, start = resolve(["--phase", "2", "--out", str(out)])[:2]
    assert start.path == out / PHASE1_PT and args.phase == "2" and args.out == str(out)
    assert (args.data, args.arch, args.img_size, args.batch_size, args.lr2) == (
        "photos",
        "resnet50",
        128,
        32,
        1e-3,
    )
    args, _ = resolve(["--phase", "2", "--out", str(out), "--optimizer2", "adamw"])[:2]
    assert (args.optimizer2, args.arch) == ("adamw", "resnet50")
    # Without phase1.pt: a fresh Phase II from --weights, with a warning.
    args, start = resolve(["--phase", "2", "--out", str(tmp_path / "none")])[:2]
    assert start.state is None and args.arch == "wide_resnet50_2"
    assert "so Phase II starts from --weights imagenet" in capsys.readouterr().err


def test_a_fresh_run_resolves_defaults_then_demo_then_recipe_then_split_then_given():
    argv = ["--demo", "--recipe", "best", "--epochs", "8", "--epochs1", "2", "--ema", "0.5"]
    args, start = resolve(argv)[:2]
    assert start.state is None
    assert (args.arch, args.lr2, args.img_size) == ("resnet18", 1e-3, 32)  # --demo
    assert (args.lr_decay, args.average_last, args.ema) == (0.7, 3, 0.5)  # recipe, then given
    # The split over the demo's 2 + 10, around the --epochs1 given.
    assert (args.epochs1, args.epochs2, args.warmup_epochs, args.cosine_epochs) == (2, 6, 0, 6)
    with pytest.raises(Problem, match="do not make it up"):
        resolve(["--epochs", "8", "--epochs1", "2", "--epochs2", "3"])


def test_phase_two_from_phase_one_may_take_its_own_optimizer_and_levers(tmp_path):
    """phase1.pt holds Phase I's optimizer only: Phase II's optimizer and levers are still open,
    --recipe best's too. Once Phase II's optimizer is saved, its kind is not; Phase I's options
    are closed from the start, since --phase 2 trains no Phase I."""
    out = tmp_path / "ck"
    saved = saved_run(out, ["--phase", "1"], name=PHASE1_PT)
    torch.save({**torch.load(saved, weights_only=True), "phase": 1, "epoch": 10}, saved)
    args, _ = resolve(["--phase", "2", "--out", str(out), "--recipe", "best"])[:2]
    assert (args.lr_decay, args.ema, args.p_vflip) == (0.7, 0.99, 0.0)
    assert resolve(["--phase", "2", "--out", str(out), "--optimizer2", "sgd"]).options
    with pytest.raises(Problem, match="--lr1 0.001 .* Phase I of this run does not train"):
        resolve(["--phase", "2", "--out", str(out), "--lr1", "1e-3"])
    state = torch.load(out / PHASE1_PT, weights_only=True)
    torch.save({**state, "phase": 2, "optimizer": {"state": {}}}, out / "last.pt")  # in Phase II
    with pytest.raises(Problem, match="--optimizer2 sgd"):
        resolve(["--resume", str(out / "last.pt"), "--optimizer2", "sgd"])


def test_recipe_report_given_again_on_resume_turns_the_levers_off(tmp_path):
    path = str(saved_run(tmp_path, ["--recipe", "best", "--epochs", "8"]))
    args, _ = resolve(["--resume", path, "--recipe", "report", "--lr-decay", "0.7"])[:2]
    assert (args.ema, args.p_vflip, args.average_last, args.tta) == (None, 0.3, 0, "off")
    assert args.recipe == "report" and args.lr_decay == 0.7  # given wins over the preset


def test_progressive_sizes_rise_in_steps_to_the_full_size_by_their_share_of_the_epochs():
    args, _ = resolve(["--img-size", "64", "--progressive", "0.5", "--epochs2", "7"])[:2]
    sizes = train.phase_setup(2, args, HeadOnTop(), CPU, loss_of(args), None).image_size
    assert [sizes(e) for e in range(7)] == [32, 40, 48, 48, 56, 64, 64]  # steps of 8; 5 of 7
    args, _ = resolve(["--progressive", "0.5", "--progressive-until", "0.5"])[:2]
    big = schedule.ProgressiveSize.of(args, 125)
    assert (big.step, big(0), big(62), big(63)) == (32, 128, 224, 224)  # 112 rounds to 128
    assert all(big(e) % 32 == 0 and big(e) <= big(e + 1) for e in range(124))
    phase1 = train.phase_setup(1, args, HeadOnTop(), CPU, loss_of(args), None)
    assert {phase1.image_size(e) for e in range(10)} == {224}  # Phase II's lever only


def test_a_recipe_given_on_resume_keeps_the_runs_own_rates(tmp_path):
    """A run started with --lr2 2e-3, continued with --recipe best: best does not set --lr2, so
    the run's own stays, as on a fresh `--recipe best --lr2 2e-3`; a value a recipe set goes back
    with it."""
    own = str(saved_run(tmp_path, ["--lr2", "2e-3", "--lr1", "1e-3"], name="own.pt"))
    args, _ = resolve(["--resume", own, "--recipe", "best"])[:2]
    fresh, _ = resolve(["--recipe", "best", "--lr2", "2e-3", "--lr1", "1e-3"])[:2]
    assert (args.lr2, args.lr1, args.ema) == (fresh.lr2, fresh.lr1, fresh.ema) == (2e-3, 1e-3, 0.99)
    fast = str(saved_run(tmp_path, ["--recipe", "fast"], name="fast.pt", phase=1, epoch=0))
    args, _ = resolve(["--resume", fast, "--recipe", "best"])[:2]
    assert (args.lr2, args.lr1) == (5e-4, 5e-4)  # fast's rates, gone with it
