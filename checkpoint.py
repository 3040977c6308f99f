"""The checkpoint format: what a checkpoint dict of this project holds, built in one place."""


def averaged_checkpoint(last, weights, sources, val_acc=None):
    """The checkpoint of an average of `sources` (paths): the last one's run record with the
    averaged `weights` (on the CPU), no moving average and nothing to resume from."""
    return {
        **last,
        "model": {k: v.detach().cpu() for k, v in weights.items()},
        "ema": None,
        "eval_weights": "model",
        "optimizer": None,
        "scheduler": None,
        "scaler": None,
        "averaged": [str(p) for p in sources],
        "val_acc": val_acc,
    }
