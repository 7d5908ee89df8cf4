"""Time bounds for grader tests (tests/test_grader.py, tests/test_reliability.py) taken from the grader's own
contract, not from a wall clock: an answer that takes longer than `timeout` counts as wrong and costs one
worker restart, and a restart's time is measured on the machine running the test (seconds when idle, many
more beside busy processes).
Not a test file; its users: python -m pytest -q tests/test_grader.py tests/test_reliability.py
"""
import threading
import time

from nanoufo.grader import Grader


def started_grader() -> tuple[Grader, float]:
    """A grader whose worker is running, and the seconds its start took (a restart costs about as much)."""
    grader = Grader()
    start = time.monotonic()
    grader.grade(["1"], ["1"])
    return grader, time.monotonic() - start


def contract_bound(n_timeouts: int, timeout: float, restart_s: float) -> float:
    """The longest a grade call may take when n_timeouts answers time out: each waits `timeout`, then the
    worker restarts (twice the measured start, as start-up varies under load); 10 s for everything else."""
    return n_timeouts * (timeout + 2 * restart_s) + 10.0


def grade_in_thread(grader, answers: list[str], golds: list[str], timeout: float,
                    wall_limit: float) -> tuple[list[bool], float, bool]:
    """grader.grade(answers, golds, timeout) in a daemon thread, so a hung grader cannot hang the test.

    Returns (verdicts, seconds taken, whether the call was still running after wall_limit seconds)."""
    verdicts = []
    worker = threading.Thread(target=lambda: verdicts.extend(grader.grade(answers, golds, timeout=timeout)),
                              daemon=True)
    start = time.monotonic()
    worker.start()
    worker.join(timeout=wall_limit)
    return verdicts, time.monotonic() - start, worker.is_alive()
