import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import model as M
import train
import twophase.report
from twophase import inference, options, report, table1
from twophase.resolve import resolve
from utils import Problem


def test_confusion_matrix_matches_a_hand_computed_case():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 1, 0, 1, 1, 0]
    counts = evaluate.confusion_matrix(labels, preds, 4, normalize=False)
    assert counts.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    rows = evaluate.confusion_matrix(labels, preds, 4)
    assert np.allclose(rows[:3].sum(axis=1), 1) and rows[3].sum() == 0  # class 3 has no images
    assert rows[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0, 0])


def test_metrics_from_log_probabilities():
    classes = ["a", "b", "c"]
    log_p = torch.tensor(
        [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]]
    ).log()
    labels = torch.tensor([0, 1, 1, 2])
    m = evaluate.compute_metrics(log_p, labels, classes)
    assert m["top1"] == 0.75 and m["top5"] == 1.0
    assert m["most_confused"] == [{"true": "b", "predicted": "a", "count": 1, "share": 0.5}]
    b = next(r for r in m["per_class"] if r["class"] == "b")
    assert (b["precision"], b["recall"], b["support"]) == (1.0, 0.5, 2)


def test_the_report_gives_one_balanced_accuracy_where_a_class_has_no_validation_images():
    log_p = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]).log()
    metrics = evaluate.compute_metrics(log_p, torch.tensor([0, 1, 1]), ["a", "b", "c"])
    assert metrics["balanced"] == 0.75  # a: 1 of 1, b: 1 of 2; c has no images
    summary = report.per_class_summary(metrics, {})[0]
    assert "recall 0.7500 (the balanced accuracy)" in summary and "(1 has none)" in summary


def non_trivial_png(path, min_side=300):
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert min(pixels.shape) >= min_side and pixels.std() > 5, path


@pytest.fixture
def trained(tiny_args, tmp_path):
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "1"])
    return tmp_path / "ck"


def test_evaluate_writes_metrics_and_figures(trained, tmp_path, capsys):
    evaluate.main(
        ["--ckpt", str(trained / "best.pt"), "--figures", str(tmp_path / "fig"), "--device", "cpu"]
    )
    out = capsys.readouterr().out
    assert "top-1" in out and "top-5" not in out  # of 3 classes, top-5 is 1 by definition
    fig = tmp_path / "fig"
    for name in (
        "fig1_loss.png",
        "fig2_val_accuracy.png",
        "fig5_confusion_matrix.png",
        "mistakes.png",
    ):
        non_trivial_png(fig / name)
    summary = json.loads((fig / "metrics.json").read_text())
    assert summary["images"] == 6 and 0 <= summary["top1"] <= 1
    lines = (fig / "per_class_metrics.csv").read_text().splitlines()
    assert lines[0] == "class,precision,recall,f1,support,train_images" and len(lines) == 4


def test_evaluate_matches_training_validation(trained, tmp_path, capsys):
    """Same preprocessing, same split: evaluate.py reproduces the accuracy training logged."""
    evaluate.main(
        ["--ckpt", str(trained / "last.pt"), "--figures", str(tmp_path / "fig"), "--device", "cpu"]
    )
    summary = json.loads((tmp_path / "fig" / "metrics.json").read_text())
    state = torch.load(trained / "last.pt", weights_only=True)
    assert summary["top1"] == pytest.approx(state["history"][-1]["val_acc"])
    assert summary["loss"] == pytest.approx(state["history"][-1]["val_loss"], rel=1e-4)


def test_evaluate_computes_the_loss_the_run_validated_with(tiny_args, tmp_path, capsys):
    """The run's class weights (a file's) and label smoothing: evaluate.py's loss is training's."""
    weights = tmp_path / "w.csv"
    weights.write_text("cat,5\ndog,0.2\n")
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0", "--class-weights", str(weights)])
    ckpt = tmp_path / "ck" / "last.pt"
    evaluate.main(["--ckpt", str(ckpt), "--figures", str(tmp_path / "fig"), "--device", "cpu"])
    summary = json.loads((tmp_path / "fig" / "metrics.json").read_text())
    state = torch.load(ckpt, weights_only=True)
    assert summary["loss"] == pytest.approx(state["history"][-1]["val_loss"], rel=1e-4)
    weights.unlink()  # gone since: the loss unweighted, said
    evaluate.main(["--ckpt", str(ckpt), "--figures", str(tmp_path / "fig"), "--device", "cpu"])
    assert "no --class-weights file" in capsys.readouterr().err


def test_confusion_figure_is_readable_at_100_classes(tmp_path):
    classes = [f"class_{i:03d}" for i in range(100)]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 100, 3000)
    preds = np.where(rng.random(3000) < 0.8, labels, rng.integers(0, 100, 3000))
    evaluate.plot_confusion(
        evaluate.confusion_matrix(labels, preds, 100, normalize=False), classes, tmp_path / "cm.png"
    )
    non_trivial_png(tmp_path / "cm.png", min_side=2000)


def test_compare_two_runs(tiny_args, tmp_path, capsys):
    for arch in ("resnet18", "resnet34"):
        train.main(
            tiny_args
            + ["--epochs1", "0", "--epochs2", "2", "--arch", arch, "--out", str(tmp_path / arch)]
        )
    runs = [str(tmp_path / arch / "best.pt") for arch in ("resnet18", "resnet34")]
    evaluate.main(["--compare", *runs, "--figures", str(tmp_path / "cmp")])
    table = capsys.readouterr().out
    for arch in ("resnet18", "resnet34"):
        params = sum(p.numel() for p in M.build_model(arch, 3, "none").parameters())
        assert f"| {arch} | {arch} | nadam | {params / 1e6:.1f}M |" in table
    non_trivial_png(tmp_path / "cmp" / "fig3_accuracy_vs_parameters.png")
    non_trivial_png(tmp_path / "cmp" / "fig4_validation_accuracy_curves.png")
    assert (tmp_path / "cmp" / "comparison.md").read_text() == table


def test_report_holds_the_runs_table_1_its_result_and_only_links_that_exist(
    tiny_args, dataset, tmp_path, monkeypatch
):
    recipe = ["--epochs1", "1", "--epochs2", "2", "--lr2", "2e-3", "--p-vflip", "0.1"]
    monkeypatch.chdir(tmp_path)  # the runs typed as a user would, paths relative to here
    typed = [word.replace(f"{tmp_path}{os.sep}", "") for word in tiny_args]
    for name, extra in (("method", []), ("adamw", ["--optimizer2", "adamw"])):
        train.main(typed + recipe + extra + ["--out", name])
    answers = tmp_path / "answers.csv"  # test image j shows the colour of class j % 3
    classes = ("cat", "dog", "eel")
    answers.write_text(
        "image_name,pred_label\n" + "".join(f"img_{j:02d},{classes[j % 3]}\n" for j in range(5))
    )
    (dataset / "class_names.csv").write_text(
        "folder,words\ncat,house cat\ndog,dog\neel,moray eel\n"
    )
    report = tmp_path / "out" / "REPORT.md"
    runs = [str(tmp_path / name / "best.pt") for name in ("method", "adamw")]
    argv = [
        "--ckpt",
        runs[0],
        "--report",
        str(report),
        "--figures",
        str(tmp_path / "out" / "fig"),
        "--answers",
        str(answers),
        "--compare",
        *runs,
        "--device",
        "cpu",
    ]
    evaluate.main(argv)
    text = report.read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert len(links) >= 7
    for target in links:
        assert (report.parent / target).is_file(), target
    assert "| Training | Phase II epochs | 2 | II |" in text  # the run's, not the default 125
    assert "vertical p 0.1" in text and "| Model | pretrained weights | none |" in text
    assert "| Levers | recipe | report |" in text and "EMA" not in text  # no lever on
    assert re.search(r"\| validation \| 6 \| [0-9.]+ \(\d/6\) \|", text)
    assert re.search(r"\| test \| 5 \| [0-9.]+ \(\d/5\) \|", text)
    assert "Comparison: Phase II optimizers" in text and "(house cat)" in text
    command = "`python train.py --data data --out ck --arch resnet18"  # as typed, to run again
    assert command in text and "--optimizer2 adamw" in text
    # Fit to hand in: no empty slot, no path of this machine, figures numbered as shown.
    assert "<!-- notes" not in text and str(tmp_path) not in text
    numbers = [int(n) for n in re.findall(r"\*Figure (\d+):", text)]
    disputed = json.loads((tmp_path / "out" / "fig" / "metrics.json").read_text())[
        "disputed_labels"
    ]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) == 7 + bool(disputed)
    assert "Figure 3: the confusion matrix: the validation images of each true class" in text
    assert "method's" not in text  # captions speak to the report's reader

    # Prose written into a notes slot survives a new report, in its place.
    slot = "<!-- notes:summary -->\nWe find X.\n<!-- /notes -->"
    report.write_text(text.replace("## Result\n", f"{slot}\n\n## Result\n"))
    twophase.report.write_section(report, "levers", "Levers", "the levers' table\n")  # appended
    evaluate.main(argv)
    again = report.read_text()
    assert slot in again and again.index(slot) < again.index("## Result")
    assert again.count("the levers' table") == 1 and "## Notes" not in again


def test_a_larger_test_size_is_read_through_its_own_cache(trained, tmp_path, capsys):
    args = [
        "--ckpt",
        str(trained / "best.pt"),
        "--figures",
        str(tmp_path / "fig"),
        "--device",
        "cpu",
    ]
    evaluate.main(args + ["--img-size", "24", "--max-params", "1K"])
    out, err = capsys.readouterr()
    assert "top-1" in out and "parameters, more than --max-params 1,000" in err
    cache = [p.name for p in (trained.parent / "data" / ".cache").iterdir()]
    assert any("-24px-" in name for name in cache) and any("-16px-" in name for name in cache)


def test_table_1_of_a_recipe_best_run_shows_its_levers():
    args = vars(resolve(["--recipe", "best", "--mixup", "0.2"]).options)
    state = {"args": args, "arch": "resnet18", "img_size": 64, "classes": ["a"], "device": "cpu"}
    text = "\n".join(table1.table1(state, "."))
    assert "| Levers | recipe | best |" in text
    assert "| Levers | moving average of the weights (EMA) | decay 0.99 | both |" in text
    assert "| Levers | layer-wise lr decay | x0.7 a stage | II |" in text
    assert "| Levers | MixUp | alpha 0.2 | II |" in text and "CutMix" not in text
    assert "the last 3 Phase II epochs, if it validates better" in text
    assert "| Levers | test-time augmentation | horizontal flip" in text
    assert "vertical p 0" in text


def test_table_1_names_the_fine_tuning_levers_and_whose_weight_decay_l2sp_leaves():
    argv = ["--l2sp", "0.01", "--sam", "0.05", "--phase1-features", "1", "--drop-copies"]
    args = vars(resolve([*argv, "--wd2", "3e-4"]).options)
    state = {"args": args, "arch": "resnet18", "img_size": 64, "classes": ["a"], "device": "cpu"}
    text = "\n".join(table1.table1(state, "."))
    assert table1.phase2_decay(args).startswith("wd 0.0003 on the new head; the backbone pulled")
    assert "| Levers | L2-SP | alpha 0.01: the backbone towards the weights it started" in text
    assert "| Levers | sharpness-aware steps (SAM) | rho 0.05 | II |" in text
    assert (
        "| Levers | Phase I from cached features | 1 pass(es) of the frozen backbone | I |" in text
    )
    assert "| Levers | copies left out of validation |" in text
    plain = "\n".join(table1.table1(state | {"args": vars(resolve([]).options)}, "."))
    assert table1.phase2_decay(vars(resolve([]).options)) == "wd 0.0001"
    assert not any(word in plain for word in ("L2-SP", "SAM", "cached features", "copies left"))


@pytest.mark.parametrize(
    "argv",
    [
        ["--recipe", "best", "--epochs", "8", "--seed", "1", "--data", "photos"],
        ["--demo", "--epochs2", "5", "--cosine-epochs", "4"],
        ["--epochs", "8", "--epochs1", "2", "--ema", "0.5", "--scale", "0.8", "1.2"],
        ["--arch", "resnet50", "--freeze-bn", "--optimizer2", "sgd"],
    ],
)
def test_the_reports_command_reproduces_the_runs_options(argv):
    defaults = vars(options.get_args_parser().parse_args([]))
    args = vars(resolve(argv).options)
    command = table1.command_of({"args": args}, defaults)
    again = vars(resolve(shlex.split(command)[2:]).options)
    assert again == args


class Brightness(torch.nn.Module):
    """A model whose last stage sees brightness: layer4 a 1x1 convolution averaging the colours,
    then global pooling and a head for which class 0 is "bright" and class 1 "dark". Its Grad-CAM
    for class 0 is known: the brightness map, scaled to [0, 1]."""

    def __init__(self):
        super().__init__()
        self.layer4 = torch.nn.Conv2d(3, 1, 1, bias=False)
        self.fc = torch.nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.layer4.weight.fill_(1 / 3)
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))

    def forward(self, x):
        return self.fc(self.layer4(x).mean(dim=(2, 3)))


def test_grad_cam_peaks_where_the_object_is_and_is_a_non_negative_map_per_image():
    images = torch.zeros(2, 3, 16, 16)
    images[0, :, 2:6, 3:7] = 1.0  # a bright object at the top left
    images[1, :, 10:14, 9:13] = 1.0  # ... at the bottom right
    model = Brightness()
    cams = inference.grad_cam(model, model.layer4, images, torch.tensor([0, 0]))
    assert (
        cams.shape == (2, 16, 16) and (cams >= 0).all() and cams.amax(dim=(1, 2)).tolist() == [1, 1]
    )
    for cam, (top, left) in zip(cams, [(2, 3), (10, 9)]):
        assert cam[top : top + 4, left : left + 4].mean() > 0.9
        assert cam.sum() - cam[top : top + 4, left : left + 4].sum() < 0.1 * cam.sum()
    dark = inference.grad_cam(model, model.layer4, images, torch.tensor([1, 1]))
    assert (dark == 0).all()  # nothing bright speaks for "dark"


def test_bad_answers_are_refused_before_any_figure_is_written(trained, tmp_path):
    answers = tmp_path / "answers.csv"
    answers.write_text("image,label\nimg_00,cat\nimg_99,dog\n")
    figures = tmp_path / "fig"
    argv = ["--ckpt", str(trained / "best.pt"), "--figures", str(figures), "--answers", answers]
    with pytest.raises(SystemExit, match="line 3: 'img_99' names no image"):
        evaluate.main([str(a) for a in argv])
    assert not figures.exists()


def test_load_classifier_raises_what_code_of_ones_own_catches(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere.pt")):
        inference.load_classifier(tmp_path / "nowhere.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Problem, match="cannot load checkpoint"):  # an Exception, not a SystemExit
        inference.load_classifier(tmp_path / "broken.pt")


def test_each_run_has_figures_of_its_own_and_one_replaced_is_said(tiny_args, tmp_path, capsys):
    """checkpoints/'s run: figures/; a run in b/: figures/b/. Another checkpoint evaluated into a
    folder replaces evaluate.py's figures and report there, and says so; a file of the user's
    stays, and a report holding prose of its own is kept under another name."""
    for out in ("checkpoints", "b"):
        train.main(tiny_args + ["--epochs1", "1", "--epochs2", "1", "--out", str(tmp_path / out)])
    for out in ("checkpoints", "b"):  # from tmp_path: figures/ is its
        evaluate.main(["--ckpt", str(tmp_path / out / "best.pt"), "--report", "--device", "cpu"])
    cwd = Path.cwd()
    ours = cwd / "figures"
    assert (ours / "report.md").is_file() and (ours / "b" / "report.md").is_file()
    (ours / "notes.txt").write_text("mine\n")
    evaluate.main(["--ckpt", str(tmp_path / "checkpoints" / "best.pt"), "--device", "cpu"])
    assert (ours / "report.md").is_file()  # the same checkpoint again: nothing gives way
    capsys.readouterr()
    evaluate.main(
        ["--ckpt", str(tmp_path / "b" / "last.pt"), "--figures", "figures", "--device", "cpu"]
    )
    err = capsys.readouterr().err
    assert "figures/: the figures and report of " in err
    assert "/checkpoints/best.pt give way to " in err and "/b/last.pt's" in err
    assert not (ours / "report.md").exists()  # no report of another run beside them
    assert (ours / "notes.txt").read_text() == "mine\n" and (ours / "gradcam.png").is_file()
    # The same checkpoint's path, of a new run in the folder (the demo run again): said so.
    ck = tmp_path / "b" / "last.pt"
    train.main(
        tiny_args
        + ["--epochs1", "1", "--epochs2", "1", "--out", str(tmp_path / "b")]
        + ["--overwrite"]
    )
    capsys.readouterr()
    evaluate.main(["--ckpt", str(ck), "--figures", "figures", "--device", "cpu"])
    err = capsys.readouterr().err
    words = r"the figures and report of an earlier run's (\S+)/b/last.pt give way to \1/b/last.pt's"
    assert re.search(words, err)
    evaluate.main(
        [
            "--ckpt",
            str(tmp_path / "b" / "best.pt"),
            "--figures",
            "figures",
            "--report",
            "--device",
            "cpu",
        ]
    )
    report = ours / "report.md"
    report.write_text(report.read_text() + "<!-- notes:summary -->\nOur words.\n<!-- /notes -->\n")
    # the same folder retrained from scratch (--overwrite): another run, its report gives way
    train.main(
        tiny_args
        + ["--epochs1", "1", "--epochs2", "1", "--out", str(tmp_path / "b"), "--overwrite"]
    )
    capsys.readouterr()
    evaluate.main(
        ["--ckpt", str(tmp_path / "b" / "best.pt"), "--figures", "figures", "--device", "cpu"]
    )
    assert "holds prose of its own: kept as figures/report.replaced.md" in capsys.readouterr().err
    assert "Our words." in (ours / "report.replaced.md").read_text() and not report.exists()


def test_table_1_says_what_the_run_did_and_no_path_of_this_machine():
    state = {
        "args": vars(
            resolve(
                ["--epochs1", "0", "--warmup-epochs", "0", "--weights", "/home/me/w/r18.pth"]
            ).options
        ),
        "classes": ["a", "b"],
        "arch": "resnet18",
        "img_size": 64,
        "history": [{"phase": 2, "epoch": e, "val_acc": 0.5} for e in range(1, 20)],
    }
    text = "\n".join(table1.table1(state, "/home/me/project/figures"))
    assert "| Training | Phase I epochs | 0 (skipped) | I |" in text and "AdamW" not in text
    assert "warmup" not in text and "cosine with half-period 45" in text
    assert "periodic" not in text  # every 15, if val acc >= 0.82: none was kept
    assert "| Model | pretrained weights | ../../w/r18.pth |" in text  # relative to the report
    assert "/home/me" not in text


def test_grad_cams_correct_examples_take_each_class_in_turn_and_fill_their_row():
    labels = torch.tensor([0, 0, 1, 0, 2, 1])
    assert evaluate.across_classes([0, 1, 3, 2, 5, 4], labels)[:3] == [0, 2, 4]
    # Two classes: a row of 6 still full, the classes alternating.
    two = torch.tensor([0, 1] * 5)
    assert evaluate.across_classes(list(range(10)), two)[:6] == [0, 1, 2, 3, 4, 5]
    assert evaluate.across_classes([0, 2, 4, 6, 1], two) == [0, 1, 2, 4, 6]


def test_the_report_says_up_front_that_uneven_classes_make_top1_unfair():
    metrics = {"images": 10, "top1_correct": 8, "balanced": 0.55}
    line = report.headline({"class_counts": [40, 4, 9]}, metrics, None)
    assert line.startswith("Validation top-1 0.8000 (8/10), balanced accuracy 0.5500.")
    assert "The classes are uneven (4 to 40 training images each)" in line
    assert "balanced" not in report.headline({"class_counts": [9, 8]}, metrics, None)


def test_the_median_f1_of_an_even_number_of_classes_is_the_mean_of_the_middle_two():
    rows = [
        {"class": c, "precision": f, "recall": f, "f1": f, "support": 5, "train_images": 9}
        for c, f in (("a", 0.689), ("b", 0.796))
    ]
    lines = report.per_class_summary({"per_class": rows}, {})
    assert "median F1 0.7425" in lines[0]
    three = rows + [{**rows[0], "class": "c", "f1": 0.1}]
    assert "median F1 0.6890" in report.per_class_summary({"per_class": three}, {})[0]


HISTORY = [
    {"phase": 1, "epoch": 1, "val_acc": 0.45, "seconds": 6},
    {"phase": 2, "epoch": 1, "val_acc": 0.70, "ema_val_acc": 0.60, "seconds": 18},
    {"phase": 2, "epoch": 2, "val_acc": 0.74, "ema_val_acc": 0.79, "seconds": 18},
    {"phase": 2, "epoch": 3, "val_acc": 0.72, "ema_val_acc": 0.77, "seconds": 18},
]


def test_figure_2_marks_and_names_what_the_checkpoint_holds():
    averaged = {"averaged": ["e3.pt", "e4.pt"], "val_acc": 0.805, "phase": 2, "epoch": 3}
    averaged["history"] = HISTORY
    assert evaluate.checkpoint_mark(averaged, HISTORY) == (
        3,
        0.805,
        "the checkpoint: the average of phase 2 epochs 2-3",
    )
    ema = {"phase": 2, "epoch": 2, "eval_weights": "ema"}
    assert evaluate.checkpoint_mark(ema, HISTORY) == (
        2,
        0.79,
        "the checkpoint: phase 2 epoch 2, moving average",
    )
    plain = {"phase": 2, "epoch": 3, "eval_weights": "model"}
    assert evaluate.checkpoint_mark(plain, HISTORY)[:2] == (3, 0.72)
    assert evaluate.checkpoint_mark({**plain, "step": 4}, HISTORY) is None  # mid-epoch


def test_the_epoch_axis_numbers_each_phase_from_1_as_the_log_does():
    from twophase.figures import phase_epoch

    assert [phase_epoch(HISTORY, x) for x in (0, 1, 2, 3, 4, 4.5, 5)] == [
        "",
        "1",
        "1",
        "2",
        "3",
        "",
        "",
    ]


def test_the_report_names_each_numbers_weights_and_a_phase_that_did_not_move(tmp_path):
    state = {
        "args": {"data": "data", "batch_size": 8, "accum_steps": 1, "val_fraction": 0.1},
        "class_counts": [12, 12],
        "phase": 2,
        "epoch": 2,
        "eval_weights": "ema",
        "classes": ["a", "b"],
    }
    metrics = {
        "images": 20,
        "data_layout": "train/ class folders, val held out",
        "per_class": [{"support": 11}, {"support": 9}],
    }
    lines = report.where_from(state, HISTORY, metrics, "the 9 images of hold/, labelled by a.csv")
    text = "\n".join(lines)
    assert "held out for validation (0.1 of each class" in text and "optimistic" in text
    assert "Test: the 9 images of hold/, labelled by a.csv" in text
    assert "Weights: the weights' moving average after phase 2 epoch 2, the run's best" in text
    assert "Phase I: 1 epoch, 3 optimizer steps; validation accuracy 0.4500" in text
    assert "no better than always answering the largest class (0.5500)" in text
    assert "Phase II: 3 epochs" in text and text.count("no better") == 1
    assert report.dataset_name({"args": {"data": "repo/data"}, "data": "/x/repo/data"}) == "data"


def test_a_paragraph_of_the_users_in_a_report_and_a_file_it_names_are_never_lost(
    trained, tmp_path, capsys
):
    """Text added to report.md outside its notes slots makes the file the user's: set aside, and
    said where, when the same checkpoint's report is written again and when another checkpoint
    takes the folder; a --report file of the user's own is set aside too, never replaced."""
    figures = tmp_path / "fig"
    given = ["--figures", str(figures), "--device", "cpu"]
    best, last = str(trained / "best.pt"), str(trained / "last.pt")
    evaluate.main(["--ckpt", best, "--report", *given])
    report = figures / "report.md"
    report.write_text(report.read_text() + "\nA paragraph of mine.\n")
    capsys.readouterr()
    evaluate.main(["--ckpt", best, "--report", *given])
    err = capsys.readouterr().err
    assert f"{report} was edited outside its notes: kept as {figures / 'report.replaced.md'}" in err
    assert "A paragraph of mine." in (figures / "report.replaced.md").read_text()
    assert "A paragraph of mine." not in report.read_text()
    evaluate.main(["--ckpt", best, "--report", *given])  # the report as written: replaced, no more
    assert sorted(p.name for p in figures.glob("report*.md")) == ["report.md", "report.replaced.md"]

    report.write_text(report.read_text().replace("## Errors", "Another of mine.\n\n## Errors"))
    capsys.readouterr()
    evaluate.main(["--ckpt", last, *given])  # another checkpoint: the report gives way
    err = capsys.readouterr().err
    assert f"kept as {figures / 'report.replaced1.md'}" in err and not report.exists()
    assert "Another of mine." in (figures / "report.replaced1.md").read_text()
    assert "A paragraph of mine." in (figures / "report.replaced.md").read_text()

    thesis = tmp_path / "thesis.md"
    thesis.write_text("# My thesis\n\nChapter one.\n")
    evaluate.main(["--ckpt", last, "--report", str(thesis), *given])
    err = capsys.readouterr().err
    kept = tmp_path / "thesis.replaced.md"
    assert f"{thesis} is not a report evaluate.py wrote: kept as {kept}" in err
    assert kept.read_text() == "# My thesis\n\nChapter one.\n"
    assert "Chapter one." not in thesis.read_text() and f"wrote {thesis}" in err


def test_a_file_of_the_users_under_a_figures_name_is_set_aside_not_replaced(
    trained, tmp_path, capsys
):
    """A figure or metrics file of the user's own where evaluate.py writes one (or one of its own,
    changed since) is moved aside, said; what evaluate.py wrote and nobody changed is replaced."""
    figures = tmp_path / "fig"
    figures.mkdir()
    (figures / "per_class_metrics.csv").write_text("my,own\n")
    (figures / "fig1_loss.png").write_bytes(b"my own figure")
    argv = ["--ckpt", str(trained / "best.pt"), "--figures", str(figures), "--device", "cpu"]
    evaluate.main(argv)
    err = capsys.readouterr().err
    for name, kept in (
        ("per_class_metrics.csv", "per_class_metrics.replaced.csv"),
        ("fig1_loss.png", "fig1_loss.replaced.png"),
    ):
        assert (
            f"{figures / name} was not written by evaluate.py" in err and str(figures / kept) in err
        )
    assert (figures / "per_class_metrics.replaced.csv").read_text() == "my,own\n"
    assert (figures / "fig1_loss.replaced.png").read_bytes() == b"my own figure"
    (figures / "metrics.json").write_text((figures / "metrics.json").read_text() + " ")  # edited
    evaluate.main(argv)
    err = capsys.readouterr().err
    assert f"kept as {figures / 'metrics.replaced.json'}" in err and "fig1_loss" not in err
    assert len(list(figures.glob("*.replaced*"))) == 3
