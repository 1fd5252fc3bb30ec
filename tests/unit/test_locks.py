"""cnnexp.locks: file_lock lets one process at a time through, and lets go when its block raises."""
import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from cnnexp.locks import file_lock

HOLD_S = 0.3


def _hold(lock_path: str, log_path: str, name: str) -> None:
    """In another process: take the lock, note when it was held, keep it HOLD_S seconds."""
    with file_lock(Path(lock_path)):
        with open(log_path, "a") as log:
            log.write(f"{name} {time.time()}\n")
        time.sleep(HOLD_S)
        with open(log_path, "a") as log:
            log.write(f"{name} {time.time()}\n")


def test_processes_take_the_lock_one_at_a_time(tmp_path):
    context = multiprocessing.get_context("fork")  # the lock between processes is what is tested; fork starts fast
    log = tmp_path / "held.log"
    processes = [context.Process(target=_hold, args=(str(tmp_path / ".x.lock"), str(log), name)) for name in "ab"]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=30)
    assert [p.exitcode for p in processes] == [0, 0]
    lines = [line.split() for line in log.read_text().splitlines()]
    assert [name for name, _ in lines] in (list("aabb"), list("bbaa"))  # never interleaved
    first_end, second_start = float(lines[1][1]), float(lines[2][1])
    assert second_start >= first_end


def test_the_lock_is_let_go_when_its_block_raises(tmp_path):
    lock = tmp_path / ".x.lock"
    with pytest.raises(RuntimeError), file_lock(lock):
        raise RuntimeError("prepare failed")
    taken = threading.Event()

    def take_again():
        with file_lock(lock):  # flock on a new open file: it would wait forever if the lock were still held
            taken.set()

    threading.Thread(target=take_again, daemon=True).start()
    assert taken.wait(5)


def test_a_held_lock_makes_another_holder_wait(tmp_path):
    lock, entered = tmp_path / ".x.lock", threading.Event()

    def other():
        with file_lock(lock):
            entered.set()

    with file_lock(lock):
        thread = threading.Thread(target=other, daemon=True)
        thread.start()
        assert not entered.wait(HOLD_S)  # waits while this one holds it
    assert entered.wait(5)
    thread.join()
