"""An epoch's running record, kept on the device as it trains: each batch's mean loss, its correct
predictions and its images, summed over the processes at its end; a run stopped mid-epoch saves
it and goes on from it."""

from dataclasses import dataclass, field

import torch

from utils import sum_over_processes, totals_dtype


@dataclass
class EpochTally:
    """An epoch's running record, kept on the device: each batch's mean loss, its correct
    predictions and its images. A run stopped mid-epoch saves it and goes on from it."""

    losses: list = field(default_factory=list)
    hits: list = field(default_factory=list)
    sizes: list = field(default_factory=list)

    @classmethod
    def restored(cls, progress, device):
        losses = list(progress["losses"].to(device).unbind())
        return cls(losses, list(progress["hits"].to(device).unbind()), list(progress["sizes"]))

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
        }


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
