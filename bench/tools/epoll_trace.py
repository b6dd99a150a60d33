#!/usr/bin/python3
"""bench/tools/epoll_trace.py FILE...: summarises what bench/tools/epoll_trace.c recorded, one line
per file: waits per second, events per wait (median, mean), the time a server worked between two
waits (median, p90, p99) and the share of the window it spent blocked in epoll_wait."""
import statistics
import sys


def q(xs, p):
    return xs[min(len(xs) - 1, int(len(xs) * p))]


for path in sys.argv[1:]:
    rows = [tuple(map(int, line.split())) for line in open(path)]
    if len(rows) < 2:
        print(f"{path}: no data")
        continue
    secs = (rows[-1][1] - rows[0][1]) / 1e9
    events = sorted(max(r[2], 0) for r in rows)
    work = sorted((b[0] - a[1]) / 1e3 for a, b in zip(rows, rows[1:]))  # µs after each return
    blocked = sum(r[1] - r[0] for r in rows[1:]) / 1e9
    print(f"{path}: {len(rows) / secs:.0f} waits/s, events per wait median {statistics.median(events):.0f} "
          f"mean {sum(events) / len(events):.1f}; work between waits µs median {q(work, .5):.0f} "
          f"p90 {q(work, .9):.0f} p99 {q(work, .99):.0f}; blocked {100 * blocked / secs:.1f} %")
