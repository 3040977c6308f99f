"""Run under torchrun by test_distributed.py: train.main, then each process saves its parameters,
those of its moving average (with --ema) and the state its augmentation's generator ended in."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

out = Path(sys.argv[1])
run = train.main(sys.argv[2:])
torch.save(
    {n: p.detach() for n, p in run.model.named_parameters()}, out / f"params_rank{run.rank}.pt"
)
if run.ema is not None:
    ema = {n: p.detach() for n, p in run.ema.module.named_parameters()}
    torch.save(ema, out / f"ema_rank{run.rank}.pt")
torch.save(
    run.stream.preprocess.augment.generator.get_state(), out / f"augment_rng_rank{run.rank}.pt"
)
