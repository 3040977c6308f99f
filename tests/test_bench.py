import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import evaluate
import model as M
import train
from conftest import REPO, examples, make_dataset
from twophase.resolve import resolve

sys.path.insert(0, str(REPO / "benchmarks"))

import bench  # noqa: E402
import from_timm  # noqa: E402
import profile_train  # noqa: E402

TINY_LEVERS = (
    "--arch resnet18 --weights none --img-size 16 --batch-size 4 --cache-workers 0 --device cpu"
).split()
TINY_BENCH = "--img-size 32 --batch-size 4 --steps 1 --repeats 1 --workers 0".split()


def table_rows(table):
    return {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in table.splitlines()
        if line.startswith("| ") and "---" not in line and "measurement" not in line
    }


def test_the_benchmark_runs_every_cpu_section_on_a_tiny_setup(tmp_path, capsys, narrow_models):
    sections = "pipeline,train,predict,cache"
    bench.main(["--workdir", str(tmp_path), "--n", "12", *TINY_BENCH, "--sections", sections])
    rows = table_rows(capsys.readouterr().out)
    for name in (
        "input pipeline, released code path",
        "input pipeline, cached path",
        "input-bound ratio, Phase 1",
        "input-bound ratio, Phase 2",
        "predict",
        "cache build, 24 images, memory growth while building (MiB)",
    ):
        assert name in rows, name
        assert math.isfinite(float(rows[name])) and float(rows[name]) >= 0, (name, rows[name])


def test_the_benchmark_sets_each_phase_up_as_training_does(tmp_path, monkeypatch, narrow_models):
    """Table 1 reaches the benchmark through train.phase_setup: a changed default shows there."""
    built = []
    real = bench.phase_setup

    def spy(number, args, model, device, criterion, dtype):
        built.append((number, args.lr1 if number == 1 else args.lr2, args.optimizer2))
        return real(number, args, model, device, criterion, dtype)

    monkeypatch.setattr(bench, "phase_setup", spy)
    monkeypatch.setattr(bench, "RECIPE", resolve(["--lr2", "7e-4", "--optimizer2", "sgd"]).options)
    bench.main(["--workdir", str(tmp_path), "--n", "10", *TINY_BENCH, "--sections", "train"])
    assert built == [(1, 5e-4, "sgd"), (2, 7e-4, "sgd")]


def test_the_augmentation_asks_of_the_device_what_benchmarks_md_reports():
    """Exact counts, not timings: a change that adds passes over the batch shows here."""
    args = bench.get_args_parser().parse_args(["--img-size", "224", "--batch-size", "72"])
    (_, ops, _), (_, traffic_mb, _) = bench.augmentation_device_work(args)
    assert ops <= 75 and traffic_mb <= 2100, (ops, traffic_mb)  # 72 and 2041 in BENCHMARKS.md


def test_busy_time_counts_overlapping_work_once_and_idle_gaps_between():
    intervals = [(0, 4), (2, 6), (10, 11), (11.05, 12)]  # microseconds, as in a trace
    assert profile_train.union_length(intervals) == pytest.approx(6 + 1 + 0.95)
    assert profile_train.gaps(intervals, at_least=1) == [4]  # 6 -> 10; the 0.05 gap is too short


def test_the_profile_runs_on_the_cpu(tmp_path, capsys, narrow_models):
    trace = tmp_path / "trace"
    profile_train.main(
        ["--workdir", str(tmp_path), "--n", "10", *TINY_BENCH, "--trace", str(trace)]
    )
    out = capsys.readouterr().out
    assert "== Phase 1" in out and "== Phase 2" in out
    assert "(training thread): in PyTorch ops" in out
    assert sorted(p.name for p in trace.iterdir()) == ["phase1.json.gz", "phase2.json.gz"]


def layout_of(tensor):
    channels_last = tensor.is_contiguous(memory_format=torch.channels_last)
    return "channels_last" if channels_last and not tensor.is_contiguous() else "contiguous"


@pytest.mark.parametrize(
    "flag, layout", [("--channels-last", "channels_last"), ("--no-channels-last", "contiguous")]
)
def test_the_training_benchmark_measures_the_layout_it_is_given(
    tmp_path, monkeypatch, flag, layout
):
    seen = set()

    def spy(net, batches, preprocess, phase):
        if isinstance(batches, list):  # the model-only steps: batches already preprocessed
            seen.add(("weights", layout_of(net.conv1.weight)))
            seen.add(("batch", layout_of(batches[0][0])))

    monkeypatch.setattr(bench, "one_epoch", spy)
    args = ["--workdir", str(tmp_path), "--n", "10", *TINY_BENCH, "--img-size", "16"]
    bench.main(args + ["--sections", "train", flag])
    assert seen == {("weights", layout), ("batch", layout)}


def test_a_timm_run_becomes_a_checkpoint_with_the_head_in_this_projects_class_order(tmp_path):
    data = make_dataset(tmp_path / "data", classes=("a10", "a2", "b"), per_class=1)
    net = M.build_model("resnet18", 3, "none")  # timm's row i is class ("a2", "a10", "b")[i]
    timm_output = tmp_path / "timm"
    timm_output.mkdir()
    args = argparse.Namespace(opt="sgd", seed=42, img_size=64, mean=None, std=None, device="cpu")
    state = {"state_dict": net.state_dict(), "arch": "resnet18", "args": args, "epoch": 1}
    torch.save(state, timm_output / "model_best.pth.tar")
    (timm_output / "summary.csv").write_text(
        "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n"
        "0,2.0,1.9,40.0,90.0,0.01\n1,1.9,1.8,50.0,93.0,0.005\n"  # then stopped before saving
        "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n"  # resumed: the header again
        "1,1.5,1.4,60.0,95.0,0.005\n2,1.2,1.3,55.0,96.0,0.001\n"  # and epoch 1 again
    )
    from_timm.main(
        [
            str(timm_output),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "ck" / "best.pt"),
            "--command",
            "python train.py ...",
            "--wall-seconds",
            "30",
        ]
    )
    ours = torch.load(tmp_path / "ck" / "best.pt", weights_only=True)
    assert ours["classes"] == ["a10", "a2", "b"]
    weight = net.state_dict()["fc.weight"]
    assert torch.equal(ours["model"]["fc.weight"], weight[[1, 0, 2]])
    assert (ours["epoch"], ours["img_size"], ours["args"]["optimizer2"]) == (2, 64, "timm sgd")
    assert [r["val_acc"] for r in ours["history"]] == [0.4, 0.6]  # up to the best epoch
    assert (tmp_path / "ck" / "history.csv").read_text().count("\n") == 4  # every epoch, once

    # With --model-ema timm validates the moving average and keeps its best epoch by it.
    ema = M.build_model("resnet18", 3, "none").state_dict()
    torch.save({**state, "state_dict_ema": ema}, timm_output / "model_best.pth.tar")
    from_timm.main([str(timm_output), "--data", str(data), "--out", str(tmp_path / "ema.pt")])
    converted = M.inference_weights(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert torch.equal(converted["conv1.weight"], ema["conv1.weight"])
    assert torch.equal(converted["fc.weight"], ema["fc.weight"][[1, 0, 2]])

    # A run resumed after its best epoch: model_best.pth.tar is the best epoch since the resume;
    # the best epoch's own checkpoint is taken.
    later = M.build_model("resnet18", 3, "none").state_dict()
    torch.save({**state, "state_dict": later, "epoch": 2}, timm_output / "model_best.pth.tar")
    torch.save(state, timm_output / "checkpoint-1.pth.tar")
    from_timm.main([str(timm_output), "--data", str(data), "--out", str(tmp_path / "again.pt")])
    converted = M.inference_weights(torch.load(tmp_path / "again.pt", weights_only=True))
    assert torch.equal(converted["conv1.weight"], net.state_dict()["conv1.weight"])
    (timm_output / "checkpoint-1.pth.tar").unlink()
    with pytest.raises(SystemExit, match="holds epoch 2; summary.csv's best is 1"):
        from_timm.main([str(timm_output), "--data", str(data), "--out", str(tmp_path / "x.pt")])


def test_the_levers_table_scores_finished_runs_and_writes_its_notes_block(
    dataset, tmp_path, capsys, narrow_models, monkeypatch
):
    import levers
    from twophase import average

    answers = tmp_path / "answers.csv"  # test image j shows class j % 3 (conftest)
    classes = ("cat", "dog", "eel")
    answers.write_text(
        "image_name,pred_label\n" + "".join(f"img_{j:02d},{classes[j % 3]}\n" for j in range(5))
    )
    runs = tmp_path / "levers"
    common = ["--data", str(dataset), *TINY_LEVERS, "--warmup-epochs", "0", "--epochs1", "1"]
    one_epoch = [*common, "--epochs2", "1", "--cosine-epochs", "1"]
    for name, lever in (("base-s0", ["--ema", "0.9"]), ("mixup-s0", ["--mixup", "0.2"])):
        train.main([*one_epoch, *lever, "--out", str(runs / name)])
        (runs / name / "done").touch()  # tiny_transfer.sh's marker of a finished run
    train.main([*one_epoch, "--cutmix", "1.0", "--out", str(runs / "cutmix-s0")])  # unfinished
    longer = tmp_path / "method-s0"  # its last two epochs kept, then averaged
    train.main(
        [
            *common,
            "--epochs2",
            "2",
            "--cosine-epochs",
            "2",
            "--keep-last",
            "2",
            "--out",
            str(longer),
        ]
    )
    kept = sorted(str(p) for p in longer.glob("epoch*.pt"))
    average.main([*kept, "--out", str(longer / "averaged.pt"), "--batch-size", "4"])

    report = tmp_path / "RESULTS.md"
    report.write_text("# results\n\nprose kept\n")
    capsys.readouterr()
    args = [str(runs), "--answers", str(answers), "--results", str(report)]
    levers.main(args + ["--averaging", str(longer), str(tmp_path / "absent")])
    text = report.read_text()
    assert text.startswith("# results\n\nprose kept\n") and "<!-- notes:levers -->" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for label in ("the method", "--ema 0.99", "--tta (horizontal flip)", "test size 80 px"):
        assert "/5)" in rows[label]
    assert "--mixup 0.2" in rows and "--cutmix 1.0" not in rows  # an unfinished run is left out
    assert rows["the method"].split("|")[-3].strip() == ""  # the reference has no gain
    assert "points" in rows["--mixup 0.2"] and "method-s0" in rows
    assert "python -m twophase.average RUN/epoch002.pt RUN/epoch003.pt --out" in text
    findings = "<!-- notes:levers_findings -->\n"
    report.write_text(report.read_text().replace(findings, findings + "EMA helps.\n"))
    monkeypatch.setattr(levers, "load_trained", None)  # every score is remembered now
    levers.main(args)  # rewritten in place, the prose kept
    again = report.read_text()
    assert again.count("<!-- notes:levers -->") == 1 and findings + "EMA helps.\n" in again
    assert rows["--ema 0.99"] in again and rows["--mixup 0.2"] in again  # the same scores

    # The report of a run, written over this one, keeps the section levers.py added.
    base = str(runs / "base-s0" / "last.pt")
    evaluate.main(["--ckpt", base, "--report", str(report), "--figures", str(tmp_path / "fig")])
    text = report.read_text()
    assert "prose kept" not in text and "## Result" in text  # the report's own, written anew
    assert findings + "EMA helps.\n" in text and "| --mixup 0.2 |" in text
    evaluate.main(["--ckpt", base, "--report", str(report), "--figures", str(tmp_path / "fig")])
    assert report.read_text() == text


def test_the_full_budget_section_scores_each_runs_result_and_says_how_soon_it_reaches_timm(
    dataset, tmp_path, capsys, narrow_models
):
    import full_budget

    answers = tmp_path / "answers.csv"  # test image j shows class j % 3 (conftest)
    classes = ("cat", "dog", "eel")
    answers.write_text(
        "image_name,pred_label\n" + "".join(f"img_{j:02d},{classes[j % 3]}\n" for j in range(5))
    )
    runs = tmp_path / "runs"
    common = ["--data", str(dataset), *TINY_LEVERS, "--epochs", "3"]
    for seed in (0, 1):
        for name, extra in (("method-1+7", []), ("recipe-8", ["--recipe", "best"])):
            out = runs / f"{name}-s{seed}"
            train.main([*common, *extra, "--seed", str(seed), "--out", str(out)])
            (out / "done").touch()
        # timm's run as from_timm.py leaves it: its command and wall time in the checkpoint.
        timm = runs / f"timm-recipe-s{seed}"
        timm.mkdir()
        state = torch.load(runs / f"method-1+7-s{seed}" / "best.pt", weights_only=True)
        state |= {"command": "python timm/train.py --model-ema", "wall_seconds": 120.0}
        state |= {"ema": {"model": state["model"]}, "eval_weights": "ema"}  # as from_timm.py
        torch.save(state, timm / "best.pt")
    train.main([*common, "--out", str(runs / "method-16")])  # not done: left out

    report = tmp_path / "RESULTS.md"
    report.write_text("# results\n")
    args = [str(runs), "--answers", str(answers), "--results", str(report)]
    full_budget.main(args + ["--figures", str(tmp_path / "fig")])
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "/5)" in line]
    assert len(rows) == 6  # three kinds of run, two seeds; the unfinished 16-epoch run left out
    recipe_rows = [r for r in rows if r.startswith("| --recipe best |")]
    assert len(recipe_rows) == 2 and recipe_rows[1].endswith("--seed 1` |")
    assert "--epochs 3 --recipe best" in recipe_rows[1]
    timm_rows = [r for r in rows if "timm, the recipe's levers" in r]
    assert len(timm_rows) == 2 and all("| ema |" in r and "| 2.0 |" in r for r in timm_rows)
    assert "- `--recipe best` against timm with the same levers:" in text
    assert "reaches timm's 8-epoch validation accuracy" in text
    assert (tmp_path / "fig" / "fig_time_to_accuracy_8_epochs.png").is_file()
    assert "## The recipe at the full budget" in text and "<!-- notes:full_budget -->" in text


def test_the_variants_are_a_tenfold_long_tail_and_off_centre_wide_photos(tmp_path):
    import variants

    counts = variants.long_tail_counts([str(c) for c in range(100)], seed=0)
    assert max(counts.values()) == 200 and min(counts.values()) == 20
    assert counts != variants.long_tail_counts([str(c) for c in range(100)], seed=1)
    photo = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    offsets = []
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        wide = np.asarray(variants.widened(Image.fromarray(photo), name))
        assert wide.shape == (64, 96, 3)
        left = next(x for x in range(33) if np.array_equal(wide[:, x : x + 64], photo))
        assert (wide[:, :left] == photo[:, :1]).all()  # its edge, stretched
        offsets.append(left)
    assert len(set(offsets)) > 1  # each photo its own offset


def test_the_timm_comparison_reads_one_subset_of_the_photos_for_both(tmp_path):
    import vs_timm

    source = make_dataset(tmp_path / "d", classes=("a", "b"), per_class=30, val_per_class=5, test=9)
    folder = vs_timm.subset(source, tmp_path / "s", per_class=20, tests=4)
    assert len(list((folder / "train" / "a").iterdir())) == 20
    assert len(list((folder / "val" / "b").iterdir())) == 2  # a tenth
    assert len(list((folder / "test").iterdir())) == 4
    assert all(p.is_symlink() for p in (folder / "train" / "a").iterdir())  # linked, not copied
    steps = vs_timm.commands(argparse.Namespace(weights="w.pt", timm=Path("t")), tmp_path, 0)
    assert [(what, who) for what, who, _ in steps][:2] == [("train", "ours"), ("train", "timm")]
    assert "--epochs" in steps[0][2] and steps[1][2][steps[1][2].index("--epochs") + 1] == "2"


def test_time_to_accuracy_counts_each_epoch_at_its_phase_and_sizes_speed():
    import time_to_accuracy as tta

    speeds = {
        str(s): {"phase1": 400.0, "phase2": 100.0 * 64 / s, "predict": 500.0}
        for s in (32, 48, 64, 72, 80)
    }
    history = [
        {"phase": 1, "img_size": 64},
        {"phase": 2, "img_size": 32},
        {"phase": 2, "img_size": 64},
    ]
    state = {
        "args": {"img_size": 64, "ema": 0.99, "average_last": 0, "test_size": "train", "tta": "off"}
    }
    curve, end = tta.counted_minutes(history, state, speeds, 2000, 500)
    validations = 2 * 500 / 500  # two a epoch with --ema, at 500 images/s
    expected = [2000 / 400 + validations, 2000 / 200 + validations, 2000 / 100 + validations]
    assert curve == pytest.approx([sum(expected[: i + 1]) / 60 for i in range(3)]) and end == 0
    run = {"curve": [0.2, 0.35, 0.41], "counted": curve}
    assert tta.reach(run, 0.35) == curve[1] and tta.reach(run, 0.5) is None
    assert tta.reach(run, 0.35 - 1e-9) == tta.reach(run, 0.35 + 1e-9) == curve[1]  # to 4 digits
    assert tta.reach(run, 0.3505) == curve[2]


def test_time_to_accuracy_says_how_many_seeds_reach_timms_accuracy():
    import time_to_accuracy as tta

    assert tta.reach_finding("fast", [5.0, 7.0], 16.0) == (
        "- fast reaches it in 6.0 minutes (0.38 of timm's) on average."
    )
    assert tta.reach_finding("fast", [None, 5.0], 16.0) == (
        "- fast reaches it at 1 of its 2 seeds only, in 5.0 minutes (0.31 of timm's) there."
    )
    assert tta.reach_finding("fast", [None, None], 16.0) == "- fast does not reach it."


def test_time_to_accuracy_measures_the_sizes_its_runs_trained_and_tested_at(tmp_path):
    import time_to_accuracy as tta

    def run(name, args, sizes):
        (tmp_path / name).mkdir()
        history = [{"phase": 2, "epoch": i, "val_acc": 0.1, "img_size": s} for i, s in sizes]
        torch.save({"args": args, "history": history}, tmp_path / name / "best.pt")

    run("method-s0", {"img_size": 64, "test_size": "train"}, [(1, 64)])
    run("pixels-s0", {"img_size": 64, "test_size": "auto"}, [(1, 48), (2, 56)])
    run("timm-recipe-s0", {"img_size": 96}, [])  # timm's own run: measured its own way
    assert tta.sizes_of(tmp_path) == [48, 56, 64, 72, 80]
    assert tta.sizes_of(tmp_path / "nowhere") == []


def test_without_speeds_measured_alone_a_runs_minutes_are_its_own(tmp_path):
    import time_to_accuracy as tta

    history = [{"seconds": 100, "val_seconds": 20}, {"seconds": 200, "val_seconds": 40}]
    ours = tmp_path / "fast-8-s0"
    ours.mkdir()
    assert tta.own_minutes(ours, {}, history) == ([2.0, 6.0], 0.0)  # no wall time: no end
    (ours / "done").write_text("450\n")  # tiny_transfer.sh: the command's wall seconds
    assert tta.own_minutes(ours, {}, history) == ([2.0, 6.0], 1.5)
    timm = tmp_path / "timm-recipe-s0"
    assert tta.own_minutes(timm, {"wall_seconds": 480}, history) == ([4.0, 8.0], 0.0)


def test_the_variants_section_names_the_backbone_its_runs_were_fine_tuned_from(tmp_path):
    import variants

    backbone = tmp_path / "source" / "best.pt"
    backbone.parent.mkdir()
    torch.save({"history": [{"val_acc": 0.21}, {"val_acc": 0.3125}]}, backbone)
    run = tmp_path / "lt-none-s1"  # seed 0 not run
    run.mkdir()
    torch.save({"args": {"weights": str(backbone)}}, run / "best.pt")
    assert variants.backbone_of(tmp_path, variants.LONG_TAIL) is None  # not finished
    (run / "done").touch()
    assert variants.backbone_of(tmp_path, variants.LONG_TAIL) == (
        f"Fine-tuned from `{backbone}`: 2 epochs of pretraining, best validation accuracy "
        "0.3125 on its own classes."
    )
    torch.save({"conv1.weight": torch.zeros(1)}, backbone)  # a plain state dict
    assert variants.backbone_of(tmp_path, variants.LONG_TAIL) == f"Fine-tuned from `{backbone}`."


def test_the_label_check_flips_a_share_of_each_split_and_scores_the_disputed_list(tmp_path):
    import label_check

    photos = make_dataset(tmp_path / "photos", per_class=6, val_per_class=4)
    argv = ["--images", str(photos), "--classes", "3", "--flip", "0.25", "--weights", "none"]
    args = label_check.get_args_parser().parse_args(argv)
    flips = label_check.the_cut(args, tmp_path / "out")
    cut = tmp_path / "out" / "data"
    assert [f["split"] for f in flips].count("train") == round(0.25 * 18)
    assert [f["split"] for f in flips].count("val") == 3
    for f in flips:  # a flipped photo lies under its given class alone
        assert f["true_label"] != f["given_label"] == f["image"].split("/")[1]
        assert f["photo"].split("/")[:2] == [f["split"], f["true_label"]]
        assert (cut / f["image"]).read_bytes() == (photos / f["photo"]).read_bytes()
    every = sorted(p.read_bytes() for p in (photos / "train").glob("*/*"))
    every += sorted(p.read_bytes() for p in (photos / "val").glob("*/*"))
    cut_photos = sorted(p.read_bytes() for p in (cut / "train").glob("*/*"))
    cut_photos += sorted(p.read_bytes() for p in (cut / "val").glob("*/*"))
    assert cut_photos == every  # each photo once, in its split
    assert label_check.the_cut(args, tmp_path / "out") == flips  # made once
    with pytest.raises(label_check.Problem, match="holds a cut made otherwise"):
        label_check.the_cut(label_check.get_args_parser().parse_args([*argv, "--seed", "1"]),
                            tmp_path / "out")  # fmt: skip

    val = [f["image"] for f in flips if f["split"] == "val"]
    disputed = [val[0], "val/cat/v000.jpg", val[1]]
    assert label_check.score(disputed, flips, top=2) == {
        "precision_at": 2, "precision": [1, 2], "recall": [2, 3], "disputed": 3,
    }  # fmt: skip


def compared(speedup, compile_seconds, eager_rate=1.0):
    import compile_cpu

    return compile_cpu.Compared(
        what="Phase 2, 64 px",
        mode="default",
        eager_rate=eager_rate,
        compiled_rate=eager_rate * speedup,
        window_speedups=[speedup],
        compile={"training batch 72": compile_seconds},
    )


def test_compiling_breaks_even_when_the_steps_it_saved_add_up_to_its_compile_time():
    import compile_cpu

    # 1 s steps made 0.8 s: a fifth of each eager minute saved, 60 s of compiling paid in 5.
    assert compile_cpu.break_even_minutes(1.0, 0.8, 60) == pytest.approx(5.0)
    assert compile_cpu.break_even_minutes(1.0, 1.1, 60) == math.inf  # compiled is slower
    assert compile_cpu.break_even_minutes(1.0, 1.0, 60) == math.inf
    assert compile_cpu.break_even_minutes(1.0, 0.9, 0) == 0.0  # nothing to pay back


@given(
    speedups=st.lists(st.floats(0.5, 2.0), min_size=2, max_size=2),
    compile_seconds=st.lists(st.floats(0, 600), min_size=2, max_size=2),
    rates=st.lists(st.floats(0.05, 20), min_size=2, max_size=2),
    split=st.lists(st.integers(1, 200), min_size=2, max_size=2),
    once=st.floats(0, 120),
    minutes=st.floats(0.5, 600),
)
@settings(max_examples=examples(60))
def test_a_runs_gain_crosses_zero_at_its_break_even_and_grows_with_its_length(
    speedups, compile_seconds, rates, split, once, minutes
):
    import compile_cpu

    phases = [compared(s, c, r) for s, c, r in zip(speedups, compile_seconds, rates)]
    shares = compile_cpu.phase_shares(split, [1 / r for r in rates])
    assert sum(shares) == pytest.approx(1.0) and min(shares) > 0
    gain = compile_cpu.run_gain(minutes, shares, phases, once)
    longer = compile_cpu.run_gain(2 * minutes, shares, phases, once)
    even = compile_cpu.run_break_even(shares, phases, once)
    if math.isinf(even):  # no phase's speed-up outweighs the others' slow-down
        assert gain <= 0 and longer <= gain + 1e-6
    else:
        assert compile_cpu.run_gain(even, shares, phases, once) == pytest.approx(0, abs=1e-6)
        assert (gain > 0) == (minutes > even) or gain == pytest.approx(0, abs=1e-6)
        assert longer >= gain
    # A run of one phase breaks even where that phase does.
    alone = compile_cpu.break_even_minutes(
        1 / rates[0], 1 / rates[0] / speedups[0], compile_seconds[0]
    )
    assert compile_cpu.run_break_even([1.0], phases[:1]) == pytest.approx(alone)


def test_timed_windows_take_the_functions_in_turns_each_going_first_as_often():
    import compile_cpu

    calls = []
    times = compile_cpu.in_turns([lambda: calls.append("a"), lambda: calls.append("b")], 4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(t) for t in times] == [4, 4]
    assert compile_cpu.speedups([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]


def test_the_compile_benchmark_measures_each_mode_against_eager_in_both_phases_and_prediction(
    tmp_path, capsys, monkeypatch, narrow_models
):
    """The plumbing, with torch.compile a stand-in that compiles nothing: each mode is compiled
    afresh per phase (and again for the warm caches), and every table row is there."""
    import compile_cpu

    modes, resets = [], []

    def spy(fn, mode=None):
        modes.append(mode)
        return fn

    monkeypatch.setattr(torch, "compile", spy)
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    args = "--sizes 32 --n 10 --batch-size 4 --predict-batch 6 --steps 1 --windows 2 --workers 0"
    argv = [*args.split(), "--modes", "default,max-autotune", "--workdir", str(tmp_path)]
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    compile_cpu.main(argv)
    out = capsys.readouterr().out
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before  # the empty cache was the run's
    both = ["default", "max-autotune"]
    # The process's first compile; per phase both modes, then each warm; prediction's.
    assert modes == [None, *both, *both, *both, *both, *both]
    assert len(resets) == 1 + 2 * 3 + 1
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    for what in ("Phase 1, 32 px", "Phase 2, 32 px"):
        assert sum(row.startswith(f"| {what} |") for row in rows) == 2, what
    assert sum(row.startswith("| 32 px |") for row in rows) == 2  # prediction, each mode
    assert "another size (--progressive)" in out and "Phase 1, 32 px, default: training" in out
    assert "- 32 px, max-autotune: a run of 30 minutes" in out


def test_the_small_data_section_names_each_rows_runs_and_writes_a_block_a_table(
    tmp_path, monkeypatch
):
    import small_data

    seen = []

    def section(runs, rows, answers_of):
        seen.append((rows, answers_of(None)))
        return ["| run |", "| --- |", f"| {rows[0][0]} |"], [f"- {rows[0][0]}: `cmd`"]

    monkeypatch.setattr(small_data, "section", section)
    monkeypatch.setattr(small_data, "backbone_of", lambda runs, rows: "Fine-tuned from `b.pt`.")
    runs = tmp_path / "runs"
    (runs / "few-method-s0").mkdir(parents=True)
    (runs / "few-method-s0" / "done").write_text("93\n")
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n")
    small_data.main(["section", str(runs), "--data", str(tmp_path), "--results", str(results)])
    assert [rows for rows, _ in seen] == [
        [(label, folder) for label, folder, _ in rows] for _, _, _, rows in small_data.TABLES
    ]
    assert seen[0][1] == tmp_path / "target-few" / "answers.csv"
    text = results.read_text()
    for block, title, *_ in small_data.TABLES:
        assert f"## {title}" in text and f"<!-- notes:{block} -->" in text
    assert "few-method-s0 93 s" in text


def test_the_planted_benchmark_makes_its_folder_again_and_no_folder_of_the_users(tmp_path):
    import data_check

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="is not a folder planted made"):
        data_check.main(["planted", "--data", str(tmp_path / "photos"), "--work", str(mine)])
    assert (mine / "notes.txt").read_text() == "mine"
