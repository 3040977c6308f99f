"""--tensorboard: a run's curves in TensorBoard's event files."""

from pathlib import Path

from utils import Problem


class Board:
    """--tensorboard: the run's curves in TensorBoard's event files (torch.utils.tensorboard), by
    the first process alone, every scalar at the run's optimizer step: each epoch's losses,
    accuracies (top-5, the moving average's), learning rate and images/s, and the training loss
    every --tensorboard-every steps. A resumed run's writer purges what a run stopped after its
    last checkpoint had written beyond it, so curves go on and are never drawn twice. The run's
    folder holds its event files; a DIR given holds a folder per run, named as the run's. The
    writer opens at the first scalar: a run that fails before it trains writes nothing."""

    def __init__(self, folder, first_step):
        self.folder, self.first_step, self.opened = folder, first_step, None

    @classmethod
    def of(cls, args, run_folder, first_step):
        if args.tensorboard is None:
            return None
        folder = (
            Path(args.tensorboard) / Path(run_folder).resolve().name
            if args.tensorboard
            else run_folder
        )
        return cls(folder, first_step)

    @property
    def writer(self):
        if self.opened is None:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (--tensorboard only)

            self.opened = SummaryWriter(str(self.folder), purge_step=self.first_step, flush_secs=20)
        return self.opened

    def step_loss(self, step, loss):
        self.writer.add_scalar("train/loss_per_step", float(loss), step)

    def epoch(self, record, step):
        scalars = {
            "train/loss": record["train_loss"],
            "train/accuracy": record["train_acc"],
            "val/loss": record["val_loss"],
            "val/accuracy": record["val_acc"],
            "val/top5": record["val_top5"],
            "val/ema_accuracy": record.get("ema_val_acc"),
            "lr": record["lr"],
            "images_per_s": record["images_per_s"],
            "phase": record["phase"],
        }
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def close(self):
        if self.opened is not None:
            self.opened.close()


def require_tensorboard():
    """A Problem with the way on where --tensorboard is asked for without the package."""
    try:
        import tensorboard  # noqa: F401, PLC0415
    except ImportError:
        raise Problem(
            "--tensorboard needs the tensorboard package, which this project does not require: "
            "pip install tensorboard (then: tensorboard --logdir checkpoints)"
        ) from None
