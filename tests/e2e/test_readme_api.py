"""README's notebook example (section "From Python"), run as written in a fresh working directory."""
import re

from helpers import REPO


def readme_python_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readmes_notebook_example_runs_as_written(workdir, capsys):
    code = readme_python_example()
    assert "import cnnexp" in code
    names = {}
    exec(compile(code, "README.md", "exec"), names)  # noqa: S102 - the README's own code, as a reader runs it
    trained, tuned, board = names["trained"], names["tuned"], names["board"]
    assert trained.model_uri == f"runs:/{trained.run_id}/model"
    assert set(tuned.best_params) == {"lr", "batch_size"} and tuned.best_params["batch_size"] in (16, 32, 64, 128, 256, 512, 1024)
    assert len(board) == 3  # the training run and the two trials
    out = capsys.readouterr().out
    assert f"run {trained.run_id}" in out  # the non-quiet call printed as `cnnexp train` does
    assert "trial " not in out  # the quiet ones did not
