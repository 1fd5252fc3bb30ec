"""The network as ONNX, and how far ONNX Runtime's answers are from a reference's (no MLflow here).

Needs the `export` extra (onnx, onnxscript, onnxruntime); this module imports them only when called.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_NAME, OUTPUT_NAME = "images", "logits"
# Not the pyfunc's contract (uint8 0-255 [N, 28, 28], or float 0-1): the graph is the bare network.
INPUT_CONTRACT = (f"input '{INPUT_NAME}': float32 [N, 1, 28, 28], pixels / 255 in 0-1 (the pyfunc takes uint8 "
                  f"0-255 [N, 28, 28]); output '{OUTPUT_NAME}': float32 [N, classes], softmax gives probabilities")
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# Float rounding between two runtimes on the same weights: ONNX Runtime agreed with the pyfunc to 4.3e-6
# in logits on 100 real digits; a wrong graph (a missing layer, a transposed weight) is off by far more.
AGREEMENT_TOLERANCE = 1e-4


def missing_packages() -> list[str]:
    """The export extra's packages that are not installed."""
    from importlib.util import find_spec

    return [name for name in EXPORT_PACKAGES if find_spec(name) is None]


def to_onnx(network: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Writes the network with a free batch dimension; metadata (the input contract, classes, source)
    goes into the file's metadata_props, where ONNX tools show it."""
    import onnx

    network = network.cpu().eval()
    example = torch.zeros(2, 1, 28, 28)
    torch.onnx.export(network, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False)
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, metadata)
    onnx.save(graph, str(path))


def onnx_logits(path: Path, inputs: np.ndarray) -> np.ndarray:
    """ONNX Runtime's logits for float [N, 1, 28, 28] inputs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: inputs.astype(np.float32)})[0]


@dataclass(frozen=True)
class Agreement:
    """How the export's answers compare with the model's own on the same images."""

    images: int
    same_class: int  # images where the export's class is the pyfunc's
    largest_probability_gap: float  # vs the pyfunc's probabilities
    largest_logit_gap: float  # vs the network's own logits (mlflow.pytorch)

    @property
    def agrees(self) -> bool:
        return (self.same_class == self.images and self.largest_probability_gap <= AGREEMENT_TOLERANCE
                and self.largest_logit_gap <= AGREEMENT_TOLERANCE)

    def text(self) -> str:
        return (f"{self.same_class}/{self.images} same class as the pyfunc, largest probability gap "
                f"{self.largest_probability_gap:.2g}, largest logit gap {self.largest_logit_gap:.2g}")


def agreement(logits: np.ndarray, probabilities: np.ndarray, reference_logits: np.ndarray) -> Agreement:
    """The export's logits against the pyfunc's probabilities and the network's logits, image by image."""
    exported = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    return Agreement(
        images=len(logits),
        same_class=int((logits.argmax(axis=1) == probabilities.argmax(axis=1)).sum()),
        largest_probability_gap=float(np.abs(exported - probabilities).max()),
        largest_logit_gap=float(np.abs(logits - reference_logits).max()),
    )
