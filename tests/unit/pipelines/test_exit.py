"""exit_at_once skips the interpreter's teardown, not what a normal exit does that matters."""
import subprocess
import sys

CODE = """
import atexit, concurrent.futures, threading, time
from pipelines.running import exit_at_once
pool = concurrent.futures.ThreadPoolExecutor(2)  # kept, as MLflow keeps its downloads' pool: idle workers
pool.submit(time.sleep, 0.01).result()
def late_write():
    time.sleep(0.3)
    open(PATH, "w").write("written")
threading.Thread(target=late_write).start()
atexit.register(lambda: print("atexit handler ran"))
print("the command's last line", end="")  # unflushed: stdout is a pipe here
exit_at_once(3)
print("never")
"""


def test_exit_at_once_waits_for_threads_stops_idle_pools_runs_atexit_flushes_and_keeps_the_code(tmp_path):
    path = tmp_path / "thread.txt"
    done = subprocess.run([sys.executable, "-c", f"PATH = {str(path)!r}\n{CODE}"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "the command's last lineatexit handler ran\n"
    assert path.read_text() == "written"
