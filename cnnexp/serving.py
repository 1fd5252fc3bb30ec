"""What users of the logged model call: images in, class index and name out (no MLflow here)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from cnnexp.evaluate import predict
from cnnexp.model import to_inputs

IMAGE_PIXELS = 28 * 28


def as_inputs(batch) -> torch.Tensor:
    """A batch of 28x28 images -> the network's float [N, 1, 28, 28] in 0-1.

    Integer input is read as 0-255 pixels and float input as 0-1, so the dtype, not the values,
    decides the scale (an all-dark uint8 image must not be mistaken for a bright float one).
    Accepts numpy arrays, nested lists (what the scoring server hands over for {"inputs": ...}),
    DataFrames with 784 pixel columns, or a DataFrame with one column of 28x28 arrays.
    """
    if isinstance(batch, pd.DataFrame):
        batch = np.stack(batch.iloc[:, 0].map(np.asarray).tolist()) if batch.shape[1] == 1 else batch.to_numpy()
    array = np.asarray(batch)
    if array.ndim == 2 and array.shape[1] == IMAGE_PIXELS:
        array = array.reshape(-1, 28, 28)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[1:] != (28, 28):
        raise ValueError(f"expected a batch of 28x28 images, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        _check_range(array, 1.0, "float pixels must be within 0-1 (integer pixels are read as 0-255)")
        return torch.from_numpy(array.astype(np.float32)).unsqueeze(1)
    if np.issubdtype(array.dtype, np.integer):
        _check_range(array, 255, "integer pixels must be within 0-255 (float pixels are read as 0-1)")
        return to_inputs(torch.from_numpy(array.astype(np.uint8)))
    raise ValueError(f"expected integer (0-255) or float (0-1) pixels, got dtype {array.dtype}")


def _check_range(array: np.ndarray, high: float, rule: str) -> None:
    # Out-of-range pixels would be clipped or wrapped into a confident answer about another image.
    if array.size and not (np.all(array >= 0) and np.all(array <= high)):  # NaN fails both
        raise ValueError(f"{rule}; got values from {array.min():g} to {array.max():g}")


# What predict's `output` param may ask for. The default is one class index per image: the form
# mlflow.models.evaluate's classifier evaluator and sklearn-style callers compare with integer labels
# (a two-column frame there fails with "all the input arrays must have same number of dimensions").
OUTPUTS = ("class_index", "named", "probabilities")


class ImageClassifier:
    """The pyfunc side of the logged model: mlflow.pyfunc.load_model returns one of these."""

    def __init__(self, network: nn.Module, classes: list[str]):
        self.network = network.eval()
        self.classes = list(classes)

    def predict(self, batch, params: dict | None = None) -> pd.Series | pd.DataFrame:
        """params {"output": ...}: "class_index" (default) a Series of class indices; "named" a frame of
        class_index and class_name; "probabilities" a frame with one column per class name, rows summing to 1."""
        output = (params or {}).get("output") or OUTPUTS[0]
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}; got {output!r}")
        logits = predict(self.network, as_inputs(batch))
        if output == "probabilities":
            return pd.DataFrame(torch.softmax(logits, dim=1).numpy(), columns=self.classes)
        index = logits.argmax(dim=1).numpy().astype(np.int64)
        if output == "class_index":
            return pd.Series(index, name="class_index")
        return pd.DataFrame({"class_index": index, "class_name": [self.classes[i] for i in index]})
