"""An epoch's running record, kept on the device as it trains: each batch's mean loss, its correct
predictions and its images, summed over the processes at its end; a run stopped mid-epoch saves
it and goes on from it."""

from dataclasses import dataclass, field

import torch

from utils import sum_over_processes, totals_dtype

CURVE_POINTS = 20  # an epoch's training loss, as the report's Figure 1 draws it: points an epoch


@dataclass
class EpochTally:
    """An epoch's running record, kept on the device: each batch's mean loss, its correct
    predictions and its images. A run stopped mid-epoch saves it and goes on from it."""

    losses: list = field(default_factory=list)
    hits: list = field(default_factory=list)
    sizes: list = field(default_factory=list)

    @classmethod
    def restored(cls, partial, device):
        losses = list(partial["losses"].to(device).unbind())
        return cls(losses, list(partial["hits"].to(device).unbind()), list(partial["sizes"]))

    @property
    def batches(self):
        return len(self.sizes)

    def add(self, loss, logits, labels):
        self.losses.append(loss.detach())
        self.hits.append((logits.argmax(1) == labels).sum())
        self.sizes.append(len(labels))

    def saved(self, seconds):
        """As a checkpoint holds it (its `progress`, one per process)."""
        losses, hits = (torch.stack(kept).cpu() for kept in (self.losses, self.hits))
        return {"losses": losses, "hits": hits, "sizes": list(self.sizes), "seconds": seconds}

    def summary(self, device):
        """The epoch's training loss (over batches with a finite loss) and accuracy, summed over
        every process; batches whose loss was not finite are counted apart."""
        totals = epoch_totals(self.losses, self.hits, self.sizes, device)
        loss_sum, counted, correct, nonfinite, seen, batches = sum_over_processes(
            *totals, sum(self.sizes), self.batches
        )
        return {
            "train_loss": loss_sum / counted if counted else float("nan"),
            "train_acc": correct / seen,
            "images": seen,
            "nonfinite": int(nonfinite),
            "batches": int(batches),
            "train_loss_curve": self.curve(),
        }

    def curve(self, points=CURVE_POINTS):
        """The epoch's training loss as it went: the mean of the finite losses of each of up to
        `points` runs of consecutive batches, over every process (their batches run alike)."""
        n = len(self.losses)
        if not n:  # no process has a batch: DistributedSampler pads every shard alike
            return []
        device = self.losses[0].device
        losses = torch.stack(self.losses).to(totals_dtype(device))  # float64 but on Apple's MPS
        finite = torch.isfinite(losses)
        k = min(points, n)
        run = torch.arange(n, device=device) * k // n  # each batch's run: a few ops in all
        sums = torch.zeros(2, k, dtype=losses.dtype, device=device)
        sums[0].index_add_(0, run, torch.where(finite, losses, 0.0))
        sums[1].index_add_(0, run, finite.to(losses.dtype))
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        return [round(s / c, 6) if c else float("nan") for s, c in zip(*sums.tolist())]


def epoch_totals(losses, hits, sizes, device):
    """(loss summed over the images of batches with a finite loss, those images, correct
    predictions, batches with a non-finite loss), as device tensors."""
    dtype = totals_dtype(device)
    if not sizes:
        return (torch.zeros((), device=device, dtype=dtype),) * 4
    losses = torch.stack(losses).to(dtype)
    sizes = torch.tensor(sizes, dtype=dtype).to(device, non_blocking=True)
    finite = torch.isfinite(losses)
    return (
        (torch.where(finite, losses, 0.0) * sizes).sum(),
        (finite * sizes).sum(),
        torch.stack(hits).sum(),
        (~finite).sum(),
    )
