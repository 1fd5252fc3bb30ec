"""The pyfunc face: a model logged today loads without matplotlib or optuna; one logged before tracking was a
package (tests/fixtures/model-before-split, `loader_module: cnnexp.tracking`) still loads and predicts alike."""
import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO

BEFORE_SPLIT = REPO / "tests" / "fixtures" / "model-before-split"
EXPECTED = REPO / "tests" / "fixtures" / "model-before-split-expected.pt"

# Loads the model at argv[1] and prints its predicted classes for the fixture's inputs, the loader module
# it named, and which of the heavy modules loading pulled in. argv[2] "import-new" imports today's cnnexp first.
LOAD = """
import json, sys, torch
if sys.argv[2] == "import-new":
    import cnnexp.tracking.models, cnnexp.tracking.pyfunc  # today's package, already in this process
import mlflow.pyfunc
expected = torch.load(sys.argv[3], weights_only=True)
images = (expected["inputs"][:, 0] * 255).round().to(torch.uint8).numpy()
model = mlflow.pyfunc.load_model(sys.argv[1])
answer = model.predict(images)  # a model logged before the split answers with a frame, one logged now a Series
predicted = (answer["class_index"] if answer.ndim == 2 else answer).tolist()
print(json.dumps({"predicted": predicted, "loader": model.loader_module,
                  "heavy": sorted(m for m in ("matplotlib", "optuna", "cnnexp.plots") if m in sys.modules)}))
"""


def _load(model_dir, mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", LOAD, str(model_dir), mode, str(EXPECTED)], capture_output=True,
                          text=True, cwd=REPO / "tests", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["fresh", "import-new"])
def test_a_model_logged_before_the_split_still_loads_and_predicts_alike(mode):
    expected = torch.load(EXPECTED, weights_only=True)["logits"].argmax(dim=1).tolist()
    loaded = _load(BEFORE_SPLIT, mode)
    assert loaded["loader"] == "cnnexp.tracking"
    assert loaded["predicted"] == expected


def test_a_model_logged_now_loads_through_the_light_loader_and_leaves_no_temporary_copy(workdir, monkeypatch):
    import tempfile

    import mlflow

    from cnnexp.model import Network
    from cnnexp.tracking.models import log_model

    (workdir / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(workdir / "tmp"))
    torch.manual_seed(0)
    with mlflow.start_run():
        info = log_model(Network(), torch.rand(2, 1, 28, 28))
    assert not list((workdir / "tmp").glob("cnnexp-code-*"))  # the code it ships was copied, then removed
    local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(workdir / "model"))
    loaded = _load(local, "fresh")
    assert loaded["loader"] == "cnnexp.tracking.pyfunc"
    assert loaded["heavy"] == []
    assert "cnnexp" in {p.name for p in (workdir / "model" / "code").iterdir()}
