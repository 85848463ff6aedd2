"""Run `pytest -m gpu` as N pytest processes at once on one GPU machine, each over every N-th test id.

The GPU tests spend most of their time compiling Triton kernels on the CPU, one at a time per process; on the
device machine (16 cores) six processes ran the 147 tests in about a third of the time of one (session 24). Each
shard's output goes to <logdir>/shard<i>.log, one line per test (`pytest -v`, with pytest's summary); each shard's
outcome counts and the total are printed at the end, and the exit status is non-zero if any shard failed or timed
out.

The whole suite takes more than one device call (10 minutes each), so `--skip-ran DIR` leaves out the tests whose
outcome an earlier call's logs already hold (their PASSED / FAILED / ... lines), and the next call runs the rest:

    python scripts/gpu_test_shards.py 6 --timeout 470 --logdir /tmp/gpu_logs [tests/test_kernels.py ...]
    python scripts/gpu_test_shards.py 6 --timeout 470 --logdir /tmp/gpu_logs2 --skip-ran /tmp/gpu_logs
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

# `pytest -v` reports each test as "<node id> <OUTCOME>" followed by a progress percentage
_OUTCOME = re.compile(r"^(\S+::.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def gpu_test_ids(paths: list[str]) -> list[str]:
    """The node ids `pytest -m gpu [paths]` would run, in collection order."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "--co", "-q", "-p", "no:cacheprovider", *paths]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "::" in line]


def outcomes(log_text: str) -> dict[str, str]:
    """Node id -> outcome for every test a `pytest -v` log reports as finished."""
    found = {}
    for line in log_text.splitlines():
        m = _OUTCOME.match(line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def tally(done: dict[str, str]) -> str:
    """Outcomes by count ("11 PASSED, 1 XFAIL"): the runner's own summary, not pytest's last line, whose "N warnings"
    a `grep -v warn` over the output would drop with the counts (sessions 28 and 34)."""
    return ", ".join(f"{n} {outcome}" for outcome, n in sorted(Counter(done.values()).items())) or "none finished"


def ran_before(logdir: Path) -> dict[str, str]:
    """Outcomes from every shard log of an earlier run (a missing folder is an error, not an empty set)."""
    if not logdir.is_dir():
        raise FileNotFoundError(f"--skip-ran: no such folder {logdir}")
    found = {}
    for log in sorted(logdir.glob("*.log")):
        found.update(outcomes(log.read_text(errors="replace")))
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shards", type=int)
    p.add_argument("--timeout", type=float, default=470.0, help="seconds for all shards (they run at once)")
    p.add_argument("--logdir", type=Path, default=Path("gpu_test_logs"))
    p.add_argument("--skip-ran", type=Path, action="append", default=[], help="an earlier --logdir (repeatable)")
    p.add_argument("paths", nargs="*", help="test files or directories to collect from (default: the whole suite)")
    args = p.parse_intermixed_args()
    if args.shards < 1:
        p.error("shards must be >= 1")
    args.logdir.mkdir(parents=True, exist_ok=True)
    ids = gpu_test_ids(args.paths)
    earlier: dict[str, str] = {}
    for d in args.skip_ran:
        earlier.update(ran_before(d))
    if earlier:
        counts = dict(Counter(earlier.values()))
        print(f"skipping {sum(i in earlier for i in ids)} tests an earlier run finished: {counts}")
        ids = [i for i in ids if i not in earlier]
    procs = []
    for i in range(args.shards):
        shard = ids[i :: args.shards]
        if not shard:
            continue
        (args.logdir / f"shard{i}.txt").write_text("\n".join(shard) + "\n")
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfE", "-p", "no:cacheprovider"]
        log = open(args.logdir / f"shard{i}.log", "w")
        procs.append((i, len(shard), log, subprocess.Popen([*cmd, *shard], stdout=log, stderr=subprocess.STDOUT)))
    failed = False
    finished: dict[str, str] = {}
    deadline = time.monotonic() + args.timeout  # one limit for all: waiting on each in turn would add them up
    for i, n, log, proc in procs:
        try:
            rc = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timed out"
        log.close()
        text = (args.logdir / f"shard{i}.log").read_text(errors="replace")
        done = outcomes(text)
        finished.update(done)
        print(f"shard {i}: rc {rc}; {len(done)} of {n} finished: {tally(done)}")
        for node, outcome in done.items():
            if outcome in ("FAILED", "ERROR"):
                print(f"  {outcome} {node}")
        failed |= rc != 0
    print(f"{len(ids)} GPU tests in {len(procs)} shards: {tally(finished)}; logs in {args.logdir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
