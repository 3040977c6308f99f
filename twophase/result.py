"""The run's result, once its last epoch is done: which model best.pt holds (the best epoch's, or
the average of the last ones with --average-last), and what evaluate.py and predict.py test it
with (the size, and batch norm there, with --test-size auto; test-time flips with --tta auto),
each chosen on the validation images."""

from data import resized
from model import model_from_checkpoint, weights_kind
from twophase.augment import BatchPreprocess
from twophase.checkpoint import (
    AVERAGED_PT,
    BEST_PT,
    LAST_PT,
    averaged_checkpoint,
    epoch_file,
    epochs_name,
    load_checkpoint,
)
from twophase.inference import averaged_model, bn_loader, count_correct, update_bn
from twophase.loader import make_loader
from twophase.schedule import size_step
from utils import log, wait_for_others


def select_result(run):
    """Which model best.pt holds, once the last epoch is done: with --average-last, the average
    of the last K Phase II epochs (written as averaged.pt) replaces the best epoch if it validates
    better; with --test-size auto, best.pt is marked with the test size (and batch norm) that
    validates best; with --tta auto, with whether horizontal-flip test-time augmentation
    validates better. The first process alone (the epoch files are its), on the whole validation
    split; the others wait (for up to utils.LONG_WAIT, however short --dist-timeout is). A run
    stopped here does it again when resumed, with the same result."""
    args = run.args
    if run.rank == 0 and run.history and len(run.splits.val):
        if args.average_last:
            average_last_epochs(run, validation_loader(run, args.img_size))
        if args.test_size == "auto":
            choose_test_size(run)
        if args.tta == "auto":
            mark_tta(run)
    wait_for_others("the first process to choose the run's result")


def validation_loader(run, side):
    """The validation images at `side` px: the run's own, or, at another size, from a cache of
    their own made from their files (as predict.py would see the test images at that size)."""
    args, cuda = run.args, run.device.type == "cuda"
    images = run.splits.val
    if side != args.img_size:
        images = resized(images, side, args.resize, args.cache_dir, args.cache_workers)
    return make_loader(images, 2 * args.batch_size, shuffle=False, pin_memory=cuda)


def choose_test_size(run):
    """--test-size auto (FixRes, Touvron et al. 2019): best.pt validated at --img-size and two
    steps larger, with its batch norm statistics as trained and, at the larger sizes, measured
    again there (on the training images, upsampled, not augmented); best.pt is marked with the
    size that validates best (`test_size`, its statistics replaced where measured again wins)
    and evaluate.py and predict.py follow the mark. Ties keep the training size."""
    args, device, best_path = run.args, run.device, run.saver.folder.path / BEST_PT
    if not best_path.is_file():
        log(f"--test-size auto: no {best_path} to mark")
        return
    state = load_checkpoint(best_path)
    step = size_step(args.img_size)
    results, chosen = [], None
    for side in (args.img_size, args.img_size + step, args.img_size + 2 * step):
        val = validation_loader(run, side)
        options = [("as trained", None)]
        if side != args.img_size:
            options.append(("measured again", side))
        for how, measured in options:
            net = model_from_checkpoint(state, device)
            if measured:
                resample = BatchPreprocess(args.mean, args.std).to(device)
                resample.size = side
                train = bn_loader(run.splits.train, args.batch_size, args.seed, device)
                update_bn(net, train, resample, device)
                net.eval()
            correct, seen = count_correct(net, val, run.eval_preprocess, device, run.dtype)
            results.append(f"{side} px, batch norm {how}: {correct / seen:.4f}")
            if chosen is None or correct > chosen[0]:
                chosen = (correct, side, how, net if measured else None)
    correct, side, how, measured_net = chosen
    state["test_size"] = side
    state.pop("test_bn", None)
    if measured_net is not None:  # beside the weights' own: kept for testing at that size
        measured = measured_net.state_dict()
        state["test_bn"] = {k: measured[k].cpu() for k, _ in measured_net.named_buffers()}
        state["test_bn_of"] = weights_kind(state)
    run.saver.folder.save(state, [BEST_PT], run.history)
    log(
        f"--test-size auto: best.pt validated at {'; '.join(results)} -> {side} px, batch norm "
        f"{how}: evaluate.py and predict.py use it"
    )


def average_last_epochs(run, val):
    args, device, folder = run.args, run.device, run.saver.folder
    epochs = [n for n, r in enumerate(run.history, 1) if r["phase"] == 2][-args.average_last :]
    records = [run.history[n - 1] for n in epochs]
    paths = [folder.path / epoch_file(n) for n in epochs]
    missing = no_average(args.average_last, records, paths, folder.path)
    if missing:
        log(missing)
        return
    states = [load_checkpoint(p) for p in paths]
    train = bn_loader(run.splits.train, args.batch_size, args.seed, device)
    net = averaged_model(states, device, train, run.eval_preprocess)
    correct, seen = count_correct(net, val, run.eval_preprocess, device, run.dtype)
    acc, best = correct / seen, run.best_so_far()
    names = [AVERAGED_PT] + ([BEST_PT] if acc > best else [])
    state = averaged_checkpoint(states[-1], net.state_dict(), paths, acc)
    folder.save(state, names, run.history)
    if BEST_PT in names:
        run.averaged = (records, acc)
    log(
        f"the average of {epochs_name(records)} ({paths[0].name} to {paths[-1].name}): val acc "
        f"{acc:.4f} ({correct}/{seen}), "
        f"the best epoch's {best:.4f} -> {' and '.join(str(folder.path / n) for n in names)}"
    )


def no_average(k, epochs, paths, folder):
    """Why the last `k` Phase II epochs (`epochs`: their records, `paths`: their files) cannot be
    averaged, and what to do; None where they can. A run keeps the epochs' files that
    --keep-last and --average-last asked for as each epoch ended: a larger K given to a continued
    run finds fewer kept until it has trained as many epochs again."""
    said = f"--average-last {k}: "
    if len(epochs) < 2:
        return (
            f"{said}the run has {len(epochs)} Phase II epoch{'s' * (len(epochs) != 1)}, and an "
            f"average needs 2: no average; train more (--resume {folder / LAST_PT} --epochs2 N)"
        )
    kept = [p for p in paths if p.is_file()]
    if len(kept) == len(paths):
        return None
    names = ", ".join(p.name for p in kept) or "none"
    said += (
        f"of the last {len(epochs)} Phase II epochs ({epochs_name(epochs)}), {len(kept)} "
        f"are kept in {folder} ({names}): the run kept fewer as they ended. No average"
    )
    if len(kept) >= 2 and kept == paths[-len(kept) :]:
        return f"{said}; --average-last {len(kept)} averages the {len(kept)} kept"
    if len(kept) >= 2:
        return f"{said}; python -m twophase.average averages the files kept"
    return f"{said}; train on with --average-last {k}, which keeps them from here on"


def mark_tta(run):
    if not (
        run.saver.folder.path / BEST_PT
    ).is_file():  # resumed into another folder, no epoch better
        log(f"--tta auto: no {run.saver.folder.path / BEST_PT} to mark")
        return
    state = load_checkpoint(run.saver.folder.path / BEST_PT)
    side = state.get("test_size", run.args.img_size)
    net = model_from_checkpoint(state, run.device, side=side)
    val = validation_loader(run, side)
    plain, seen = count_correct(net, val, run.eval_preprocess, run.device, run.dtype)
    flipped, _ = count_correct(net, val, run.eval_preprocess, run.device, run.dtype, tta=True)
    state["tta"] = flipped > plain
    run.saver.folder.save(state, [BEST_PT], run.history)
    log(
        f"best.pt with horizontal-flip test-time augmentation: val acc {flipped / seen:.4f}, "
        f"without: {plain / seen:.4f} -> evaluate.py and predict.py use it "
        + ("by default" if state["tta"] else "only with --tta")
    )
