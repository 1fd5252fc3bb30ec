"""cnnexp.config: every rule a parameter must meet, each refused with a message naming it; and the flags the
CLI parses from the dataclasses (bad types, abbreviations and unknown names are refused by name too)."""
import pytest

from cnnexp.config import ConfigError, EvaluateConfig, PrepareConfig, TrainConfig, TuneConfig
from pipelines.flags import make_parser

# (config class, the field values, the start of the message)
RULES = {
    "prepare dataset unknown": (PrepareConfig, {"dataset": "cifar"}, "dataset: unknown value 'cifar'; allowed: fashion-mnist"),
    "prepare data_dir empty": (PrepareConfig, {"data_dir": ""}, "data_dir: must not be empty"),
    "prepare val_fraction 0": (PrepareConfig, {"val_fraction": 0.0}, "val_fraction: must be between 0 and 1"),
    "prepare val_fraction 1": (PrepareConfig, {"val_fraction": 1.0}, "val_fraction: must be between 0 and 1"),
    "prepare val_fraction negative": (PrepareConfig, {"val_fraction": -0.1}, "val_fraction: must be between 0 and 1"),
    "prepare seed negative": (PrepareConfig, {"seed": -1}, "seed: must be between 0 and 2**32 - 1"),
    "train lr zero": (TrainConfig, {"lr": 0.0}, "lr: must be a finite positive number"),
    "train lr negative": (TrainConfig, {"lr": -1.0}, "lr: must be a finite positive number"),
    "train lr nan": (TrainConfig, {"lr": float("nan")}, "lr: must be a finite positive number"),
    "train lr inf": (TrainConfig, {"lr": float("inf")}, "lr: must be a finite positive number, got inf"),
    "tune lr_max inf": (TuneConfig, {"lr_max": float("inf")}, "lr_max: must be a finite positive number, got inf"),
    "train batch_size zero": (TrainConfig, {"batch_size": 0}, "batch_size: must be at least 1"),
    "train epochs zero": (TrainConfig, {"epochs": 0}, "epochs: must be at least 1"),
    "train keep unknown": (TrainConfig, {"keep": "first"}, "keep: unknown value 'first'; allowed: best, last"),
    "train seed too big": (TrainConfig, {"seed": 2**32}, "seed: must be between 0 and 2**32 - 1"),
    "train device unknown": (TrainConfig, {"device": "tpu"}, "device: unknown device 'tpu'; allowed: auto, cpu"),
    "train device bad index": (TrainConfig, {"device": "cuda:x"}, "device: unknown device 'cuda:x'"),
    "train dataset unknown": (TrainConfig, {"dataset": "cifar"}, "dataset: unknown value 'cifar'"),
    "train data_dir blank": (TrainConfig, {"data_dir": " "}, "data_dir: must not be empty"),
    "train checkpoint_dir empty": (TrainConfig, {"checkpoint_dir": ""}, "checkpoint_dir: must not be empty"),
    "train resume path": (TrainConfig, {"resume": "../../etc"}, "resume: '../../etc' is not a run id"),
    "evaluate model_uri empty": (EvaluateConfig, {"model_uri": ""}, "model_uri: must not be empty"),
    "evaluate split unknown": (EvaluateConfig, {"model_uri": "abc", "split": "train"}, "split: unknown value 'train'; allowed: test, val"),
    "evaluate dataset unknown": (EvaluateConfig, {"model_uri": "abc", "dataset": "cifar"}, "dataset: unknown value 'cifar'"),
    "evaluate device unknown": (EvaluateConfig, {"model_uri": "abc", "device": "tpu"}, "device: unknown device 'tpu'"),
    "tune n_trials zero": (TuneConfig, {"n_trials": 0}, "n_trials: must be at least 1"),
    "tune timeout negative": (TuneConfig, {"timeout": -1.0}, "timeout: must be 0 (no limit) or a finite positive number"),
    "tune epochs zero": (TuneConfig, {"epochs": 0}, "epochs: must be at least 1"),
    "tune lr range inverted": (TuneConfig, {"lr_min": 0.1, "lr_max": 0.01}, "lr_min: must be below lr_max"),
    "tune lr_min zero": (TuneConfig, {"lr_min": 0.0}, "lr_min: must be a finite positive number"),
    "tune batch_min not a power of two": (TuneConfig, {"batch_min": 12}, "batch_min: must be a power of two"),
    "tune batch_max not a power of two": (TuneConfig, {"batch_max": 100}, "batch_max: must be a power of two"),
    "tune batch range inverted": (TuneConfig, {"batch_min": 256, "batch_max": 64}, "batch_min: must not exceed batch_max (64)"),
    "tune sampler unknown": (TuneConfig, {"sampler": "grid"}, "sampler: unknown value 'grid'; allowed: tpe, tpe-multivariate, random, gp"),
    "tune pruner unknown": (TuneConfig, {"pruner": "foo"}, "pruner: unknown value 'foo'; allowed: asha, median, hyperband, none"),
    "tune workers negative": (TuneConfig, {"workers": -1}, "workers: must be 0 (run no trials here) or more"),
    "tune storage empty": (TuneConfig, {"storage": ""}, "storage: must not be empty"),
    "tune study_name empty": (TuneConfig, {"study_name": ""}, "study_name: must not be empty"),
    "tune device unknown": (TuneConfig, {"device": "tpu"}, "device: unknown device 'tpu'"),
}


@pytest.mark.parametrize("case", RULES)
def test_a_value_breaking_a_rule_is_refused_naming_the_parameter(case):
    config_class, values, message = RULES[case]
    with pytest.raises(ConfigError) as refused:
        config_class(**values).validate()
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
    assert refused.value.param == message.split(":")[0]


@pytest.mark.parametrize("config_class", [PrepareConfig, TrainConfig, EvaluateConfig, TuneConfig])
def test_the_defaults_meet_every_rule(config_class):
    config_class(**({"model_uri": "abc"} if config_class is EvaluateConfig else {})).validate()


# (config class, flags, message): what argparse refuses before any config exists.
FLAGS = {
    "prepare flag abbreviated": (PrepareConfig, ["--val-frac", "0.2"], "arguments: unknown parameter --val-frac"),
    "prepare val_fraction text": (PrepareConfig, ["--val-fraction", "abc"], "val_fraction: invalid float value: 'abc'"),
    "prepare seed text": (PrepareConfig, ["--seed", "abc"], "seed: invalid int value: 'abc'"),
    "train flag abbreviated": (TrainConfig, ["--epoch", "1"], "arguments: unknown parameter --epoch (not one of cnnexp train's"),
    "train flag unknown": (TrainConfig, ["--epochs", "1", "--learning-rate", "0.1"], "unknown parameter --learning-rate"),
    "train lr text": (TrainConfig, ["--lr", "abc"], "lr: invalid float value: 'abc'"),
    "train batch_size fraction": (TrainConfig, ["--batch-size", "1.5"], "batch_size: invalid int value: '1.5'"),
    "train epochs text": (TrainConfig, ["--epochs", "abc"], "epochs: invalid int value: 'abc'"),
    "evaluate flag abbreviated": (EvaluateConfig, ["--model", "abc"], "unknown parameter --model"),
    "tune flag abbreviated": (TuneConfig, ["--n-trial", "1"], "unknown parameter --n-trial"),
    "tune n_trials text": (TuneConfig, ["--n-trials", "abc"], "--n-trials/--n_trials: invalid int value: 'abc'"),
    "tune retrain_best not a bool": (TuneConfig, ["--retrain-best", "maybe"], "retrain-best/--retrain_best: expected true or false"),
}


@pytest.mark.parametrize("case", FLAGS)
def test_a_bad_flag_is_refused_by_the_parser_naming_it(case):
    config_class, flags, message = FLAGS[case]
    prog = "cnnexp " + config_class.__name__.removesuffix("Config").lower()
    with pytest.raises(ConfigError) as refused:
        make_parser(prog, "", config_class).parse_args(flags)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_under_mlflow_run_an_unknown_parameter_is_named_as_its_p_and_the_help_as_a_command():
    """`mlflow run -P epoch=1` reaches the entry point as `--epoch 1`; `train --help` is no command of the user's."""
    with pytest.raises(ConfigError) as refused:
        make_parser("train", "", TrainConfig).parse_args(["--epoch", "1"])
    assert str(refused.value) == ("arguments: unknown parameter -P epoch (not one of train's; `cnnexp train --help` "
                                  "lists them)")


def test_config_holds_configs_not_helpers():
    """Verbosity and the ranking rule live in their own modules (cnnexp.verbosity, cnnexp.ranking)."""
    import inspect

    from cnnexp import config

    functions = [name for name, value in vars(config).items()
                 if inspect.isfunction(value) and value.__module__ == config.__name__ and not name.startswith("_")]
    assert functions == []
    assert config.CompareConfig().sort_by == config.RANKING_METRIC  # the default comes from cnnexp.ranking
