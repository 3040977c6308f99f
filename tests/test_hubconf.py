"""The classifier from anywhere, the PyTorch way: torch.hub.load on this repository's hubconf.py,
from a folder outside it, in a Python that has nothing of the repository on its path."""

import json
import subprocess
import sys

import numpy as np
import torch

import train
from conftest import REPO

SCRIPT = """
import json, sys, torch, torchvision
sys.path.insert(0, {tests!r})  # the narrow stand-in for resnet18, which the checkpoint holds
from narrow import narrow_get_model
torchvision.models.get_model = narrow_get_model(torchvision.models.get_model)
assert not any(p.rstrip("/") == {repo!r} for p in sys.path)
sys.path.insert(0, ".")
import model  # the notebook's own model.py, a common name
classifier = torch.hub.load({repo!r}, "classifier", {ckpt!r}, source="local", device="cpu")
names, probs = classifier.predict([{image!r}])
import model as again
assert model.MINE and again is model  # neither hidden by ours nor hiding it
print(json.dumps({{"names": names, "probs": probs.tolist(), "classes": classifier.classes}}))
"""


def test_torch_hub_loads_the_classifier_from_a_folder_outside_the_repository(
    tiny_args, dataset, tmp_path
):
    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0"])
    elsewhere = tmp_path / "notebook"
    elsewhere.mkdir()
    (elsewhere / "model.py").write_text("MINE = True\n")
    image = str(dataset / "test" / "img_00.png")
    script = SCRIPT.format(
        tests=str(REPO / "tests"),
        repo=str(REPO),
        ckpt=str(tmp_path / "ck" / "best.pt"),
        image=image,
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["classes"] == ["cat", "dog", "eel"] and result["names"][0] in result["classes"]
    assert np.isclose(sum(result["probs"][0]), 1)
    state = torch.load(tmp_path / "ck" / "best.pt", weights_only=True)
    assert state["classes"] == result["classes"]


def test_a_relative_checkpoint_is_looked_up_in_the_repository_too(tiny_args, tmp_path, monkeypatch):
    """hubconf.classifier("checkpoints/best.pt") from a notebook's folder finds the repository's."""
    import hubconf

    train.main(tiny_args + ["--epochs1", "1", "--epochs2", "0"])
    monkeypatch.setattr(hubconf, "REPO", tmp_path)  # its checkpoints/: tmp_path/ck here
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    classifier = hubconf.classifier("ck/best.pt", device="cpu")
    assert classifier.classes == ["cat", "dog", "eel"]
