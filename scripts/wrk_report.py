# scripts/wrk_report.py: reading wrk's output, for the reports of `make bench`'s side sections
# (scripts/bench_equal_load.sh, scripts/bench_access_log.sh import it): latencies in ms, the
# request count and rate, the errors line, and the median of the rounds that have a figure.
import os
import re
import statistics

NAN = float("nan")


def ms(v):
    """A wrk latency ("512.00us", "1.20ms", "2.01s") in ms; NaN when it is not one."""
    m = re.match(r"([\d.]+)(us|ms|s)$", v)
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else NAN


def parse_wrk(path):
    """{p50, p90, p99 (ms), n (requests), rps, errors (the line, when any)} of a `wrk --latency`
    output file; {} when there is no such file."""
    d = {}
    if not os.path.exists(path):
        return d
    for line in open(path):
        m = re.match(r"\s+(50|90|99)(?:\.000)?%\s+(\S+)", line)
        if m:
            d["p" + m.group(1)] = ms(m.group(2))
        m = re.match(r"\s*(\d+) requests in", line)
        if m:
            d["n"] = int(m.group(1))
        m = re.match(r"Requests/sec:\s+([\d.]+)", line)
        if m:
            d["rps"] = float(m.group(1))
        if "Non-2xx" in line or "Socket errors" in line:
            d["errors"] = line.strip()
    return d


def med(xs):
    """The median of the numbers that are not NaN; NaN when none is."""
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else NAN
