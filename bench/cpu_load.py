"""A deliberate, bounded second job for benchmark checks: a torch matmul loop on the CPU.

    python bench/cpu_load.py --seconds 300 --threads 2 &    # then run the benchmark, then kill it

It stops by itself after --seconds (so a forgotten one cannot run on), and prints how many matmuls it did.
torch's OpenMP threads keep their default wait policy (they spin), as an unrelated job's would.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="stop after this long (default 300)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--size", type=int, default=384, help="square matmul side (default 384)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.threads <= 0 or args.size <= 0:
        print("cpu_load.py: error: --seconds, --threads and --size must be positive", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    a = torch.randn(args.size, args.size)
    b = torch.randn(args.size, args.size)
    end = time.monotonic() + args.seconds
    count = 0
    while time.monotonic() < end:
        c = a @ b
        a = torch.tanh(c)  # keeps values bounded; a fresh result each time
        count += 1
    print(f"cpu_load.py: {count} matmuls of {args.size}² on {args.threads} threads in {args.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
