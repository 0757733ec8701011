"""``make demo``: start a worker in the background, send it tasks, print their results.

    python examples/demo.py                                   # embedded SQLite, no server
    python examples/demo.py --broker redis://localhost:6379/0 # or amqp://guest@localhost//

With ``--broker``, results go to ``--backend`` (default: the same Redis, or ``rpc://`` for
an AMQP broker). The worker's log goes to a file; the demo prints its start.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUEUE = "celeriac-demo"
LOG = Path(tempfile.gettempdir()) / "celeriac-demo-worker.log"


def start_worker() -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "celeriac", "-A", "tasks", "worker"]
    cmd += ["-l", "info", "-P", "solo", "-Q", QUEUE]
    print("demo: starting a worker in the background:", " ".join(["celeriac", *cmd[3:]]))
    print(f"demo: its log goes to {LOG}")
    with LOG.open("wb") as log:
        return subprocess.Popen(
            cmd, cwd=HERE, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )


def show_log(last: int | None = None) -> None:
    lines = LOG.read_text(errors="replace").splitlines()
    for line in lines[-last:] if last else lines:
        print(f"  | {line}")


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)  # warm shutdown
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=10)
    print(f"demo: worker stopped (exit status {worker.returncode})")


def send_tasks() -> None:
    from tasks import add, app, div

    app.conf.update(task_default_queue=QUEUE, result_expires=3600)
    print(f"demo: broker {app.broker_url_masked}, results in {app.backend_url_masked}")

    result = add.delay(4, 4)
    print(f"demo: add.delay(4, 4) -> task {result.id}")
    print(f"demo: .get(timeout=30) -> {result.get(timeout=30)!r}")
    print("demo: the worker so far:")
    show_log()

    results = [add.delay(i, i) for i in range(10)]
    print(f"demo: ten more additions -> {[r.get(timeout=10) for r in results]}")

    failing = div.delay(1, 0)
    value = failing.get(timeout=10, propagate=False)
    print(f"demo: div.delay(1, 0) -> state {failing.state}, result {value!r}")

    start, n = time.perf_counter(), 1000
    pending = [add.delay(i, 1) for i in range(n)]
    total = sum(r.get(timeout=30) for r in pending)
    seconds = time.perf_counter() - start
    print(f"demo: {n} tasks sent and their results read back in {seconds:.2f} s (sum {total})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--broker", help="broker URL (default: the embedded SQLite file)")
    parser.add_argument("--backend", help="result backend URL (default: see above)")
    args = parser.parse_args()
    if args.broker:  # Celery's environment variables, read by the worker and by this process
        backend = args.backend or ("rpc://" if args.broker.startswith("amqp") else args.broker)
        os.environ["CELERY_BROKER_URL"] = args.broker
        os.environ["CELERY_RESULT_BACKEND"] = backend
    elif args.backend:
        parser.error("--backend needs --broker")

    os.chdir(HERE)  # the worker and this process share tasks.py (and its SQLite file)
    sys.path.insert(0, str(HERE))
    worker = start_worker()
    try:
        send_tasks()
    except BaseException:
        print("demo: failed; the worker's log ends with:")
        show_log(last=30)
        raise
    finally:
        stop_worker(worker)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
