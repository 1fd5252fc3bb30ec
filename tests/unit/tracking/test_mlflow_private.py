"""What cnnexp.tracking.mlflow_private leans on in MLflow (3.17.2). If one of these fails, MLflow has moved:
redo or drop the workaround in the same change that bumps MLflow."""
import inspect
import json

import mlflow.projects
from mlflow.entities import RunStatus


def test_mlflow_run_still_compares_a_status_string_with_run_status_ints():
    # The reason for keep_killed_after_mlflow_run: `mlflow run` re-marks an ended run FAILED because this is False.
    assert RunStatus.is_terminated("KILLED") is False
    source = inspect.getsource(mlflow.projects._maybe_set_run_terminated)
    assert "RunStatus.is_terminated(cur_status)" in source and "get_run(run_id).info.status" in source


def test_a_version_links_its_logged_model_as_mlflow_register_model_does(workdir):
    """link_version_to_logged_model writes what mlflow.register_model writes on the logged model."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from cnnexp.model import Network
    from cnnexp.tracking.mlflow_private import link_version_to_logged_model, version_model_id
    from cnnexp.tracking.models import log_model

    with mlflow.start_run():
        ours, theirs = (log_model(Network(), torch.rand(2, 1, 28, 28)) for _ in range(2))
    client = MlflowClient()
    client.create_registered_model("ours")
    link_version_to_logged_model(client, client.create_model_version("ours", ours.model_uri, model_id=ours.model_id))
    registered = mlflow.register_model(theirs.model_uri, "theirs")
    # The reason for version_model_id: MLflow's SQL registry keeps no model_id, even for its own call.
    assert client.get_model_version("theirs", registered.version).model_id is None
    assert version_model_id(client.get_model_version("theirs", registered.version)) == theirs.model_id
    tags = {info.model_id: client.get_logged_model(info.model_id).tags for info in (ours, theirs)}
    assert (json.loads(tags[ours.model_id]["mlflow.modelVersions"])
            == [{**entry, "name": "ours"} for entry in json.loads(tags[theirs.model_id]["mlflow.modelVersions"])])


def test_our_models_skip_mlflows_requirement_check_and_every_other_save_keeps_it(workdir, monkeypatch):
    """requirements_as_stated: MLflow still checks requirements through the module-level function it replaces,
    our model's save does not map the installed distributions, and any other caller's check still runs."""
    import mlflow
    import mlflow.utils.environment as environment
    import mlflow.utils.requirements_utils as requirements_utils
    import torch

    from cnnexp.model import Network
    from cnnexp.tracking.models import log_model

    for checking in (environment._process_pip_requirements, environment._process_conda_env, mlflow.pyfunc.load_model):
        assert "warn_dependency_requirement_mismatches(" in inspect.getsource(checking)
    mapped = []
    monkeypatch.setattr(requirements_utils, "_init_modules_to_packages_map", lambda: mapped.append(1))
    monkeypatch.setattr(requirements_utils, "_PACKAGES_TO_MODULES", {})
    with mlflow.start_run():
        log_model(Network(), torch.rand(2, 1, 28, 28))
    assert mapped == []
    environment.warn_dependency_requirement_mismatches(["torch==0.0.1"])
    mlflow.pyfunc.warn_dependency_requirement_mismatches(["torch==0.0.1"])
    assert mapped == [1, 1]
