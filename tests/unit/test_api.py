"""The Python API (cnnexp/api.py): a light `import cnnexp`, each command's parameters and defaults, quiet."""
import dataclasses
import inspect
import subprocess
import sys

import pytest

import cnnexp
from cnnexp import config as cfg
from helpers import REPO

API_CONFIGS = {"prepare": cfg.PrepareConfig, "train": cfg.TrainConfig, "evaluate": cfg.EvaluateConfig,
               "tune": cfg.TuneConfig, "compare": cfg.CompareConfig, "export": cfg.ExportConfig}
HEAVY = ("torch", "mlflow", "optuna")


def test_importing_cnnexp_and_naming_its_functions_imports_no_torch_mlflow_or_optuna():
    """The CLI imports cnnexp.config before it refuses bad flags: that must stay fast."""
    code = ("import sys, cnnexp, cnnexp.config; cnnexp.train, cnnexp.tune, cnnexp.best_params; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("name, config_class", API_CONFIGS.items())
def test_each_function_takes_its_commands_parameters_with_the_same_defaults(name, config_class):
    parameters = inspect.signature(getattr(cnnexp, name)).parameters
    fields = dataclasses.fields(config_class)
    assert list(parameters) == [f.name for f in fields] + ["quiet"]
    assert all(parameters[f.name].default == f.default and parameters[f.name].kind is inspect.Parameter.KEYWORD_ONLY
               for f in fields)
    assert all(f.metadata["help"] in getattr(cnnexp, name).__doc__ for f in fields)


def test_the_function_names_win_over_the_modules_of_the_same_name():
    import pipelines.evaluate  # noqa: F401 - imports cnnexp.train and cnnexp.evaluate, the modules
    from cnnexp.train import fit  # noqa: F401 - the modules stay importable as ever

    assert cnnexp.train.__module__ == cnnexp.evaluate.__module__ == "cnnexp.api"
    assert "cnnexp.train" in sys.modules


def test_an_unknown_parameter_is_named(workdir):
    with pytest.raises(TypeError, match="train\\(\\) got unknown parameter 'epoch'; its parameters: lr, batch_size"):
        cnnexp.train(epoch=1)


def test_quiet_prints_nothing_and_the_result_is_returned_either_way(workdir, capsys):
    loud = cnnexp.compare()
    assert "no finished training runs" in capsys.readouterr().out
    quiet = cnnexp.compare(quiet=True)
    assert capsys.readouterr() == ("", "")
    assert list(loud.columns) == list(quiet.columns) and quiet.empty
