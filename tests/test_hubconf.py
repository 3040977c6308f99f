"""The classifier from anywhere, the PyTorch way: torch.hub.load on this repository's hubconf.py,
from a folder outside it, in a Python that has nothing of the repository on its path."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import hubconf
import train
from conftest import REPO, examples, narrowed, tiny_run

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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of a tiny run (tmp/ck/best.pt) and its dataset (tmp/data)."""
    return tiny_run(tmp_path_factory.mktemp("hub"), "--epochs1", "1", "--epochs2", "0", test=3)


@pytest.fixture
def repository(trained, tmp_path, monkeypatch):
    """A repository whose checkpoints/ holds the run's best.pt, and a notebook's folder apart
    from it as the working folder."""
    monkeypatch.setattr(hubconf, "REPO", tmp_path / "repo")
    (tmp_path / "repo" / "checkpoints").mkdir(parents=True)
    (tmp_path / "repo" / "checkpoints" / "best.pt").write_bytes(
        (trained / "ck" / "best.pt").read_bytes()
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return tmp_path / "repo"


def test_a_relative_checkpoint_is_looked_up_in_the_repository_too(repository, narrow_models):
    """hubconf.classifier("checkpoints/best.pt") from a notebook's folder finds the repository's."""
    classifier = hubconf.classifier("checkpoints/best.pt", device="cpu")
    assert classifier.classes == ["cat", "dog", "eel"]


def test_a_bare_checkpoint_name_is_found_in_the_repositorys_checkpoints(repository, narrow_models):
    classifier = hubconf.classifier("best.pt", device="cpu")
    assert classifier.classes == ["cat", "dog", "eel"]
    here = Path.cwd()
    assert hubconf.checkpoint_places("best.pt", repository / "checkpoints") == [
        here / "best.pt",  # as given, first: the notebook's own file wins
        repository / "best.pt",
        repository / "checkpoints" / "best.pt",
    ]


def test_a_checkpoint_found_nowhere_is_an_error_naming_every_place_looked(repository):
    with pytest.raises(FileNotFoundError) as missing:
        hubconf.classifier("last.pt", device="cpu")
    message = str(missing.value)
    for place in (Path.cwd(), repository, repository / "checkpoints"):
        assert str(place / "last.pt") in message


@pytest.fixture(scope="module")
def classifier(trained):
    with narrowed():
        return hubconf.classifier(str(trained / "ck" / "best.pt"), device="cpu")


def test_predict_takes_one_image_as_a_path_or_a_pil_image_and_gives_its_own_name_and_row(
    classifier, trained
):
    path = trained / "data" / "test" / "img_01.png"
    names, probs = classifier.predict([path])
    for one in (str(path), path, Image.open(path)):
        name, row = classifier.predict(one)
        assert name == names[0] and row.shape == (3,)
        assert np.allclose(row, probs[0], atol=1e-6) and np.isclose(row.sum(), 1)
    none, no_rows = classifier.predict([])
    assert none == [] and no_rows.shape == (0, 3)


def test_predict_refuses_what_is_no_image_naming_its_type(classifier, trained):
    path = str(trained / "data" / "test" / "img_01.png")
    with pytest.raises(TypeError, match="predict takes a path .* not ndarray"):
        classifier.predict(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(
        TypeError, match=r"a path \(str or pathlib.Path\) or a PIL image.*generator"
    ):
        classifier.predict(p for p in [path])
    with pytest.raises(TypeError, match=r"images\[1\] is a int: each must be a path"):
        classifier.predict([path, 3])


@settings(max_examples=examples(6))
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["str", "Path", "PIL"])), max_size=4))
def test_a_list_of_images_gives_each_the_name_and_row_it_gets_alone(classifier, trained, drawn):
    """Any mix of paths and PIL images, in any order and repeated: one name and row each."""
    test = trained / "data" / "test"
    make = {"str": str, "Path": Path, "PIL": Image.open}
    images = [make[kind](test / f"img_{j:02d}.png") for j, kind in drawn]
    names, probs = classifier.predict(images)
    assert len(names) == len(images) and probs.shape == (len(images), 3)
    for image, name, row in zip(images, names, probs):
        alone = classifier.predict(image)
        assert alone[0] == name and np.allclose(alone[1], row, atol=1e-6)
