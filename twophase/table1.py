"""Table 1 as a run used it, read from its checkpoint (not from today's defaults): no row of what
it did not do, the levers it switched on; and the command that ran it, as typed (or, for a
checkpoint that predates that record, the options that differ from the defaults)."""

import shlex

from twophase.markdown import cell, shown_path
from twophase.options import DEMO, RECIPES
from twophase.resolve import split_budget


def table1(state, folder, history=None):
    """The method's hyperparameters as this run had them, in the report's Table 1 layout: no row
    of what the run did not do (a phase it did not train, a warmup of none, periodic checkpoints
    it never kept). Paths as `folder`, the report's, sees them; `history`: the whole run's (by
    default the checkpoint's own)."""
    a = state["args"]
    history = state.get("history", []) if history is None else history
    trained = {p: sum(r["phase"] == p for r in history) for p in (1, 2)}
    cpu = state.get("device", "cuda") != "cuda"
    amp = (
        "off (float32 on the CPU)" if cpu else {"off": "off"}.get(a["amp"], f"{a['amp']} autocast")
    )
    steps = f" x {a['accum_steps']} accumulated" if a.get("accum_steps", 1) > 1 else ""
    rows = [
        ("Training", "batch size", f"{a['batch_size']}{steps}", "both"),
        ("Training", "Phase I epochs", epochs_done(trained[1], a["epochs1"]), "I"),
        ("Training", "Phase II epochs", epochs_done(trained[2], a["epochs2"]), "II"),
        ("Training", "mixed precision", amp, "both"),
    ]
    if trained[1]:
        rows += [
            ("Optimizer", "Phase I", f"AdamW, lr {rate(a, 'lr1')} constant, wd {a['wd1']:g}", "I"),
            ("Optimizer", "batch norm in Phase I", "frozen" if a["freeze_bn"] else "adapts", "I"),
        ]
    if trained[2]:
        rows += phase2_rows(a, history)
    rows += [("Loss", "label smoothing", a["label_smoothing"], "both"), *augmentation_rows(a)]
    weights = (
        a["weights"] if a["weights"] in ("imagenet", "none") else shown_path(a["weights"], folder)
    )
    rows += [
        ("Data", "classes", f"{len(state['classes'])}, {counts_of(state)}", "both"),
        ("Data", "square images by", a.get("resize", "crop"), "all"),
        ("Model", "architecture", state["arch"], "both"),
        ("Model", "input resolution", f"{state['img_size']}x{state['img_size']}", "both"),
        ("Model", "pretrained weights", weights, "both"),
        *levers(a),
    ]
    lines = ["| category | parameter | value | phase |", "| --- | --- | --- | --- |"]
    return lines + [f"| {c} | {p} | {cell(v)} | {ph} |" for c, p, v, ph in rows]


def epochs_done(done, planned):
    """A phase's epochs as the run trained them: all, some of those planned, or none (skipped:
    none were planned)."""
    if not planned:
        return "0 (skipped)"
    return str(done) if done == planned else f"{done} of {planned}"


def phase2_rows(a, history):
    """Table 1's Phase II rows: its optimizer, its learning rate as it went (a warmup only where
    there was one), its clip, the periodic checkpoints it kept (none: no row)."""
    warmup = a["warmup_epochs"]
    lr2 = f"{rate(a, 'lr2')} -> {a['min_lr']:g}: "
    if warmup:
        lr2 += f"linear warmup from {a['warmup_start']:g}x over {warmup} epoch(s), then "
    lr2 += f"cosine with half-period {a['cosine_epochs']}"
    rows = [
        ("Optimizer", "Phase II", f"{a['optimizer2']}, {phase2_decay(a)}", "II"),
        ("Optimizer", "Phase II learning rate", lr2, "II"),
        ("Training", "gradient clip (L2 norm)", a["clip"] or "none", "II"),
    ]
    every = a.get("save_every") or 0
    kept = [
        r["epoch"]
        for r in history
        if every and r["phase"] == 2 and r["epoch"] % every == 0
        and r["val_acc"] >= a["save_min_acc"]
    ]  # fmt: skip
    if kept:
        saved = f"phase 2 epochs {', '.join(map(str, kept))} (every {every} if val acc >= "
        rows.append(("Training", "periodic checkpoints", saved + f"{a['save_min_acc']})", "II"))
    return rows


def phase2_decay(a):
    """Phase II's weight decay: all of it, or with L2-SP the new head's alone."""
    if a.get("l2sp"):
        return f"wd {a['wd2']:g} on the new head; the backbone pulled towards its start (L2-SP)"
    return f"wd {a['wd2']:g}"


def rate(a, key):
    """A phase's learning rate as Table 1 gives it, and where the LR range test found it (--lr1
    auto, --lr2 auto), that it did."""
    value = a[key]
    if value == "auto":  # its phase never began
        return "auto"
    if key in (a.get("lr_unfound") or ()):
        return f"{value:g} (the LR range test suggested none: the rate without auto)"
    if (a.get("lr_found") or {}).get(key) == value:
        return f"{value:.3g} (the LR range test's, valley rule)"
    return f"{value:g}"


def augmentation_rows(a):
    jitter = f"{a['jitter']:g} (hue {a['hue']:g}), p {a['p_jitter']:g}"
    blur = f"3x3, sigma {a['blur_sigma'][0]:g}-{a['blur_sigma'][1]:g}, p {a['p_blur']:g}"
    flips = f"horizontal p {a['p_hflip']:g}, vertical p {a['p_vflip']:g}"
    return [
        ("Augmentation", "rotation", f"+-{a['degrees']:g} deg", "train"),
        ("Augmentation", "translation", f"+-{a['translate']:.0%}", "train"),
        ("Augmentation", "scale", f"{a['scale'][0]:g}-{a['scale'][1]:g}", "train"),
        ("Augmentation", "shear", f"+-{a['shear']:g} deg", "train"),
        ("Augmentation", "colour jitter", jitter, "train"),
        ("Augmentation", "Gaussian blur", blur, "train"),
        ("Augmentation", "flips", flips, "train"),
    ]


def levers(a):
    """Table 1's rows for the options beyond the report that the run switched on (--recipe best
    switches several), after the recipe's own row."""
    rows = [("Levers", "recipe", a.get("recipe", "report"), "")]
    on = [
        ("moving average of the weights (EMA)", a.get("ema"), f"decay {a.get('ema')}", "both"),
        ("layer-wise lr decay", a.get("lr_decay", 1) != 1, f"x{a.get('lr_decay')} a stage", "II"),
        ("class weights", a.get("class_weights", "none") != "none", a.get("class_weights"), "both"),
        ("batches", a.get("sampler") == "balanced", "balanced: each class equally often", "both"),
        ("MixUp", a.get("mixup"), f"alpha {a.get('mixup')}", "II"),
        ("CutMix", a.get("cutmix"), f"alpha {a.get('cutmix')}", "II"),
        (
            "weight averaging",
            a.get("average_last"),
            f"the last {a.get('average_last')} Phase II epochs, if it validates better",
            "result",
        ),
        (
            "test-time augmentation",
            a.get("tta") == "auto",
            "horizontal flip, if it validates better",
            "result",
        ),
        (
            "progressive resizing",
            a.get("progressive", 1) < 1,
            f"from {a.get('progressive')} of the size, full after "
            f"{a.get('progressive_until')} of the epochs",
            "II",
        ),
        (
            "L2-SP",
            a.get("l2sp"),
            f"alpha {a.get('l2sp')}: the backbone towards the weights it started from",
            "II",
        ),
        ("sharpness-aware steps (SAM)", a.get("sam"), f"rho {a.get('sam')}", "II"),
        (
            "Phase I from cached features",
            a.get("phase1_features"),
            f"{a.get('phase1_features')} pass(es) of the frozen backbone",
            "I",
        ),
        (
            "copies left out of validation",
            a.get("drop_copies"),
            "the validation images that are copies of training images (--drop-copies)",
            "both",
        ),
        (
            "test size",
            a.get("test_size") == "auto",
            "the size (and batch norm) that validates best, of three",
            "result",
        ),
    ]

    return rows + [("Levers", name, value, phase) for name, used, value, phase in on if used]


def command_of(state, defaults, folder=None):
    """The train.py command line of a run: --demo and --recipe if it used them, then the options
    that differ from what the defaults, those presets and the --epochs split make of them; with
    `folder`, an absolute path as shown_path shows it from there."""
    if state.get("command") and "lr1" not in state["args"]:  # trained elsewhere: its own
        return state["command"]
    args, parts = state["args"], ["python train.py"]
    implied = {**defaults, **(DEMO if args.get("demo") else {})}
    implied |= RECIPES.get(args.get("recipe", "report"), {})
    if args.get("epochs"):
        implied |= split_budget(args["epochs"])
    if args.get("demo"):
        parts.append("--demo")
    skip = {"resume", "overwrite", "cache_workers", "device", "demo", "mean", "std"}
    for key, value in args.items():
        if key in skip or key not in defaults or value == implied[key] or value is None:
            continue
        if value is True:
            parts.append(f"--{key.replace('_', '-')}")
        elif value is not False:
            values = value if isinstance(value, list) else [value]
            if folder is not None and key in PATHS:
                values = [shown_path(v, folder) for v in values]
            parts.append(
                f"--{key.replace('_', '-')} " + " ".join(shlex.quote(str(v)) for v in values)
            )
    return " ".join(parts)


def command_lines(state, defaults, folder):
    """The command that ran the run, as typed, to run again from the folder it was run in (where
    the checkpoint predates that record: the options that differ from the defaults)."""
    if state.get("command"):
        return [f"Command, as typed, in the folder it was run in: `{state['command']}`"]
    command = command_of(state, defaults, folder)
    return [f"Command (the options that differ from the defaults): `{command}`"]


PATHS = {"data", "labels", "val_labels", "class_weights", "weights", "out", "cache_dir"}


def counts_of(state):
    """The training images per class, in words: how uneven the classes are."""
    counts = state.get("class_counts")
    if not counts:
        return "training images per class not recorded"
    low, high = min(counts), max(counts)
    return f"{low} to {high} training images each" if low != high else f"{low} training images each"
