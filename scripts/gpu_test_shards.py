"""Run `pytest -m gpu` as N pytest processes at once on one GPU machine, each over every N-th test id.

The GPU tests spend most of their time compiling Triton kernels on the CPU, one at a time per process; on the
device machine (16 cores) six processes ran the 147 tests in about a third of the time of one (session 24). Each
shard's output goes to <logdir>/shard<i>.log; the summary lines are printed at the end, and the exit status is
non-zero if any shard failed or timed out.

    python scripts/gpu_test_shards.py 6 --timeout 470 --logdir /tmp/gpu_logs [tests/test_kernels.py ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def gpu_test_ids(paths: list[str]) -> list[str]:
    """The node ids `pytest -m gpu [paths]` would run, in collection order."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "--co", "-q", "-p", "no:cacheprovider", *paths]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "::" in line]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shards", type=int)
    p.add_argument("--timeout", type=float, default=470.0, help="seconds per shard")
    p.add_argument("--logdir", type=Path, default=Path("gpu_test_logs"))
    p.add_argument("paths", nargs="*", help="test files or directories to collect from (default: the whole suite)")
    args = p.parse_intermixed_args()
    if args.shards < 1:
        p.error("shards must be >= 1")
    args.logdir.mkdir(parents=True, exist_ok=True)
    ids = gpu_test_ids(args.paths)
    procs = []
    for i in range(args.shards):
        shard = ids[i :: args.shards]
        if not shard:
            continue
        (args.logdir / f"shard{i}.txt").write_text("\n".join(shard) + "\n")
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider"]
        log = open(args.logdir / f"shard{i}.log", "w")
        procs.append((i, log, subprocess.Popen([*cmd, *shard], stdout=log, stderr=subprocess.STDOUT)))
    failed = False
    for i, log, proc in procs:
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timed out"
        log.close()
        lines = (args.logdir / f"shard{i}.log").read_text().splitlines()
        print(f"shard {i}: rc {rc}; {lines[-1] if lines else 'no output'}")
        failed |= rc != 0
    print(f"{len(ids)} GPU tests in {len(procs)} shards; logs in {args.logdir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
