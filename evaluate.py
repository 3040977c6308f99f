"""Evaluate a checkpoint on the validation split, and draw the report's figures.

    python evaluate.py --ckpt best.pt       # metrics, Figures 1, 2, 5 and the mistakes gallery
    python evaluate.py --compare checkpoints/*/best.pt   # Figures 3 and 4 and a table of the runs
    python evaluate.py --ckpt best.pt --report report.md --answers answers.csv   # the report

The validation images go through exactly the preprocessing used in training. Metrics are printed
on standard output and written to the figures folder: metrics.json (loss, top-1, top-5, the most
confused pairs) and per_class_metrics.csv (precision, recall, F1, support); beside them, the
validation labels the model disputes, to review by hand (label_issues.csv and label_issues.png,
twophase/label_issues.py) and, where the run's folder holds its data check, the copies across
splits or labels (copies.png). A file there that evaluate.py did not write, or that was changed
since, is moved aside (NAME.replaced.EXT), never written over (twophase/written.py).
"""

import argparse
import csv
import json
from pathlib import Path

import torch

from data import (
    display_names,
    labels_path,
    trained_data_root,
    uneven,
    validation_of,
)
from model import count_parameters, warn_if_too_large
from twophase.checkpoint import (
    best_acc,
    full_history,
    held_name,
    load_checkpoint,
    resolve_checkpoint,
)
from twophase.checks import at_least, checked, parameter_count
from twophase.data_check import test_copies_line
from twophase.figures import (
    MANY,
    plot_confusion,
    plot_curves_comparison,
    plot_gradcam,
    plot_loss,
    plot_mistakes,
    plot_most_confused,
    plot_size_comparison,
    plot_val_accuracy,
)
from twophase.inference import (
    add_inference_args,
    cam_layer,
    confusion_matrix,
    grad_cam,
    load_trained,
    most_confused,
    print_confused,
    topk_hits,
)
from twophase.label_issues import review_copies, review_labels
from twophase.loader import make_loader
from twophase.loss import loss_of
from twophase.markdown import relative, shown_path
from twophase.options import get_args_parser as training_options
from twophase.report import MARK, Evaluated, why_kept, write_report
from twophase.run_folder import FIGURES, run_figures
from twophase.submission import test_answers, test_score
from twophase.written import Written, set_aside
from utils import Problem, exits_on_problems, log


def get_args_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_inference_args(p)
    p.add_argument(
        "--figures",
        default=None,
        metavar="DIR",
        help="folder for the figures and metric files (default: figures/ for a run in "
        "checkpoints/, figures/RUN for a run in a folder RUN)",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        action="append",
        metavar="CKPT",
        default=None,
        help="compare runs (different --arch or --optimizer2) from their checkpoints; given "
        "again, another comparison",
    )
    p.add_argument(
        "--report",
        nargs="?",
        const="",
        metavar="FILE.md",
        default=None,
        help="write a Markdown report of --ckpt (and of --compare's runs) linking the figures, "
        "into FILE.md or the figures' folder (report.md)",
    )
    p.add_argument(
        "--answers",
        metavar="CSV",
        default=None,
        help="true labels of the test images: a CSV of two columns, an image's name and its "
        "label, under any header (predict.py's own output reads too): the report gives test "
        "accuracy, of every compared run too",
    )
    p.add_argument("--test-dir", default=None, help="the test images (default: <data>/test)")
    p.add_argument(
        "--top-pairs",
        type=checked(int, at_least(0)),
        default=10,
        help="how many confused pairs to list",
    )
    p.add_argument(
        "--max-params",
        type=checked(parameter_count, at_least(1)),
        default=None,
        metavar="N",
        help="warn when the model has more parameters (e.g. 100M)",
    )
    return p


# ----------------------------------------------------------------------------- metrics


def compute_metrics(logits, labels, classes, criterion=None, top=10, train_counts=None):
    """Loss (`criterion`, the run's: by default plain cross-entropy), top-1, top-5 and balanced
    accuracy (the mean of the per-class recalls, over the classes present), per-class precision,
    recall, F1, support (and training images, where `train_counts` has them), the confusion
    counts and their most confused pairs."""
    from sklearn.metrics import precision_recall_fscore_support  # 1 to 3 s to import: used here

    preds = logits.argmax(1)
    loss = (criterion or torch.nn.CrossEntropyLoss())(logits, labels).item()
    counts = confusion_matrix(labels.numpy(), preds.numpy(), len(classes), normalize=False)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels.numpy(), preds.numpy(), labels=list(range(len(classes))), zero_division=0
    )
    top1, top5 = (int(hits) for hits in topk_hits(logits, labels))
    trained_on = train_counts if train_counts is not None else [None] * len(classes)
    return {
        "images": len(labels),
        "loss": loss,
        "top1": top1 / len(labels),
        "top1_correct": top1,
        "top5": top5 / len(labels),
        "top5_correct": top5,
        "balanced": float(recall[support > 0].mean()),
        "most_confused": most_confused(counts, classes, top),
        "per_class": [
            {
                "class": c,
                "precision": float(p),
                "recall": float(r),
                "f1": float(f),
                "support": int(s),
                "train_images": n,
            }
            for c, p, r, f, s, n in zip(classes, precision, recall, f1, support, trained_on)
        ],
        "confusion": counts,
    }


def write_metrics(metrics, figures):
    """per_class_metrics.csv and metrics.json, into `figures` (a Written)."""
    with open(figures.to_write("per_class_metrics.csv"), "w", newline="") as f:
        columns = ["class", "precision", "recall", "f1", "support", "train_images"]
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(metrics["per_class"])
    keys = ("images", "loss", "top1", "top1_correct", "top5", "top5_correct", "balanced")
    listed = (*keys, "most_confused", "disputed_labels", "copies", "data_layout")
    summary = {k: metrics[k] for k in listed if k in metrics}
    figures.to_write("metrics.json").write_text(json.dumps(summary, indent=2) + "\n")


def print_metrics(metrics, ckpt, held):
    """The validation metrics in a line, named by the checkpoint and the weights it holds."""
    n, many = metrics["images"], len(metrics["per_class"]) > 5  # top-5 of 5 classes is 1
    top5 = f"top-5 {metrics['top5']:.4f} ({metrics['top5_correct']}/{n}) | " if many else ""
    print(
        f"{ckpt} ({held}): {n} validation images | loss {metrics['loss']:.4f} | "
        f"top-1 {metrics['top1']:.4f} ({metrics['top1_correct']}/{n}) | {top5}"
        f"balanced {metrics['balanced']:.4f}"
    )
    print_confused(metrics["most_confused"])
    if "disputed_labels" in metrics:
        print(f"labels the model disputes: {metrics['disputed_labels']} of {n} (label_issues.csv)")


# ----------------------------------------------------------------------------- comparing runs


def describe_run(path, args, scores=None):
    """A run's record for a comparison: what it is, its history, and with --answers its test
    accuracy (from `scores`, by checkpoint path, where it is known already)."""
    state = load_checkpoint(path)
    history = full_history(resolve_checkpoint(path), state)
    best = max(history, key=best_acc)
    params = sum(
        v.numel()
        for k, v in state["model"].items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    seconds = state.get("wall_seconds") or sum(
        r["seconds"] + r.get("val_seconds", 0) for r in history
    )
    run = {
        "path": str(path),
        "state": state,
        "folder": Path(path).resolve().parent.name,
        "arch": state["arch"],
        "optimizer2": state["args"].get("optimizer2"),
        "params": params,
        "history": history,
        "best_acc": best_acc(best),
        "best_epoch": f"phase {best['phase']} epoch {best['epoch']}",
        "minutes": seconds / 60,
    }
    if args.answers:
        known = (scores or {}).get(resolve_checkpoint(path).resolve())
        run["test"] = known or test_score_of(load_trained(args, state), args)
    return run


def comparison_name(runs):
    """What a comparison varies, as a title and a folder name."""
    for key, title in (("arch", "architectures"), ("optimizer2", "Phase II optimizers")):
        others = [
            {k: v for k, v in r["state"]["args"].items() if k not in (key, "out")} for r in runs
        ]
        if len({r[key] for r in runs}) == len(runs) and all(o == others[0] for o in others):
            return title, title.split()[-1]
    return "runs", "runs"


def compare_runs(paths, args, scores=None):
    """The records of several runs, each labelled by its folder (unless several share one)."""
    runs = [describe_run(p, args, scores) for p in paths]
    folders = [r["folder"] for r in runs]
    for r in runs:
        r["label"] = (
            r["folder"] if folders.count(r["folder"]) == 1 else f"{r['arch']}/{r['optimizer2']}"
        )
    return runs


def write_comparison(runs, figures, under=""):
    """Figures 3 and 4 and a table of the runs (comparison.md, also printed), in `figures` (a
    Written), in its subfolder `under` where one is named."""
    fig3, fig4 = (figures.to_write(under, name) for name in COMPARISON[:2])
    plot_size_comparison(runs, fig3)
    plot_curves_comparison(runs, fig4)

    tested = all("test" in r for r in runs)
    lines = [
        "| run | architecture | Phase II optimizer | parameters | "
        + ("test accuracy | " if tested else "")
        + "best val acc | best epoch | epochs |",
        "| --- | --- | --- | ---: | " + ("---: | " if tested else "") + "---: | --- | ---: |",
    ]
    for r in runs:
        test = (
            f"{r['test'][0] / r['test'][1]:.4f} ({r['test'][0]}/{r['test'][1]}) | "
            if tested
            else ""
        )
        lines.append(
            f"| {r['label']} | {r['arch']} | {r['optimizer2']} | {r['params'] / 1e6:.1f}M | "
            f"{test}{r['best_acc']:.4f} | {r['best_epoch']} | {len(r['history'])} |"
        )
    table = "\n".join(lines) + "\n"
    table_file = figures.to_write(under, COMPARISON[2])
    table_file.write_text(table)
    print(table, end="")
    log(f"wrote {fig3}, {fig4} and {table_file}")


# ----------------------------------------------------------------------------- main


def test_score_of(trained, args, answers=None):
    """The Score of a checkpoint on its test folder against --answers (`answers`: those already
    read and checked, test_answers'), through predict.py's path."""
    if answers is None:
        answers = test_answers(test_folder(args, trained.state), args.answers, trained.classes)
    return test_score(trained, answers, args.cache_workers, args.batch_size, args.top_pairs)


def test_source(args, state, test, report):
    """Where the report's test score comes from, in words: the images and the labels file, as
    given (relative to the report where given as absolute paths)."""
    if not test:
        return None
    here = report.resolve().parent
    images = shown_path(args.test_dir, here) if args.test_dir else "the dataset's test/"
    return f"the {test.total} images of {images}, labelled by {shown_path(args.answers, here)}"


def test_folder(args, state):
    return Path(args.test_dir or trained_data_root(args.data, state) / "test")


def run_loss(saved, classes, counts, root):
    """The loss the run trained and validated with (its label smoothing, its class weights: a
    file found where the run had it, or by its name in the dataset's root). A weights file that
    is gone leaves the loss unweighted, and a line says so."""
    options = {"label_smoothing": 0.0, "class_weights": "none", **saved}
    weights = options["class_weights"]
    if weights not in ("auto", "none") and not Path(weights).is_file():
        try:
            options["class_weights"] = str(labels_path(weights, root))
        except Problem:
            log(f"warning: no --class-weights file {weights} (nor in {root}): the loss unweighted")
            options["class_weights"] = "none"
    return loss_of(argparse.Namespace(**options), classes, counts)


def evaluate_checkpoint(trained, args, figures, names):
    """Validation metrics of a checkpoint, printed and written to `figures` (a Written) with
    Figures 1, 2, 5 and the mistakes gallery; returns (metrics, history)."""
    state, classes, saved = trained.state, trained.classes, trained.state["args"]
    root = trained_data_root(args.data, state)
    splits = validation_of(state, root, trained.img_size, args.cache_workers)
    val = splits.val
    loader = make_loader(
        val, args.batch_size, shuffle=False, pin_memory=trained.device.type == "cuda"
    )
    batches = [(logits.cpu(), labels.cpu()) for logits, labels in trained.logits(loader)]
    logits = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    criterion = run_loss(saved, classes, state.get("class_counts"), root)
    metrics = compute_metrics(
        logits, labels, classes, criterion, args.top_pairs, state.get("class_counts")
    )
    metrics["data_layout"] = splits.layout
    shown = [names.get(c, c) for c in classes]
    probs = logits.softmax(dim=1).numpy()
    metrics["disputed_labels"] = review_labels(probs, val, root, classes, shown, figures)
    copies = review_copies(resolve_checkpoint(args.ckpt).resolve().parent, root, names, figures)
    metrics["copies"] = copies._asdict() if copies else None
    write_metrics(metrics, figures)
    print_metrics(metrics, args.ckpt, held_name(state))
    params = count_parameters(trained.model.parameters())
    print(f"{state['arch']}: {params:,} parameters")
    warn_if_too_large(state["arch"], params, args.max_params)
    history = full_history(resolve_checkpoint(args.ckpt), state)
    if history:
        plot_loss(history, figures.to_write("fig1_loss.png"))
        uneven_data = uneven(state.get("class_counts") or [])
        held = checkpoint_mark(state, history)
        fig2 = figures.to_write("fig2_val_accuracy.png")
        plot_val_accuracy(history, fig2, uneven_data, held)
    else:  # saved during its first epoch
        log(f"{args.ckpt} has no finished epoch: no Figures 1 and 2")
    preds = logits.argmax(1).numpy()
    counts = confusion_matrix(labels.numpy(), preds, len(classes), normalize=False)
    plot_confusion(counts, shown, figures.to_write("fig5_confusion_matrix.png"))
    if len(classes) > MANY:
        plot_most_confused(counts, shown, figures.to_write("fig5_most_confused.png"))
    confidence, preds = logits.softmax(dim=1).max(1)
    wrong = torch.nonzero(preds != labels).flatten()
    worst = wrong[confidence[wrong].argsort(descending=True)][:18].tolist()
    images = val[worst][0].numpy() if worst else []
    plot_mistakes(
        images,
        labels[worst].tolist(),
        preds[worst].tolist(),
        confidence[worst].tolist(),
        shown,
        figures.to_write("mistakes.png"),
    )
    right = torch.nonzero(preds == labels).flatten()
    best = across_classes(right[confidence[right].argsort(descending=True)].tolist(), labels)
    picked = worst[:6] + best[:6]  # a row of the mistakes, a row of the correct
    gradcam = figures.to_write("gradcam.png")
    draw_gradcam(trained, val, picked, preds, labels, confidence, shown, gradcam)
    log(f"wrote figures and metrics to {figures.folder}/")
    return metrics, history


def across_classes(indices, labels):
    """`indices` reordered to take each class in turn (the first of each class, in their order,
    then the second of each...): Grad-CAM's correct examples, as many classes as there are,
    and a row still full where there are fewer classes than places."""
    queues = {}
    for i in indices:
        queues.setdefault(int(labels[i]), []).append(i)
    picked = []
    for k in range(max(map(len, queues.values()), default=0)):
        picked += [queue[k] for queue in queues.values() if k < len(queue)]
    return picked


def checkpoint_mark(state, history):
    """What Figure 2 marks, the checkpoint's weights: (the index in `history` of the epoch they
    are of, their validation accuracy, their name), or None for the best epoch (a checkpoint
    made elsewhere, or in the middle of an epoch)."""
    if state.get("averaged") and state.get("val_acc") is not None:
        return len(history) - 1, state["val_acc"], f"the checkpoint: {held_name(state)}"
    position = (state["phase"], state["epoch"])
    at = [i for i, r in enumerate(history) if (r["phase"], r["epoch"]) == position]
    if not at or state.get("step"):
        return None
    record, ema = history[at[0]], state.get("eval_weights") == "ema"
    acc = record.get("ema_val_acc", record["val_acc"]) if ema else record["val_acc"]
    return at[0], acc, f"the checkpoint: {held_name(state)}"


def draw_gradcam(trained, val, picked, preds, labels, confidence, shown, path):
    """gradcam.png: the maps of the `picked` validation images (by index) for their predicted
    class, as the model sees the images (its preprocessing, without augmentation)."""
    images = val[picked][0] if picked else torch.zeros(0, 1, 1, 3, dtype=torch.uint8)
    x = trained.preprocess(images.to(trained.device))
    layer = cam_layer(trained.img_size)
    stage = getattr(trained.model, layer)
    cams = grad_cam(trained.model, stage, x, preds[picked].to(trained.device))
    plot_gradcam(
        images.numpy(),
        cams.cpu().numpy(),
        (labels[picked].tolist(), preds[picked].tolist(), confidence[picked].tolist()),
        shown,
        path,
        layer,
    )


OUTPUTS = (  # what evaluate.py writes into a figures folder (a report and comparisons besides)
    "fig1_loss.png",
    "fig2_val_accuracy.png",
    "fig5_confusion_matrix.png",
    "fig5_most_confused.png",
    "mistakes.png",
    "gradcam.png",
    "label_issues.png",
    "label_issues.csv",
    "copies.png",
    "per_class_metrics.csv",
    "metrics.json",
)
COMPARISON = (  # what a comparison writes
    "fig3_accuracy_vs_parameters.png",
    "fig4_validation_accuracy_curves.png",
    "comparison.md",
)


def figures_folder(args):
    """--figures, else the run's own (run_folder.run_figures)."""
    if args.figures:
        return Path(args.figures)
    return run_figures(resolve_checkpoint(args.ckpt).resolve().parent)


def owner(state, ckpt, folder):
    """Whose figures evaluate.py writes: the run (its id; a checkpoint made before runs had one:
    its folder), the checkpoint's name, and where it is, from the figures' folder."""
    path = resolve_checkpoint(ckpt).resolve()
    where = relative(path, Path(folder).resolve())
    return {
        "run": state.get("run_id") or str(Path(where).parent),
        "checkpoint": path.name,
        "from": where,
    }


def claim(figures, mine):
    """The figures folder (a Written) for `mine` (owner's). Where it holds the figures of another
    run, or of another checkpoint of this one, those files go, and a line says so: no figure of
    one stays beside the other's report. Only what evaluate.py wrote, as it wrote it, goes; a
    file changed since (a report holding prose of its own) is kept, renamed."""
    theirs = figures.owner
    if not theirs.get("run"):  # none, or a comparison's alone: nothing gives way
        return
    if (theirs["run"], theirs.get("checkpoint")) == (mine["run"], mine["checkpoint"]):
        return
    for name in list(figures.files):
        give_way(figures, name)
    earlier = theirs.get("from")
    if earlier == mine["from"]:  # the same file, of another run (the demo run again, say)
        earlier = f"an earlier run's {earlier}"
    elif theirs["run"] == mine["run"]:
        earlier = f"this run's {earlier}"
    log(f"{figures.folder}/: the figures and report of {earlier} give way to {mine['from']}'s")


def give_way(figures, name):
    """A file of the figures folder's earlier owner: removed where it is as evaluate.py wrote it
    (a report: but for what evaluate.py keeps when it writes one again), else set aside, said.
    A subfolder (a comparison's) goes once empty."""
    path = figures.folder / name
    if path.is_dir():  # a comparison's folder, as records listed it before they held its files
        for file in COMPARISON:  # figures as such a record trusts them; its words may be yours
            if (path / file).suffix == ".md" and (path / file).is_file():
                set_aside(
                    path / file, "may hold words of yours (an older record lists it unhashed)"
                )
            else:
                (path / file).unlink(missing_ok=True)
    elif path.is_file():
        why = None if figures.wrote(name) else why_changed(path)
        if why:
            set_aside(path, why)
        else:
            path.unlink()
    figures.forget(name)
    folder = path if path.is_dir() else path.parent
    if folder != figures.folder and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def why_changed(path):
    """Why a file evaluate.py wrote, changed since, is kept: a report, for what makes it the
    user's (why_kept: None where its change is none that counts), else for being changed."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        text = ""
    if MARK.search(text):
        return why_kept(text)
    return "was changed since evaluate.py wrote it"


@exits_on_problems
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    groups = args.compare or []
    if groups and args.report is None:  # the comparisons alone, each in figures/ its name
        for i, paths in enumerate(groups):
            runs = compare_runs(paths, args)
            folder, under = FIGURES / comparison_name(runs)[1], ""
            if args.figures:
                folder = Path(args.figures)
                under = f"comparison{i + 1}" if len(groups) > 1 else ""
            figures = Written(folder, "evaluate.py")
            write_comparison(runs, figures, under)
            figures.save()
        return
    trained = load_trained(args)
    state, folder = trained.state, figures_folder(args)
    checked = None
    if args.answers:  # read and checked before anything is written
        checked = test_answers(test_folder(args, state), args.answers, trained.classes)
    names = display_names(trained_data_root(args.data, state), trained.classes)
    mine = owner(state, args.ckpt, folder)
    figures = Written(folder, "evaluate.py")
    claim(figures, mine)
    metrics, history = evaluate_checkpoint(trained, args, figures, names)
    test = test_score_of(trained, args, checked) if args.answers else None
    if test:
        print(
            f"{args.ckpt} ({held_name(state)}): test accuracy {test.accuracy:.4f} "
            f"({test.correct}/{test.total}), "
            f"balanced {test.balanced:.4f}"
        )
        if copies := test_copies_line(state, checked.folder, checked.files, data=args.data):
            log(copies)
    if args.report is None:
        figures.save(**mine)
        return
    report = Path(args.report or folder / "report.md")
    comparisons = []
    for paths in groups:
        runs = compare_runs(paths, args, {resolve_checkpoint(args.ckpt).resolve(): test})
        title, key = comparison_name(runs)
        if key in [c["key"] for c in comparisons]:
            key = f"{key}{len(comparisons) + 1}"
        write_comparison(runs, figures, key)
        comparisons.append({"title": title, "key": key, "folder": folder / key, "runs": runs})
    defaults = vars(training_options().parse_args([]))
    evaluated = Evaluated(state, history, metrics, test, test_source(args, state, test, report))
    write_report(report, folder, evaluated, comparisons, names, defaults)
    if report.resolve().parent == folder.resolve():
        figures.note(report.name)
    figures.save(**mine)
    log(f"wrote {report}")


if __name__ == "__main__":
    main()
