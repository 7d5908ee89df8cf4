"""A wall-time bound for grader tests (tests/test_grader.py, tests/test_reliability.py)."""
import threading
import time


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
