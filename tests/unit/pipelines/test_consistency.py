"""MLproject, the CLI, conda.yaml and the README agree with the one config and pyproject."""
import dataclasses
import re
import tomllib

import pytest
import yaml

from cnnexp import config as cfg
from pipelines import cli
from pipelines.flags import flag, make_parser
from helpers import REPO

ENTRY_POINT_CONFIGS = {
    "prepare": cfg.PrepareConfig, "train": cfg.TrainConfig, "evaluate": cfg.EvaluateConfig, "main": cfg.MainConfig,
    "tune": cfg.TuneConfig,
}
MLFLOW_TYPES = {"str": "string", "int": "int", "float": "float", "bool": "string"}


def _mlproject():
    return yaml.safe_load((REPO / "MLproject").read_text())


@pytest.mark.parametrize("entry, config_class", ENTRY_POINT_CONFIGS.items())
def test_mlproject_parameters_match_the_config(entry, config_class):
    spec = _mlproject()["entry_points"][entry]
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    assert set(spec["parameters"]) == set(fields)
    for name, param in spec["parameters"].items():
        assert param["default"] == fields[name].default, name
        assert param["type"] == MLFLOW_TYPES[fields[name].type], name
        assert f"{flag(name)} {{{name}}}" in spec["command"], name


@pytest.mark.parametrize("entry, config_class", ENTRY_POINT_CONFIGS.items())
def test_cli_flags_and_defaults_match_the_config(entry, config_class):
    assert cli.COMMANDS[entry].config is config_class
    parser = make_parser(entry, "", config_class)
    defaults = vars(parser.parse_args([]))
    for f in dataclasses.fields(config_class):
        assert defaults[f.name] == f.default


def test_conda_env_lists_the_same_requirements_as_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip_section) == sorted(pyproject["project"]["dependencies"])
    assert "python=3.11" in conda["dependencies"]


EXTRAS = {"plots": {"plotly"}, "export": {"onnx", "onnxscript", "onnxruntime"}}


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.match(r"[\w-]+", requirement).group(0) for requirement in requirements}


def test_the_plots_and_export_extras_exist_and_readme_names_them_while_dev_stays_light():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    readme = (REPO / "README.md").read_text()
    for name, packages in EXTRAS.items():
        assert _requirement_names(extras[name]) == packages, name
        assert f'pip install -e ".[{name}]"' in readme, name
    assert not _requirement_names(extras["dev"]) & set().union(*EXTRAS.values())  # dev installs as before


PARAMETERS_DOC = REPO / "docs" / "parameters.md"  # the full parameter reference, linked from README


def test_readme_links_the_parameter_reference():
    assert "(docs/parameters.md)" in (REPO / "README.md").read_text()


def test_readme_states_the_train_defaults():
    readme = PARAMETERS_DOC.read_text()
    for f in dataclasses.fields(cfg.TrainConfig):
        if f.name in ("lr", "batch_size", "epochs"):
            assert re.search(rf"`{f.name}`[^\n|]*\|\s*`?{re.escape(str(f.default))}`?", readme), f.name


def test_readme_leads_with_install_main_job_and_tests():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert 'pip install -e ".[dev]"' in blocks[0]
    assert "mlflow run . -e" in blocks[1]
    assert blocks[2].strip() == "pytest"


# `worker` has no MLproject entry point: `mlflow run` would open a run of its own, and a worker's
# trials belong to the study's parent run. `orphans` and `export` make no run to track.
CLI_ONLY_CONFIGS = {"worker": cfg.WorkerConfig, "orphans": cfg.OrphansConfig, "export": cfg.ExportConfig}


@pytest.mark.parametrize("entry, config_class", CLI_ONLY_CONFIGS.items())
def test_cli_only_commands_match_their_config(entry, config_class):
    test_cli_flags_and_defaults_match_the_config(entry, config_class)
    assert entry not in _mlproject()["entry_points"]


@pytest.mark.parametrize("entry", CLI_ONLY_CONFIGS)
def test_the_docs_never_offer_a_cli_only_command_as_an_entry_point(entry):
    for path in [REPO / "README.md", *REPO.glob("docs/*.md")]:
        text = path.read_text()
        assert f"-e {entry}" not in text, path.name
        for item in re.split(r"\n\s*\n|\n- ", text):  # paragraphs and list items
            if "entry point" in item.lower() and f"`{entry}`" in item:
                assert re.search(r"no (MLproject )?entry point", item), (path.name, item)


def test_readme_tables_list_every_worker_parameter_with_its_default():
    readme = PARAMETERS_DOC.read_text()
    section = readme[readme.index("### `worker`"):readme.index("### `evaluate`")]
    for f in dataclasses.fields(cfg.WorkerConfig):
        default = f"{f.default:g}" if isinstance(f.default, float) else str(f.default) or "(empty)"
        assert re.search(rf"\| `{f.name}` \| `?{re.escape(default)}`? \|", section), f.name


def test_readme_states_the_python_pyproject_requires():
    required = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = re.fullmatch(r">=\s*(\d+\.\d+)", required).group(1)
    assert f"Python {minimum} or newer" in (REPO / "README.md").read_text()


def test_every_test_file_the_project_files_cite_exists():
    cited = {}
    for path in [REPO / "MLproject", REPO / "pyproject.toml", REPO / "conda.yaml", REPO / "README.md",
                 *REPO.glob("docs/*.md"), *REPO.glob("cnnexp/**/*.py"), *REPO.glob("pipelines/*.py")]:
        for name in re.findall(r"\btests/[\w/]+\.py\b", path.read_text()):
            cited.setdefault(name, path.relative_to(REPO))
    assert cited  # MLproject and pyproject cite test_consistency.py at least
    assert not {name: where for name, where in cited.items() if not (REPO / name).is_file()}
