"""A run's options, resolved once and in one order into Options, which nothing changes afterwards:
- a fresh run: defaults < --demo < --recipe < the --epochs split < given;
- --resume PATH: PATH's saved options < given, in PATH's folder unless --out is given;
- --phase 2 with <out>/phase1.pt: phase1.pt's saved options < given: Phase II of that run;
- --resume auto, and torchrun's restarts: as --resume of the position in --out (cluster.py).
On a continued run, --recipe and the --epochs split apply again only if given again, and each
option that differs from the run's obeys its rule (options.py's table, continuing.py's rules):
applied, or refused here, before anything is read or written. The input normalisation the
weights were trained with is resolved here too.
"""

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

from data import labels_path
from model import normalisation_of
from twophase import cluster
from twophase import continuing as rules
from twophase.options import (
    DEMO,
    OPTIONS,
    PHASE_EPOCHS,
    RECIPES,
    bad_values,
    defaults,
    get_args_parser,
)
from twophase.start import Start
from utils import Problem, log


class Options(argparse.Namespace):
    """A run's resolved options, read as attributes (args.lr2) and saved as a dict (vars). Final:
    a change (the time budget's epochs) is a new Options, replaced()."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def __setattr__(self, name, value):
        raise AttributeError(f"the options are final: Options.replaced({name}=...) makes new ones")

    def replaced(self, **changes):
        return Options(**{**vars(self), **changes})


class Resolved(NamedTuple):
    """What resolving train.py's command line gives: the options, where the run starts and which
    options were given (the time budget plans around those)."""

    options: Options
    start: Start
    given: dict


def resolve(argv=None):
    """The run's options, resolved once and in one order (the module's docstring), and where it
    starts. A checkpoint saves exactly the options."""
    parser = get_args_parser(defaults=False)
    given = vars(parser.parse_args(argv))
    options = {**defaults(), **given}
    for problem in bad_values(options):
        parser.error(problem)
    resume, words = cluster.checkpoint_to_continue(options, given)  # --resume auto, restarts
    if resume is None and words:
        log(words)
    start = Start.of(resume, options["out"], options["phase"], options["weights"])
    start.typed = typed_command(argv)
    if start.fresh:
        options = fresh_options(options, given)
    else:
        saved = {**defaults(), **start.saved_options()}
        options = continued_options(saved, given, start) | given
        options |= rules.found_rates(saved, given)  # `auto` again: the rate found, no new test
    options["overwrite"] = given.get("overwrite", False)  # an order for this command alone
    options |= resolved_paths(options)
    refuse_files_as_folders(options)
    if not start.fresh:
        refused = rules.refused(OPTIONS, options, saved, start)
        if refused:
            raise Problem(
                f"these options cannot change in the run {start.path} continues:\n  "
                + "\n  ".join(refused)
            )
        cluster.continuing(start, options, words)
    if options["compile"] == "off":
        options["compile"] = None
    options |= resolved_normalisation(options, start)
    return Resolved(Options(**options), start, given)


def fresh_options(options, given):
    """defaults < --demo < --recipe < the --epochs split < given."""
    resolved = {**options, **(DEMO if options["demo"] else {})}
    resolved |= RECIPES.get(options["recipe"], {})  # its own levers: the rest are the defaults
    if options["epochs"]:
        resolved |= split_budget(
            options["epochs"], {k: given[k] for k in PHASE_EPOCHS if k in given}
        )
    return resolved | given


def continued_options(saved, given, start):
    """A continued run's options before those given: the saved ones, in the checkpoint's folder,
    on its dataset (where it was, if --data was relative and the command runs elsewhere), with
    --recipe's preset and the --epochs split done again where given. A new budget keeps the
    Phase I epochs a run has done once it is past Phase I."""
    options = {**saved, "resume": given.get("resume"), "out": str(start.path.parent)}
    where = start.state.get("data")
    if where and not Path(saved["data"]).is_dir() and Path(where).is_dir():
        options["data"] = where
    phase_option = given.get("phase", saved["phase"])
    if "epochs" in given:
        kept = {k: given[k] for k in PHASE_EPOCHS if k in given}
        if start.phase1_end(phase_option, given.get("epochs1", saved["epochs1"])):
            kept.setdefault("epochs1", saved["epochs1"])
        options |= split_budget(given["epochs"], kept)
    if "recipe" in given:
        levers = switched_recipe(saved, given["recipe"])
        ended = start.phase1_end(phase_option, given.get("epochs1", options["epochs1"]))
        if ended:
            levers = keep_phase1(levers, saved, given["recipe"], ended)
        options |= levers
    return options


def switched_recipe(saved, recipe):
    """--recipe given to a continued run, as on a fresh run given the run's options and it: its
    levers, and the levers of the run's own recipe that it does not set back at what a fresh run
    has without them (the demo's values, or the defaults). An option whose value is not what the
    run's recipe made it was given when the run started, and stays, as given options win."""
    levers, before = RECIPES.get(recipe, {}), RECIPES.get(saved.get("recipe", "report"), {})
    base = {**defaults(), **(DEMO if saved.get("demo") else {})}
    values = {}
    for key in before.keys() | levers.keys():
        if saved.get(key) == before.get(key, base[key]):  # the recipe's (or no one's) value
            values[key] = levers.get(key, base[key])
    return values


def keep_phase1(levers, saved, recipe, ended):
    """A recipe's values less its Phase I levers (fast's --lr1), which keep the run's once its
    Phase I is over (`ended`, Start.phase1_end's words): they would change nothing, and given
    alone they are refused there."""
    phase1 = {o.dest for o in OPTIONS if o.rule in (rules.phase1_only, rules.phase1_rate)}
    kept = {k: v for k, v in levers.items() if k in phase1 and v != saved.get(k)}
    for key, value in kept.items():
        log(
            f"--recipe {recipe}: its --{key.replace('_', '-')} {value} is for Phase I, and Phase I "
            f"of this run {ended}; it keeps {saved.get(key)}"
        )
    return {k: v for k, v in levers.items() if k not in kept}


def typed_command(argv):
    """The command line as the user typed it: the script and its paths as given (relative stay
    relative), under the launcher that ran it (torchrun's process count where it did)."""
    typed = argv is None and sys.argv[0].endswith(".py")
    script = sys.argv[0] if typed else "train.py"
    words = sys.argv[1:] if argv is None else [str(word) for word in argv]
    per_node = os.environ.get("LOCAL_WORLD_SIZE")
    launcher = f"torchrun --nproc-per-node {per_node}" if per_node else "python"
    return " ".join([launcher, script, shlex.join(words)]).strip()


def resolved_paths(options):
    """The files a run reads its labels and class weights from, as absolute paths (they are
    saved; evaluate.py and predict.py read them again from anywhere), checked to exist."""
    found = {}
    for option in OPTIONS:
        value = options[option.dest]
        if not option.file or value in (None, "auto", "none"):
            continue
        try:
            found[option.dest] = str(labels_path(value, options["data"]).resolve())
        except Problem:
            if option.dest == "class_weights":
                raise Problem(f"--class-weights {value}: not auto, none, nor a file") from None
            raise
    return found


def refuse_files_as_folders(options):
    """The folders the run writes in (--out, --cache-dir, --tensorboard) are made where absent:
    a file there is refused now, naming it, rather than as the first file is written."""
    for option in OPTIONS:
        value = options[option.dest]
        if option.folder and value and Path(value).exists() and not Path(value).is_dir():
            raise Problem(
                f"{option.flag} {value}: a file is there, not a folder; give a folder (it is made "
                "where there is none)"
            )


def resolved_normalisation(options, start):
    """The input normalisation, unless given: a continued run's own, else the weights' (their
    training's: ImageNet's for torchvision's, or a checkpoint's)."""
    if options["mean"] and options["std"]:
        return {}
    if start.fresh:
        mean, std = normalisation_of(options["weights"])
    else:
        mean, std = start.state.get("mean"), start.state.get("std")
    return {"mean": options["mean"] or list(mean), "std": options["std"] or list(std)}


def split_budget(total, kept=None):
    """The report's 10 + 125 epochs (5 of them warmup) scaled to a budget of `total`: Phase I's
    share rounded (at least one epoch), the warmup's share of Phase II rounded, then one cosine
    decay over the rest. `kept`: the ones given explicitly, which hold; the rest of the budget is
    divided around them (`--epochs 8 --epochs1 2` is 2 + 6). Rounding each share keeps the phases
    in the report's proportions; a short budget that took 2 + 6 with a warmup epoch (its minimums)
    spent a quarter of itself on the head alone."""
    kept = kept or {}
    epochs1 = kept.get("epochs1")
    if epochs1 is None:
        given2 = kept.get("epochs2")
        epochs1 = total - given2 if given2 is not None else max(1, round(total * 10 / 135))
    epochs2 = kept.get("epochs2", total - epochs1)
    if epochs1 + epochs2 != total or min(epochs1, epochs2) < 0:
        raise Problem(
            f"--epochs {total}: --epochs1 {epochs1} and --epochs2 {epochs2} do not make it up"
        )
    warmup = kept.get("warmup_epochs", round(epochs2 * 5 / 125))
    cosine = kept.get("cosine_epochs", max(1, epochs2 - warmup))
    return dict(epochs1=epochs1, epochs2=epochs2, warmup_epochs=warmup, cosine_epochs=cosine)
