"""How fast ShapeWorld renders (images per second on this machine, one process).

Usage: python benchmarks/bench_shapeworld.py [--n 4096] [--size 32]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fewclip_tutorial.data import shapeworld as sw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--size", type=int, default=32)
    a = p.parse_args()
    f = sw.sample_factors(a.n, np.random.default_rng(0))
    sw.render(f.take(np.arange(64)), a.size)  # warm-up
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        sw.render(f, a.size)
        best = min(best, time.perf_counter() - t)
    print(f"rendered {a.n} images of {a.size}x{a.size} px: {a.n / best:,.0f} images/s (best of 3)")


if __name__ == "__main__":
    main()
