"""Decode time per token: this runtime vs Accelerate's disk offload vs the floors, in one run.

Same as `offload bench`; see `offload bench --help`. Example (README table):
    python benchmarks/bench_model.py --random bloom-1b7 --dtype fp32 --json bench-out/bloom-1b7-fp32.json
"""
import sys

from offload.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
