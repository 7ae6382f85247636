"""What the benchmark scripts share: progress lines, and writing and printing their figures."""

import json
import os
import time

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "bench")


def step(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write(name, results):
    """Writes target/bench/<name> (read by bench/run.py) and prints each figure."""
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(results, f, indent=2)
    for key, value in results.items():
        print(f"{key:<40} {value:>14,.2f}")
