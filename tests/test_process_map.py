"""skyloom.process_map: results in order from worker processes, errors and Ctrl-C as in one process."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from skyloom.process_map import process_map


def square(x: int) -> int:
    return x * x


def fail_on_seven(x: int) -> int:
    if x == 7:
        raise ValueError(f"item {x} is bad")
    return x


def worker_pid(_) -> int:
    return os.getpid()


def die_on_five(x: int) -> int:
    if x == 5:
        os._exit(1)  # as a process the system stops for lack of memory: no exception to pass back
    return x


@pytest.mark.parametrize("workers, chunk", [(1, 16), (2, 3), (3, 1)])
def test_results_come_in_the_items_order(workers, chunk):
    assert list(process_map(square, range(40), workers, chunk=chunk)) == [x * x for x in range(40)]


def test_one_worker_or_one_chunk_stays_in_this_process_and_more_use_others():
    assert set(process_map(worker_pid, range(20), 1, chunk=4)) == {os.getpid()}
    assert set(process_map(worker_pid, range(4), 2, chunk=4)) == {os.getpid()}
    assert os.getpid() not in set(process_map(worker_pid, range(20), 2, chunk=4))


@pytest.mark.parametrize("workers, before", [(1, 7), (2, 6)])
def test_a_workers_error_is_raised_as_it_was_raised_there(workers, before):
    done = []
    with pytest.raises(ValueError, match="item 7 is bad"):
        for result in process_map(fail_on_seven, range(20), workers, chunk=2):
            done.append(result)
    assert done == list(range(before))  # in order; with workers, up to the bad item's chunk


def test_a_worker_that_dies_is_reported_with_what_to_do():
    with pytest.raises(RuntimeError, match="a worker process died .* run again with fewer workers, or 1"):
        list(process_map(die_on_five, range(20), 2, chunk=2))


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_bad_worker_counts_are_refused(workers):
    with pytest.raises(ValueError, match=f"workers must be a whole number of processes, at least 1, got {workers!r}"):
        list(process_map(square, range(3), workers))


def test_ctrl_c_stops_early_and_lets_running_items_finish(tmp_path):
    # Ctrl-C in a terminal signals the whole process group: the parent and its workers.
    script = tmp_path / "slow.py"
    script.write_text(textwrap.dedent(f"""
        import signal, sys, time
        from pathlib import Path
        from skyloom.process_map import process_map

        OUT = Path({str(tmp_path)!r})

        def slow(item):
            (OUT / f"{{item}}.started").touch()
            time.sleep(0.3)
            (OUT / f"{{item}}.done").touch()
            return item

        if __name__ == "__main__":
            # As in a terminal: a job started with & from a script inherits SIGINT ignored.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                for item in process_map(slow, range(200), 2, chunk=1):
                    print(item, flush=True)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
                sys.exit(130)
    """))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    first = process.stdout.readline()  # the workers are up and results are coming
    assert first.strip() == "0"
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 130 and out.splitlines()[-1] == "interrupted"
    started = {p.stem for p in tmp_path.glob("*.started")}
    done = {p.stem for p in tmp_path.glob("*.done")}
    assert started == done  # no item was cut off half-way
    assert 2 <= len(done) < 100  # it stopped handing out items: all 200 take 30 s on two workers
