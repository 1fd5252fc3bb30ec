"""The logged model: one MLflow model with a pytorch face and a pickle-free pyfunc face; finding and loading it."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import mlflow
import mlflow.pyfunc
import mlflow.pytorch
import torch
from mlflow.entities import Run
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from cnnexp.checks import ConfigError, first_line
from cnnexp.serving import OUTPUTS
from cnnexp.tracking import mlflow_private, pyfunc, tags
from cnnexp.tracking.log import log_input
from cnnexp.tracking.runs import end_child_run, error_text, full_run_id

# Every logged model's name: MLflow 3 resolves runs:/<run_id>/<path> by searching the run's experiment for a
# logged model *named* <path> whose source run is <run_id> (RunsArtifactRepository._get_logged_model_artifact_repo),
# so only a model named `model` loads as runs:/<run_id>/model in pyfunc, serve and evaluate. The UI tells models
# apart by the run they were logged from (its "Source run" column) and the RUN_NAME_TAG tag.
MODEL_NAME = "model"
RUN_NAME_TAG = "cnnexp.run_name"
PACKAGE_DIR = Path(__file__).resolve().parents[1]

# Outputs only: a TensorSpec input would pin one dtype, and pyfunc enforces it strictly, so it
# would refuse either uint8 0-255 or float 0-1 images; the input example shows the uint8 form.
# The outputs state the default form (params {"output": "class_index"}); "named" and "probabilities"
# are asked for per call, and MLflow enforces no output schema. Without a params schema MLflow would
# drop the `output` param with a warning.
MODEL_SIGNATURE = ModelSignature(
    outputs=Schema([ColSpec(DataType.long, "class_index")]),
    params=ParamSchema([ParamSpec("output", DataType.string, OUTPUTS[0])]),
)


@contextlib.contextmanager
def shipped_code() -> Iterator[str]:
    """cnnexp's modules as a model ships them (code_paths): the package without its 1.9 MB data sample,
    in a temporary copy that is gone once the model is saved."""
    with tempfile.TemporaryDirectory(prefix="cnnexp-code-") as tmp:
        target = Path(tmp) / "cnnexp"
        shutil.copytree(PACKAGE_DIR, target, ignore=shutil.ignore_patterns("sample_data", "__pycache__"))
        yield str(target)


def model_requirements() -> list[str]:
    """What loading the model imports, pinned to what trained it; stated rather than inferred,
    because MLflow's inference re-imports torch in a subprocess and took most of log_model's 10 s."""
    packages = ("mlflow", "torch", "torchvision", "numpy", "pandas", "matplotlib")
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


class _ClassifierFlavor:
    """The `flavor` Model.log wants: the pytorch flavor, with pyfunc loading through cnnexp.tracking.pyfunc.

    The pyfunc face (pyfunc.load_model, `mlflow models serve`) reads only pyfunc.WEIGHTS_FILE into a fresh
    Network; only mlflow.pytorch.load_model reads the pickle.
    """

    @staticmethod
    def save_model(path: str, mlflow_model: mlflow.models.Model, network: torch.nn.Module, classes: list[str],
                   **kwargs) -> None:
        with shipped_code() as code:
            mlflow.pytorch.save_model(
                network, path, mlflow_model=mlflow_model, serialization_format="pickle", code_paths=[code],
                pip_requirements=model_requirements(), **kwargs
            )
        face = mlflow_model.flavors[mlflow.pyfunc.FLAVOR_NAME]
        torch.save(network.state_dict(), os.path.join(path, face[mlflow.pyfunc.DATA], pyfunc.WEIGHTS_FILE))
        face[mlflow.pyfunc.MAIN] = pyfunc.__name__
        face["config"] = {"classes": classes}  # MLflow hands this to _load_pyfunc as model_config
        mlflow_model.save(os.path.join(path, "MLmodel"))


def log_model(model: torch.nn.Module, example_inputs: torch.Tensor, classes: list[str] | None = None,
              step: int = 0) -> mlflow.models.model.ModelInfo:
    """Logs the network as one MLflow model with two faces, at `step` (the epoch its weights are from).

    mlflow.pytorch.load_model gives back the Network (float [N, 1, 28, 28] -> logits), pickled: MLflow's
    only other format, pt2 (torch.export), loads as a GraphModule, not a Network, that refuses .eval(),
    and needs a TensorSpec input signature, which pyfunc would enforce on the uint8 form.
    mlflow.pyfunc.load_model (and `mlflow models serve`) gives cnnexp.serving.ImageClassifier:
    28x28 images, uint8 0-255 or float 0-1 -> class indices (or, by the `output` param, names or
    probabilities), built from the weights alone.
    code_paths ships cnnexp inside the model so both load where cnnexp is not installed.
    Named MODEL_NAME, it loads as runs:/<run_id>/model; its run's name goes on it as a tag.
    """
    model = model.cpu().eval()
    classes = list(classes) if classes is not None else [str(i) for i in range(model.out.out_features)]
    images = (example_inputs[:2, 0].cpu() * 255).round().to(torch.uint8).numpy()
    with mlflow_private.requirements_as_stated():
        return mlflow.models.Model.log(
            artifact_path=None, name=MODEL_NAME, flavor=_ClassifierFlavor, network=model, classes=classes,
            signature=MODEL_SIGNATURE, input_example=images, step=step, tags=run_name_tag(),
        )


def run_name_tag() -> dict[str, str]:
    """The active run's name, for the model's tags: what tells models apart once all are named `model`."""
    run = mlflow.active_run()
    name = run.info.run_name if run else None
    return {RUN_NAME_TAG: name} if name else {}


def log_kept_model(model: torch.nn.Module, example_inputs: torch.Tensor, classes: list[str], epoch: int,
                   summary: dict[str, float], val: mlflow.data.Dataset) -> mlflow.models.model.ModelInfo:
    """Into the active run: the validation data as an input, the model at step = the epoch its weights
    are from, and the run's summary metrics (best_val_accuracy, best_epoch).

    Logged at a step, the model gets the run's points of that step as its own metrics (MLflow links
    them itself), so its val_accuracy is its epoch's. They carry no dataset: the SQL store keeps none
    on run metrics, and a second, dataset-linked copy would collide with MLflow's on the model metric's
    key (name, step, timestamp) unless given a timestamp of its own, which would log every kept
    epoch's val point twice in the run's history.
    """
    mlflow.flush_async_logging()  # the points MLflow links must be in the store, not in the async queue
    log_input(val, context="val")
    info = log_model(model, example_inputs, classes, step=epoch)
    mlflow.log_metrics(summary, synchronous=True)
    return info


def log_model_and_finish(run_id: str, model: torch.nn.Module, example_inputs: torch.Tensor, classes: list[str],
                         epoch: int, summary: dict[str, float], val: mlflow.data.Dataset) -> None:
    """log_kept_model into an existing run (from any thread), then ends the run FINISHED.

    A model that fails to log ends the run FAILED with the reason as its error tag, and the error is raised:
    a run without its model is not a finished trial, and the caller must not record one.
    """
    try:
        with mlflow.start_run(run_id=run_id):
            log_kept_model(model, example_inputs, classes, epoch, summary, val)
    except BaseException as err:
        with contextlib.suppress(Exception):  # the store itself may be what failed: the error raised says why
            end_child_run(run_id, "FAILED", {tags.ERROR: f"model not logged: {error_text(err)}"})
        raise
    MlflowClient().set_terminated(run_id, "FINISHED")


def model_id_of(run_id: str) -> str | None:
    """The id of the model a run logged last (models:/<id> loads it), or None if it logged none."""
    return last_model_id(MlflowClient().get_run(run_id))


def last_model_id(run: Run) -> str | None:
    outputs = run.outputs.model_outputs if run.outputs else []
    return outputs[-1].model_id if outputs else None


def resolve_model(model_uri: str) -> tuple[str, str, str | None]:
    """(model URI, id of the run that trained it, its LoggedModel id).

    A bare run id stands for runs:/<run_id>/model. Models logged while they were named after their run
    (train-lr0_01-bs100) are found that way too, through the run's last model (MLflow finds them only by
    their old name).
    """
    if ":" not in model_uri and "/" not in model_uri:
        model_uri = f"runs:/{full_run_id('model_uri', model_uri)}/{MODEL_NAME}"
    try:
        info = mlflow.models.get_model_info(model_uri)
    except Exception as err:  # MLflow raises several kinds (missing run, model, artifact)
        model_uri, info = _run_model(model_uri, err)
    if not is_cnnexp_model(info):
        raise ConfigError("model_uri", f"{model_uri!r} is not a cnnexp model (flavors: {', '.join(info.flavors)}); "
                                       "evaluate scores the models cnnexp's train and tune log")
    if not info.run_id:
        raise ConfigError("model_uri", f"{model_uri!r} names no training run, so its data cannot be checked")
    return model_uri, info.run_id, info.model_id


def is_cnnexp_model(info: mlflow.models.model.ModelInfo) -> bool:
    """Whether cnnexp logged the model: its pyfunc face loads through cnnexp (cnnexp.tracking.pyfunc, or
    cnnexp.tracking in models logged before that module split off)."""
    face = info.flavors.get(mlflow.pyfunc.FLAVOR_NAME, {})
    return str(face.get(mlflow.pyfunc.MAIN, "")).startswith("cnnexp.")


def _run_model(model_uri: str, err: Exception) -> tuple[str, mlflow.models.model.ModelInfo]:
    """runs:/<run_id>/model of a run whose model kept its run's name (logged before MODEL_NAME was the
    rule): models:/<that model's id>."""
    run_id = model_uri.removeprefix("runs:/").removesuffix(f"/{MODEL_NAME}")
    model_id = None
    if model_uri == f"runs:/{run_id}/{MODEL_NAME}" and "/" not in run_id:
        with contextlib.suppress(Exception):  # no such run: the error below says so
            model_id = model_id_of(run_id)
    if model_id is None:
        raise ConfigError("model_uri", f"no model at {model_uri!r}: {first_line(err)}") from None
    return f"models:/{model_id}", mlflow.models.get_model_info(f"models:/{model_id}")


def load_network(model_uri: str) -> torch.nn.Module:
    return mlflow.pytorch.load_model(model_uri)


def load_faces(model_uri: str) -> tuple[torch.nn.Module, mlflow.pyfunc.PyFuncModel, str, str]:
    """The model as mlflow.pytorch (the network) and as pyfunc, with its resolved URI and training run's id."""
    model_uri, run_id, _ = resolve_model(model_uri)
    return load_network(model_uri), mlflow.pyfunc.load_model(model_uri), model_uri, run_id
