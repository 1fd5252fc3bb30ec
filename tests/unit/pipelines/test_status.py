"""pipelines.status: a status line whenever a study's output has been silent for the interval, never otherwise."""
import queue
import re
import threading

from helpers import write_idx_dir
from cnnexp.tuning import trials
from pipelines import status, tune


def _status_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line == "status"]


class FakeClock:
    """status's time.monotonic, moved on only by the test: the watcher's real waits last at most `interval`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def _watched(monkeypatch, describe, interval=0.01):
    """A StatusLine on a fake clock, and a semaphore released at each of its watcher's wake-ups."""
    clock = FakeClock()
    monkeypatch.setattr(status, "time", clock)
    line = status.StatusLine(describe, interval=interval)
    wait, woke = line.stop.wait, threading.Semaphore(0)
    line.stop.wait = lambda timeout: (wait(timeout), woke.release())[0]
    return line, clock, woke


def _after_two_wake_ups(woke: threading.Semaphore) -> None:
    """The second wake-up began after whatever the test did before: the watcher has seen it."""
    for _ in range(2):
        assert woke.acquire(timeout=30)


def test_a_silent_stretch_gets_a_line_every_interval_and_printing_holds_it_off(monkeypatch, capsys):
    lines = queue.Queue()
    line, clock, woke = _watched(monkeypatch, lambda: lines.put("status") or "status")
    with line:
        for _ in range(3):  # silent for longer than an interval, three times: a line each time
            clock.now += 1
            lines.get(timeout=30)
        _after_two_wake_ups(woke)
        silent = len(_status_lines(capsys.readouterr().out))
        for _ in range(8):  # something printed every half interval, for four intervals: no status line is needed
            print("busy", flush=True)
            clock.now += 0.005
            _after_two_wake_ups(woke)
        busy = capsys.readouterr().out
    clock.now += 1
    assert silent == 3 and lines.empty()
    assert not _status_lines(busy) and busy.count("busy") == 8
    assert not capsys.readouterr().out  # stopped with the block


def test_a_failing_status_skips_its_line_and_keeps_watching(monkeypatch, capsys):
    called, failed = threading.Semaphore(0), []

    def describe():
        called.release()
        if not failed:
            failed.append(True)
            raise OSError("storage hiccup")
        return "status"

    line, clock, _ = _watched(monkeypatch, describe)
    with line:
        for _ in range(2):  # the failed line's silence starts again, so a second interval is needed
            clock.now += 1
            assert called.acquire(timeout=30)
    assert _status_lines(capsys.readouterr().out) == ["status"]


def test_tune_prints_a_status_line_while_trials_train_silently(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(status, "INTERVAL_S", 0.3)
    shown, real_status_text = threading.Event(), status.counts.status_text
    monkeypatch.setattr(status.counts, "status_text", lambda *args: (real_status_text(*args), shown.set())[0])
    log_epoch, held = trials.log_child_epoch, []

    def held_until_a_status_line(*args, **kwargs):  # the first epoch's record waits: a silence, however fast the machine
        if not held:
            held.append(True)
            assert shown.wait(60)
        return log_epoch(*args, **kwargs)

    monkeypatch.setattr(trials, "log_child_epoch", held_until_a_status_line)
    source = write_idx_dir(tmp_path / "idx", n_train=400, n_test=50)
    assert tune.cli(["--n-trials", "2", "--epochs", "3", "--pruner", "none", "--source", str(source)]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = [i for i, line in enumerate(lines)
             if re.fullmatch(r"tune: \d+ s, [0-2] of 2 trials done, [0-2] running( \(epoch [1-3] of 3 done\))?, "
                             r"best val_accuracy (-|\d\.\d{4} \(trial \d\))", line)]
    assert shown, lines
    assert max(shown) < next(i for i, line in enumerate(lines) if line.startswith("done: "))
