"""cnnexp export: ONNX from a model URI, checked against the pyfunc on real images; refused without the extra."""
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch

from cnnexp import onnx_export
from cnnexp.model import Network, to_inputs
from cnnexp.tracking.models import log_model
from helpers import own_store
from pipelines import export

needs_onnxruntime = pytest.mark.skipif(
    bool(onnx_export.missing_packages()),
    reason=f"the export extra is not installed (missing {', '.join(onnx_export.missing_packages())}): "
           "pip install -e '.[export]'")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, migrated_store):
    """One model logged and exported once (the dynamo exporter takes about 10 s)."""
    if onnx_export.missing_packages():
        pytest.skip("the export extra is not installed")
    with own_store(tmp_path_factory, "export", migrated_store) as work:
        torch.manual_seed(0)  # a fresh network answers differently per image: agreement means something
        network = Network().eval()
        with mlflow.start_run() as run:
            log_model(network, torch.rand(2, 1, 28, 28))
        path = work / "net.onnx"
        code = export.cli(["--model-uri", f"runs:/{run.info.run_id}/model", "--output", str(path)])
        yield SimpleNamespace(code=code, path=path, network=network)


@needs_onnxruntime
def test_the_onnx_takes_float_images_in_0_1_and_gives_the_networks_logits(exported, capsys):
    import onnx

    assert exported.code == 0 and exported.path.is_file()
    assert [p.name for p in exported.path.parent.iterdir() if ".part" in p.name] == []  # no draft left
    images = export.real_images(8)
    inputs = to_inputs(torch.from_numpy(images)).numpy()
    with torch.no_grad():
        expected = exported.network(torch.from_numpy(inputs)).numpy()
    np.testing.assert_allclose(onnx_export.onnx_logits(exported.path, inputs), expected, atol=1e-4)
    metadata = {p.key: p.value for p in onnx.load(str(exported.path)).metadata_props}
    assert "float32 [N, 1, 28, 28], pixels / 255 in 0-1" in metadata["input_contract"]
    assert metadata["source_model_uri"].endswith("/model")


@needs_onnxruntime
def test_an_export_that_disagrees_with_the_pyfunc_is_refused(exported):
    other = Network().eval()  # other weights: what a wrong graph would answer
    images = export.real_images(20)
    probabilities = torch.softmax(exported.network(to_inputs(torch.from_numpy(images))), dim=1).detach().numpy()
    with pytest.raises(RuntimeError, match="disagrees with the model"):
        export.check(exported.path, other, images, probabilities)


def test_without_the_export_extra_it_says_what_to_install_in_one_line(workdir, monkeypatch, capsys):
    monkeypatch.setattr(onnx_export, "missing_packages", lambda: ["onnxscript"])
    assert export.cli(["--model-uri", "runs:/0123/model"]) == 1
    err = capsys.readouterr().err
    assert err == "export: error: export needs onnxscript: pip install 'cnnexp[export]' " \
                  "(or pip install onnx onnxscript onnxruntime)\n"
