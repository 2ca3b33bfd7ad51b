"""End-to-end throughput: a job through the public API on local agents vs the bare model.

Runs the same stack and job as `make demo --once` (server, two sandboxed CPU
agents, N sentences over REST, every result checked against the model), and
measures the bare model in this process, before and after, in the same run.
The agents get one torch thread each on this 2-core machine and the bare model
its default of one per core, so both sides have the same cores. Last line: one
JSON object of the figures; `ratio_vs_bare` is warm end-to-end items/s over
bare items/s, `orchestration_ms_per_task` the warm run's time beyond the bare
model's for the same items, per task.

    python -m bench.e2e [--items 10000]
"""

from __future__ import annotations

import argparse
import sys

from bench._args import positive_int
from marketplace.demo import run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=positive_int, default=10_000)
    args = parser.parse_args()
    sys.exit(run(once=True, items=args.items, port=0))


if __name__ == "__main__":
    main()
