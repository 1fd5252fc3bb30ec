"""cnnexp.processes: a process that has ended counts as gone, even before it is reaped (a zombie)."""
import os
import socket
import subprocess
import sys
import time

from cnnexp.processes import alive, is_dead, owner


def test_an_ended_process_is_gone_before_and_after_it_is_reaped_and_this_one_is_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while alive(child.pid) and time.monotonic() < deadline:  # not reaped (no wait yet): a zombie once it ends
        time.sleep(0.05)
    assert not alive(child.pid)
    child.wait()
    assert not alive(child.pid) and alive(os.getpid())


def test_only_this_hosts_processes_can_be_called_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert is_dead({"host": socket.gethostname(), "pid": child.pid})
    assert not is_dead({"host": "another-machine", "pid": child.pid}) and not is_dead({"host": socket.gethostname()})
    assert not is_dead(owner())
