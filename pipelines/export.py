"""cnnexp export: a logged model as ONNX, checked against the model's own pyfunc on real images as it is written.

The ONNX graph is the bare network: float32 [N, 1, 28, 28] in 0-1 in, logits out (the pyfunc takes uint8
0-255 images and answers classes). The file says so in its metadata. Needs the `export` extra.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from cnnexp import onnx_export
from cnnexp.config import ExportConfig
from cnnexp.data import SAMPLE_DIR
from cnnexp.idx import SAMPLE, read_source
from cnnexp.model import to_inputs
from cnnexp.tracking.models import load_faces
from pipelines import cli as commands
from pipelines.running import Made


def main(config: ExportConfig) -> Made[dict]:
    """Writes config.output only if ONNX Runtime agrees with the pyfunc; returns the agreement."""
    config.validate()
    if missing := onnx_export.missing_packages():
        raise RuntimeError(f"export needs {', '.join(missing)}: pip install 'cnnexp[export]' "
                           f"(or pip install {' '.join(onnx_export.EXPORT_PACKAGES)})")
    network, pyfunc, model_uri, run_id = load_faces(config.model_uri)
    images = real_images(config.check_images)
    probabilities = pyfunc.predict(images, params={"output": "probabilities"})  # columns: the class names
    target = Path(config.output)
    draft = target.with_name(f".{target.name}.{os.getpid()}.part")  # no half-checked file under the real name
    try:
        onnx_export.to_onnx(network, draft, {"input_contract": onnx_export.INPUT_CONTRACT,
                                             "source_model_uri": model_uri, "classes": ",".join(probabilities.columns)})
        checked = check(draft, network, images, probabilities.to_numpy())
        draft.replace(target)
    finally:
        draft.unlink(missing_ok=True)
    print(f"wrote {target} from {model_uri}\n{onnx_export.INPUT_CONTRACT}\n"
          f"checked on {checked.images} real images (the bundled Fashion-MNIST test split): {checked.text()}")
    return Made(run_id, {"path": str(target), "model_uri": model_uri, "agreement": checked})


def real_images(count: int) -> np.ndarray:
    """The first `count` uint8 [N, 28, 28] images of the bundled sample's test split: real, and always here."""
    splits, _ = read_source(SAMPLE, SAMPLE_DIR)
    return splits["test"].images[:count].numpy()


def check(path: Path, network: torch.nn.Module, images: np.ndarray,
          probabilities: np.ndarray) -> onnx_export.Agreement:
    """The draft's agreement with the pyfunc and the network; a disagreement is an error, not a file."""
    inputs = to_inputs(torch.from_numpy(images))
    with torch.no_grad():
        reference = network.cpu().eval()(inputs).numpy()
    checked = onnx_export.agreement(onnx_export.onnx_logits(path, inputs.numpy()), probabilities, reference)
    if not checked.agrees:
        raise RuntimeError(f"the ONNX export disagrees with the model ({checked.text()}); nothing written")
    return checked


def cli(argv: list[str] | None = None, prog: str = "export") -> int:
    return commands.run("export", argv, prog)


if __name__ == "__main__":
    sys.exit(cli())
