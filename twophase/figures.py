"""The figures evaluate.py draws and the report shows, each sized to read at a page's width (about
7 inches): the training curves (from the steps, not only the epochs), validation accuracy, the
confusion matrix (and, above 30 classes, the 20 most confused classes alone), the most confident
mistakes, the labels the model disputes, copies across splits or labels, Grad-CAM, a comparison's
accuracy against size and curves, and the LR range test's curve. Class names are data: a $ in one
is drawn as it is (literal), not read as the start of a formula."""

import textwrap

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from twophase.checkpoint import best_acc, epoch_name  # noqa: E402

WIDE, TALL = 7.0, 4.2  # a figure at a page's width
MANY = 30  # classes above which the whole confusion matrix is unreadable at a page's width
MOST_CONFUSED = 20


def literal(name):
    """A class name as matplotlib draws it as it is: a $ escaped (it would open a formula)."""
    return str(name).replace("$", r"\$")


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def epoch_axis(ax, history):
    """Epochs on the x axis as the log and the report number them, each phase's from 1 (an
    epoch ends at its tick), and the end of Phase I marked where Phase II follows it."""
    ax.set_xlim(0, len(history) + 0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: phase_epoch(history, x)))
    ends = sum(r["phase"] == 1 for r in history)
    ax.set_xlabel("epoch of its phase")
    if 0 < ends < len(history):
        ax.axvline(ends, color="grey", linestyle="--", linewidth=1)
        ax.text(
            ends,
            1.01,
            " Phase I | Phase II ",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="grey",
        )
    elif history:
        ax.set_xlabel(f"epoch of Phase {'I' * history[0]['phase']}")
    ax.grid(alpha=0.3)


def phase_epoch(history, x):
    """The tick at `x` (the x-th epoch of the run) named as its phase names it."""
    index = int(round(x))
    if abs(x - index) > 1e-6 or not 1 <= index <= len(history):
        return ""
    return str(history[index - 1]["epoch"])


def loss_points(history):
    """(x, loss) of the training loss as it went: each epoch's curve of runs of steps (a run's
    point at its middle), or, for a record without one, the epoch's mean at its end."""
    xs, ys = [], []
    for e, record in enumerate(history):
        curve = record.get("train_loss_curve")
        curve = curve if isinstance(curve, list) and curve else None
        if curve is None:
            xs.append(e + 1)
            ys.append(record["train_loss"])
            continue
        xs += [e + (i + 0.5) / len(curve) for i in range(len(curve))]
        ys += curve
    return np.array(xs), np.array(ys, dtype=float)


def smoothed(values, weight=0.6):
    """An exponential moving average, as TensorBoard smooths a curve (NaN points skipped)."""
    out, last = [], None
    for v in values:
        if np.isfinite(v):
            last = v if last is None else weight * last + (1 - weight) * v
        out.append(last if last is not None else np.nan)
    return np.array(out)


def plot_loss(history, path):
    """Figure 1: the training loss over the steps, smoothed, and the validation loss at each
    epoch's end; whole epochs on the axis, the phase boundary marked."""
    xs, ys = loss_points(history)
    fig, ax = plt.subplots(figsize=(WIDE, TALL))
    ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=1)
    ax.plot(xs, smoothed(ys), color="tab:blue", label="training (over the steps, smoothed)")
    ends = np.arange(1, len(history) + 1)
    ax.plot(ends, [r["val_loss"] for r in history], "o--", color="tab:orange", label="validation")
    epoch_axis(ax, history)
    ax.set_ylabel("loss (label-smoothed cross-entropy)")
    losses = np.concatenate([ys, [r["val_loss"] for r in history]])
    losses = losses[np.isfinite(losses) & (losses > 0)]
    if len(losses) and losses.max() > 5 * np.median(losses):  # a spike would flatten the rest
        ax.set_yscale("log")
        ax.set_ylabel("loss (label-smoothed cross-entropy, log scale)")
    ax.legend(loc="best")
    save(fig, path)


def plot_val_accuracy(history, path, balanced=False, held=None):
    """Figure 2: validation accuracy at each epoch's end; the moving average's (--ema) and, where
    the classes are uneven (`balanced`), balanced accuracy beside it. `held`: what the
    checkpoint holds, (its epoch's index in `history`, its validation accuracy, its words),
    marked and named (an average of the last epochs at the last of them)."""
    ends = np.arange(1, len(history) + 1)
    fig, ax = plt.subplots(figsize=(WIDE, TALL))
    if any("ema_val_acc" in r for r in history):  # --ema: both
        ax.plot(ends, [r["val_acc"] for r in history], "o-", color="tab:green", label="weights")
        ema = [r.get("ema_val_acc", np.nan) for r in history]
        ax.plot(ends, ema, "o-", color="tab:purple", label="their moving average (--ema)")
    else:
        ax.plot(ends, [r["val_acc"] for r in history], "o-", color="tab:green", label="top-1")
    if balanced and all("val_balanced" in r for r in history):
        shown = [r["val_balanced"] for r in history]
        ax.plot(ends, shown, "s--", color="tab:red", label="balanced (the mean over classes)")
    if held is None:  # the best epoch
        index = max(range(len(history)), key=lambda i: best_acc(history[i]))
        held = (index, best_acc(history[index]), epoch_name(history[index]))
    index, acc, words = held
    ax.scatter(
        [index + 1], [acc], s=140, marker="*", color="black", zorder=3, label="the checkpoint"
    )
    edge = "right" if index >= 0.75 * len(history) else "center"  # inside the axes
    ax.annotate(
        f"{words}: {acc:.4f}",
        (index + 1, acc),
        textcoords="offset points",
        xytext=(4 if edge == "center" else -6, -16),
        ha=edge,
        fontsize=9,
    )
    epoch_axis(ax, history)
    ax.set_ylabel("validation accuracy")
    ax.legend(loc="lower right")
    save(fig, path)


def plot_confusion(counts, classes, path, title=None, side=None, totals=None):
    """The confusion matrix: each cell coloured by its share of its true class's images (of
    `totals`, each row's images, where the rows are a part of the whole matrix) and, at 20
    classes or fewer, its count written in (with the share, at 10 or fewer). Names legible at a
    page's width: level where few, slanted up to 20, and above 100 classes the classes' numbers
    (their rows in per_class_metrics.csv), the most confused alone then being a figure of their
    own."""
    counts = np.asarray(counts)
    n = len(classes)
    totals = counts.sum(axis=1, keepdims=True) if totals is None else np.asarray(totals)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    side = side or (9.0 if n > 100 else float(np.clip(0.14 * n + 3, 4.5, 22)))
    font = float(np.clip(420 / n, 3, 11))
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if n > 100:
        ticks = np.unique(np.linspace(0, n - 1, 11).round().astype(int))
        ax.set_xticks(ticks, [str(t + 1) for t in ticks])
        ax.set_yticks(ticks, [str(t + 1) for t in ticks])
        ax.set(xlabel="predicted class (its row in per_class_metrics.csv)", ylabel="true class")
    else:
        names = [literal(c) for c in classes]
        level = n <= 5 and max(map(len, names)) <= 12
        ax.set_xticks(range(n), names, rotation=0 if level else 45 if n <= 20 else 90,
                      ha="center" if level or n > 20 else "right", fontsize=font)  # fmt: skip
        ax.set_yticks(range(n), names, fontsize=font)
        ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(title or "confusion matrix: images, coloured by the share of their true class")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= MOST_CONFUSED:
        size = 12 if n <= 5 else 9 if n <= 10 else 7
        for t, p in zip(*np.nonzero(counts)):
            colour = "white" if shares[t, p] > 0.5 else "black"
            shown = str(int(counts[t, p]))
            if n <= 10:
                shown += f"\n{shares[t, p]:.0%}"
            ax.text(p, t, shown, ha="center", va="center", fontsize=size, color=colour)
    save(fig, path)


def most_confused_classes(counts, top=MOST_CONFUSED):
    """The `top` classes most often in a mistake, as the truth or as the guess, in class order."""
    off = counts - np.diag(np.diag(counts))
    involved = off.sum(axis=0) + off.sum(axis=1)
    order = np.argsort(-involved, kind="stable")[:top]
    return np.sort(order[involved[order] > 0])


def plot_most_confused(counts, classes, path):
    """Above MANY classes: the confusion matrix of the MOST_CONFUSED classes most often in a
    mistake, each cell's count written in and coloured by its share of all its true class's
    images, legible at a page's width."""
    chosen = most_confused_classes(counts)
    totals = counts.sum(axis=1, keepdims=True)[chosen]
    sub = counts[np.ix_(chosen, chosen)]
    title = f"the {len(chosen)} classes most often in a mistake\n"
    title += "(images; colour: the share of all the images of their true class)"
    plot_confusion(sub, [classes[i] for i in chosen], path, title, side=9, totals=totals)


def plot_gallery(images, titles, colours, path, title, maps=None, columns=6, groups=None):
    """Images in a grid, each with its title (and Grad-CAM's map over it, where `maps`); each of
    `groups` (how many images each holds, in order) starts a row of its own. The figure's title
    wrapped to its width: a gallery of one image is narrow."""
    groups = [g for g in (groups or [len(images)]) if g]
    columns = max(1, min(columns, max(groups, default=1)))
    places = [(row, k % columns) for row, g in enumerate_rows(groups, columns) for k in range(g)]
    rows = max(1, places[-1][0] + 1 if places else 1)
    width = max(2.1 * columns, 3.6)
    fig, axes = plt.subplots(rows, columns, figsize=(width, 2.5 * rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ((row, column), image) in enumerate(zip(places, images)):
        ax = axes[row, column]
        ax.imshow(image)
        if maps is not None:
            ax.imshow(
                maps[i], cmap="jet", alpha=0.45, extent=(0, image.shape[1], image.shape[0], 0)
            )
        ax.set_title(literal(titles[i]), fontsize=8, color=colours[i])
    if len(images) == 0:
        axes.flat[0].text(0.5, 0.5, "none", ha="center", va="center")
    fig.suptitle(textwrap.fill(title, int(width * 8)), fontsize=11)
    save(fig, path)


def enumerate_rows(groups, columns):
    """(the first row of each group, its size): a group of more than `columns` takes several."""
    row = 0
    for g in groups:
        for k in range(0, g, columns):
            yield row, min(columns, g - k)
            row += 1


def plot_mistakes(images, true, pred, confidence, classes, path):
    """The most confident mistakes: each image with its true class and the prediction."""
    shown = zip(true, pred, confidence)
    titles = [f"true: {classes[t]}\npred: {classes[p]} ({c:.2f})" for t, p, c in shown]
    plot_gallery(images, titles, ["black"] * len(images), path, "the most confident mistakes")


def plot_disputed(images, titles, path):
    """The labels the model disputes: each image with its given class and the model's, and the
    probability of each (twophase/label_issues.py)."""
    title = "labels the model disputes, the least likely first: candidates to look at"
    plot_gallery(images, titles, ["black"] * len(images), path, title)


def plot_copies(rows, titles, path, groups):
    """Copies side by side, a group a row: `rows` of images, `titles` of the same shape (each
    image's split and label), the first of `groups` groups that cross splits or labels."""
    shown = f"{groups} group{'s' * (groups != 1)}"
    shown = f"the first {len(rows)} of {shown}" if groups > len(rows) else shown
    title = f"copies across splits or labels, a group a row ({shown})"
    images = [image for row in rows for image in row]
    flat = [t for row in titles for t in row]
    columns = max((len(row) for row in rows), default=1)
    plot_gallery(
        images,
        flat,
        ["black"] * len(images),
        path,
        title,
        columns=columns,
        groups=[len(row) for row in rows],
    )


def plot_gradcam(images, cams, calls, classes, path, layer="layer4"):
    """Grad-CAM maps (of the stage `layer`) over their images: the most confident mistakes, in
    red, then correct predictions of as many classes; `calls`: each image's true class, predicted
    class and its probability."""
    true, pred, confidence = calls
    titles = [
        f"pred: {classes[p]} ({c:.2f})" + ("" if t == p else f"\ntrue: {classes[t]}")
        for t, p, c in zip(true, pred, confidence)
    ]
    colours = ["black" if t == p else "tab:red" for t, p in zip(true, pred)]
    title = f"where the model looks (Grad-CAM on {layer}): mistakes in red, then correct"
    wrong = sum(t != p for t, p in zip(true, pred))
    plot_gallery(images, titles, colours, path, title, maps=cams, groups=[wrong, len(true) - wrong])


def plot_size_comparison(runs, path):
    """Figure 3 of a comparison: each run's best validation accuracy against its size."""
    fig, ax = plt.subplots(figsize=(WIDE, 4.5))
    for r in runs:
        ax.scatter(r["params"] / 1e6, r["best_acc"], s=40)
        where = (r["params"] / 1e6, r["best_acc"])
        ax.annotate(
            literal(r["label"]), where, textcoords="offset points", xytext=(5, 5), fontsize=9
        )
    ax.margins(0.2)  # room for the labels
    ax.set(xlabel="parameters (millions)", ylabel="best validation accuracy")
    ax.grid(alpha=0.3)
    save(fig, path)


def plot_curves_comparison(runs, path):
    """Figure 4 of a comparison: each run's validation accuracy at each epoch's end."""
    fig, ax = plt.subplots(figsize=(WIDE, 4.5))
    for r in runs:
        ends = np.arange(1, len(r["history"]) + 1)
        ax.plot(
            ends, [best_acc(h) for h in r["history"]], "o-", label=literal(r["label"]), markersize=3
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set(xlabel="epoch", ylabel="validation accuracy")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, path)


def plot_range_test(curve, found, title, path):
    """The LR range test's curve (lr_find.py): each step's loss and the smoothed loss against the
    rate, on a log axis, and the suggested rate marked where there is one."""
    fig, ax = plt.subplots(figsize=(WIDE, TALL))
    ax.plot(curve.lrs, curve.losses, color="tab:blue", alpha=0.3, linewidth=1, label="each step")
    ax.plot(curve.lrs, curve.smoothed, color="tab:blue", label="smoothed")
    if found.lr is not None:
        loss = curve.smoothed[found.index]
        ax.axvline(found.lr, color="tab:red", linestyle="--", linewidth=1)
        ax.scatter([found.lr], [loss], s=60, color="tab:red", zorder=3)
        ax.annotate(
            f"valley: {found.lr:.2e}",
            (found.lr, loss),
            textcoords="offset points",
            xytext=(6, 8),
            fontsize=9,
            color="tab:red",
        )
    else:
        ax.text(0.02, 0.95, "no rate suggested", transform=ax.transAxes, va="top", fontsize=9)
    ax.set_xscale("log")
    smooth = [v for v in curve.smoothed if np.isfinite(v)]
    if smooth:  # to the smoothed curve's top: a diverged step's loss would flatten the rest
        low = min([*smooth, *(v for v in curve.losses if np.isfinite(v))])
        margin = 0.05 * (max(smooth) - low) + 1e-9
        ax.set_ylim(low - margin, max(smooth) + margin)
    ax.set(xlabel="learning rate (log scale)", ylabel="training loss", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left")
    save(fig, path)
