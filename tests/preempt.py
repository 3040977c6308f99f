"""Run a script with the narrow models (tests/narrow.py) and send this process SIGTERM at a chosen
moment, the way a cluster's scheduler would:

    python tests/preempt.py step=6 train.py ...        # as the 6th training batch is augmented
    python tests/preempt.py validation=2 train.py ...  # as the 2nd validation pass starts
    python tests/preempt.py save=3 train.py ...        # during the 3rd checkpoint write, twice

Under torchrun only the process of rank PREEMPT_RANK (default 0) is signalled, and only at
torchrun's first start of it (not after a restart). PREEMPT_SIGNAL names another signal than
TERM: KILL (a worker's death), STOP (a hung worker); PREEMPT_NOTE names a file that gets the
time.time() of the signal and the process's id.
"""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from narrow import narrow_get_model  # noqa: E402
from twophase import (
    augment,  # noqa: E402
    inference,  # noqa: E402
    run_folder,  # noqa: E402
)


def signal_on_call(module, name, call, times=1, number=signal.SIGTERM):
    """Wrap module.name so that its call-th call sends signal `number` (`times` times) as it
    runs."""
    real, calls = getattr(module, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            if os.environ.get("PREEMPT_NOTE"):
                Path(os.environ["PREEMPT_NOTE"]).write_text(f"{time.time()} {os.getpid()}")
            os.kill(os.getpid(), number)
            result = real(*args, **kwargs)
            for _ in range(times - 1):  # another signal while the first is being handled
                os.kill(os.getpid(), number)
            return result
        return real(*args, **kwargs)

    setattr(module, name, wrapper)


if __name__ == "__main__":
    moment, script, sys.argv = sys.argv[1], sys.argv[2], sys.argv[2:]
    torchvision.models.get_model = narrow_get_model(torchvision.models.get_model)
    first_start = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if os.environ.get("RANK", "0") == os.environ.get("PREEMPT_RANK", "0") and first_start:
        what, call = moment.split("=")
        # Patched where they are defined, before the script imports them.
        target = {
            "step": (augment.DeviceAugment, "forward", 1),  # once per training batch
            "validation": (inference, "predict_logits", 1),  # once per validation
            "save": (run_folder, "save_checkpoints", 2),  # once per epoch (and mid-epoch save)
        }[what]
        number = signal.Signals[f"SIG{os.environ.get('PREEMPT_SIGNAL', 'TERM')}"]
        signal_on_call(*target[:2], int(call), target[2], number)
    runpy.run_path(script, run_name="__main__")
