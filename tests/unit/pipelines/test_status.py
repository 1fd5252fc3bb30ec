"""pipelines.status: a status line whenever a study's output has been silent for the interval, never otherwise."""
import re
import time

from helpers import write_idx_dir
from cnnexp.tuning import trials
from pipelines import status, tune


def _status_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line == "status"]


def test_a_silent_stretch_gets_a_line_every_interval_and_printing_holds_it_off(capsys):
    with status.StatusLine(lambda: "status", interval=0.2):
        time.sleep(0.7)
        silent = len(_status_lines(capsys.readouterr().out))
        for _ in range(8):  # something printed every 0.1 s: no status line is needed
            print("busy", flush=True)
            time.sleep(0.1)
        busy = capsys.readouterr().out
    time.sleep(0.3)
    assert 2 <= silent <= 4
    assert not _status_lines(busy) and busy.count("busy") == 8
    assert not capsys.readouterr().out  # stopped with the block


def test_a_failing_status_skips_its_line_and_keeps_watching(capsys):
    calls = []

    def describe():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("storage hiccup")
        return "status"

    with status.StatusLine(describe, interval=0.1):
        time.sleep(0.45)
    assert len(calls) >= 2 and _status_lines(capsys.readouterr().out)


def test_tune_prints_a_status_line_while_trials_train_silently(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(status, "INTERVAL_S", 0.3)
    log_epoch = trials.log_child_epoch

    slowed = []

    def slow_first_epoch(*args, **kwargs):  # one silence longer than the interval, however fast the machine
        if not slowed:
            slowed.append(True)
            time.sleep(0.4)
        return log_epoch(*args, **kwargs)

    monkeypatch.setattr(trials, "log_child_epoch", slow_first_epoch)
    source = write_idx_dir(tmp_path / "idx", n_train=400, n_test=50)
    assert tune.cli(["--n-trials", "2", "--epochs", "3", "--pruner", "none", "--source", str(source)]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = [i for i, line in enumerate(lines)
             if re.fullmatch(r"tune: \d+ s, [0-2] of 2 trials done, [0-2] running( \(epoch [1-3] of 3 done\))?, "
                             r"best val_accuracy (-|\d\.\d{4} \(trial \d\))", line)]
    assert shown, lines
    assert max(shown) < next(i for i, line in enumerate(lines) if line.startswith("done: "))
