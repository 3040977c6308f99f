"""Average the weights of several checkpoints of one run into one model (SWA's average, timm's
avg_checkpoints.py), then recompute its batch norm statistics on the training images.

    python train.py ... --keep-last 5                 # keeps checkpoints/epoch*.pt, the last 5
    python -m twophase.average checkpoints/epoch*.pt --out checkpoints/averaged.pt
    python -m twophase.average checkpoints/phase2_epoch*.pt --out checkpoints/averaged.pt
    python evaluate.py --ckpt averaged.pt             # like any checkpoint; predict.py too

Each checkpoint contributes the weights it is evaluated with (its moving average where --ema made
that the better). Batch norm's running statistics of an average are not the average of the
statistics, so they are measured anew, as torch.optim.swa_utils.update_bn does: one pass over
the training images in shuffled batches (without augmentation), each weighted equally. The
result has no parameters the model did not have; it keeps the last checkpoint's run record.
A file named twice (a.pt and ./a.pt, or a link to it) is averaged once, with a line saying so.
"""

import argparse
import os
from pathlib import Path

from data import cache_splits, dataset_of, trained_data_root
from model import count_parameters
from twophase.augment import BatchPreprocess
from twophase.checkpoint import (
    averaged_checkpoint,
    load_checkpoint,
    peek,
    resolve_checkpoint,
    save_checkpoint,
)
from twophase.checks import at_least, checked
from twophase.inference import averaged_model, bn_loader
from twophase.written import HIDDEN, Written
from utils import Problem, exits_on_problems, log, pick_device


def get_args_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoints", nargs="+", help="checkpoints of one run")
    p.add_argument("--out", required=True, help="where to write the averaged checkpoint")
    p.add_argument("--data", default=None, help="dataset root (default: the run's)")
    p.add_argument(
        "--batch-size", type=checked(int, at_least(1)), default=128, help="for the batch norm pass"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument(
        "--no-bn-update", action="store_true", help="keep the averaged statistics as they are"
    )
    return p


BY = "twophase.average"


def refuse_to_replace(out):
    """An average replaces only an average (this tool's, as it wrote it: its record says, or
    train.py --average-last's): --out naming a run's other checkpoint (its best.pt, an epoch's),
    a file of the user's or one changed since is refused, before any work."""
    if not out.exists() and not out.is_symlink():
        return
    saved = peek(out) if out.is_file() else None
    if not (saved and saved.get("averaged")):
        what = "a checkpoint that is not an average" if saved else "not a checkpoint"
        raise Problem(
            f"--out {out} holds {what}: an average replaces only an average; name another --out"
        )
    record = Written(out.parent, BY, HIDDEN)
    if record.foreign:  # a file of the user's took the record's name: what is whose is unknown
        raise Problem(f"--out {out}: {record.path} is no record of {BY}'s; name another --out")
    if out.name in record.files and not record.wrote(out.name):
        raise Problem(f"--out {out} was changed since {BY} wrote it: name another --out")


@exits_on_problems
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    refuse_to_replace(Path(args.out))
    paths = sorted(distinct_files(args.checkpoints))
    states = [load_checkpoint(p) for p in paths]
    last = states[-1]
    if len({(s["arch"], tuple(s["classes"])) for s in states}) > 1:
        raise SystemExit("the checkpoints are of different architectures or classes")
    device = pick_device(args.device)
    saved, loader = last["args"], None
    if not args.no_bn_update:
        root = trained_data_root(args.data, last)
        splits = cache_splits(
            dataset_of(saved, root, classes=last["classes"]),
            last["img_size"],
            resize=saved.get("resize", "crop"),
            cache_dir=saved.get("cache_dir"),
            val_fraction=saved.get("val_fraction", 0.1),
            seed=saved.get("seed", 0),
        )
        # Shuffled, as training's: batches of one class each would leave the spread between the
        # classes out of the variances.
        loader = bn_loader(splits.train, args.batch_size, saved.get("seed", 0), device)
    preprocess = BatchPreprocess(last["mean"], last["std"]).to(device)
    model = averaged_model(states, device, loader, preprocess)
    save_checkpoint(averaged_checkpoint(last, model.state_dict(), paths), args.out)
    record = Written(Path(args.out).parent, BY, HIDDEN)
    record.note(Path(args.out).name)
    record.save()
    log(
        f"averaged {len(paths)} checkpoints ({count_parameters(model.parameters()):,} parameters)"
        + ("" if args.no_bn_update else ", batch norm statistics measured on the training images")
        + f" -> {args.out}"
    )
    return Path(args.out)


def distinct_files(paths):
    """The checkpoints, each file once however it is named (./a.pt and a.pt, a link to it): the
    first name given stands for it, and each other is said. Twice in the mean would weigh it
    double."""
    first, kept = {}, []
    for path in paths:
        st = os.stat(resolve_checkpoint(path))
        file = (st.st_dev, st.st_ino)
        if file in first:
            log(f"{path} is {first[file]}, given again: averaged once")
        else:
            first[file] = path
            kept.append(path)
    return kept


if __name__ == "__main__":
    main()
