"""The logged model's pyfunc loader (mlflow.pyfunc.load_model, `mlflow models serve`): weights in, classifier out.

It imports what loading needs (torch, numpy, pandas and cnnexp's model and serving modules) and nothing
heavier: no matplotlib, no optuna, so loading a model never changes a caller's plotting backend.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from cnnexp.model import Network
from cnnexp.serving import ImageClassifier

WEIGHTS_FILE = "weights.pt"  # the network's state dict, beside the pickled module in the model's data folder


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> ServedClassifier:
    """Called by mlflow.pyfunc.load_model with the model's data folder; reads only the state dict, with
    torch.load(weights_only=True), so serving never unpickles (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false works)."""
    classes = model_config["classes"]
    network = Network(num_classes=len(classes))
    network.load_state_dict(torch.load(Path(data_path, WEIGHTS_FILE), map_location="cpu", weights_only=True))
    return ServedClassifier(ImageClassifier(network, classes))


class ServedClassifier:
    """ImageClassifier as MLflow serves it: bad input (shape, dtype, pixel range) is the caller's error.

    The scoring server answers an MlflowException with its message and HTTP status; any other exception
    becomes a generic message, with the reason only in the stack trace.
    """

    def __init__(self, classifier: ImageClassifier):
        self.classifier = classifier

    def predict(self, batch, params: dict | None = None) -> pd.DataFrame:
        try:
            return self.classifier.predict(batch, params)
        except ValueError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from err
