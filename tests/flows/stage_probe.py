"""A stand-in stage for the warm-start runner tests: ``python -m tests.flows.stage_probe``.

Prints its working folder, arguments, an environment variable and torch's thread count as
a result line, then a line from an atexit handler. ``--sleep-child`` first starts a
``sleep 60`` child, prints its pid and waits (a stage that only a kill ends); ``--exit N``
exits with N after printing.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import subprocess
import sys


def main() -> int:
    atexit.register(print, "atexit handler ran", flush=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--exit", type=int, default=0)
    parser.add_argument("--sleep-child", action="store_true")
    args = parser.parse_args()
    if args.sleep_child:
        child = subprocess.Popen(["sleep", "60"])
        print(child.pid, flush=True)
        child.wait()
    import torch

    result = {
        "argv": sys.argv[1:],
        "cwd": os.getcwd(),
        "probe_env": os.environ.get("XL_PROBE"),
        "parent_only": os.environ.get("XL_PARENT_ONLY"),
        "threads": torch.get_num_threads(),
        "preloaded": "mlflow" in sys.modules,
    }
    print("to stderr", file=sys.stderr)
    print("XLEARNER_RESULT " + json.dumps(result))
    return args.exit


if __name__ == "__main__":
    sys.exit(main())
