"""cnnexp.tracking.runs: every run ends with the status that happened; child runs and runs mlflow run left open."""
import mlflow
import pytest
from mlflow.tracking import MlflowClient

from cnnexp.tracking import runs, tags


def _run(run_id):
    return MlflowClient().get_run(run_id)


def test_a_run_ends_finished_failed_with_its_error_or_killed(workdir):
    before = runs.runs_started()
    with runs.tracked_run(run_name="ok") as ok:
        with runs.tracked_run(run_name="child") as child:
            pass
    with pytest.raises(ValueError), runs.tracked_run(run_name="bad") as bad:
        raise ValueError("lr: must be a positive number")
    with pytest.raises(KeyboardInterrupt), runs.tracked_run(run_name="stopped") as stopped:
        raise KeyboardInterrupt
    assert runs.runs_started() == before + 4
    assert _run(ok.info.run_id).info.status == "FINISHED"
    assert _run(child.info.run_id).data.tags["mlflow.parentRunId"] == ok.info.run_id
    failed = _run(bad.info.run_id)
    assert failed.info.status == "FAILED" and failed.data.tags[tags.ERROR] == "ValueError: lr: must be a positive number"
    assert _run(stopped.info.run_id).info.status == "KILLED"
    assert "mlflow.source.type" in _run(ok.info.run_id).data.tags  # lineage, as mlflow run gives its runs


def test_a_run_mlflow_run_left_open_ends_with_the_reason_and_its_entry_points_name(workdir):
    client = MlflowClient()
    pending = client.create_run("0", tags={tags.PROJECT_ENTRY_POINT: "train"}).info.run_id
    runs.end_pending_run("FAILED", ValueError("epochs: must be at least 1"), run_id=pending)
    run = _run(pending)
    assert run.info.status == "FAILED" and run.info.run_name == "train"
    assert run.data.tags[tags.ERROR] == "ValueError: epochs: must be at least 1"
    runs.end_pending_run("KILLED", run_id=pending)  # an ended run is left as it is
    assert _run(pending).info.status == "FAILED"


def test_child_runs_carry_their_parent_params_and_tags_and_end_as_told(workdir):
    with mlflow.start_run() as parent:
        run_id = runs.start_child_run(parent.info.run_id, parent.info.experiment_id, "trial-0", {"lr": 0.01},
                                      {tags.TRIAL_NUMBER: "0"})
    runs.end_child_run(run_id, "KILLED", {tags.PRUNED_AT_EPOCH: 2})
    child = _run(run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.data.params == {"lr": "0.01"}
    assert child.info.status == "KILLED" and child.data.tags[tags.PRUNED_AT_EPOCH] == "2"
    runs.reopen(parent.info.run_id)
    assert _run(parent.info.run_id).info.status == "RUNNING"


def test_every_run_is_created_with_its_owner_in_the_same_write(workdir, monkeypatch):
    """A run whose end a full store could not write is then one `cnnexp orphans` finds: its owner went in
    with the run itself, not in a later write that the full disk may refuse."""
    created = []
    real_create = MlflowClient.create_run

    def create_run(self, experiment_id, *args, tags=None, **kwargs):
        created.append(dict(tags or {}))
        return real_create(self, experiment_id, *args, tags=tags, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_run", create_run)
    with runs.tracked_run(run_name="parent", tags={tags.ENTRY_POINT: "train"}) as parent:
        runs.start_child_run(parent.info.run_id, parent.info.experiment_id, "trial-0", {"lr": 0.1}, {})
    me = runs.owner_tags()
    for at_creation in created:
        assert at_creation[tags.OWNER_PID] == me[tags.OWNER_PID] and at_creation[tags.OWNER_HOST] == me[tags.OWNER_HOST]
    assert len(created) == 2 and created[0][tags.ENTRY_POINT] == "train"


def test_a_unique_prefix_of_a_run_id_names_the_run_and_an_ambiguous_one_is_refused(workdir):
    client = MlflowClient()
    ids = [client.create_run("0").info.run_id for _ in range(17)]  # 17 ids over 16 hex digits: two share the first
    assert runs.full_run_id("resume", ids[0][:12]) == ids[0]
    assert runs.full_run_id("resume", ids[0].upper()[:12]) == ids[0]
    assert runs.full_run_id("resume", "0123abcd") == "0123abcd"  # no such run: the caller says so
    shared = next(i[0] for i in ids if sum(j[0] == i[0] for j in ids) > 1)
    with pytest.raises(runs.ConfigError, match=rf"resume: '{shared}' is the start of several run ids .*; give more of it"):
        runs.full_run_id("resume", shared)


def test_a_run_marks_its_experiment_as_model_training_unless_the_user_chose_a_kind(workdir):
    """MLflow's UI opens an experiment without mlflow.experimentKind in its GenAI view."""
    client = MlflowClient()
    chosen = client.create_experiment("genai", tags={tags.EXPERIMENT_KIND: "genai_development"})
    with runs.tracked_run(run_name="default") as run:
        pass
    with runs.tracked_run(run_name="chosen", experiment_id=chosen):
        pass
    assert client.get_experiment(run.info.experiment_id).tags[tags.EXPERIMENT_KIND] == "custom_model_development"
    assert client.get_experiment(chosen).tags[tags.EXPERIMENT_KIND] == "genai_development"
