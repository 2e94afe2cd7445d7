"""Summarises a cupti_trace.c timeline: where the device idles in one steady training step.

    python3 timeline.py trace.csv step [MARK]   # the span between the ends of the last two
                                                # groups of kernels whose name holds MARK (adamw)
    python3 timeline.py trace.csv totals        # kernel time by name over the whole run

For the step: device busy and idle time; each gap between kernels classified by what sat in
it on the stream (a host-to-device copy, a memset, nothing) and whether the host had not yet
issued the next kernel when the device went idle ("host late"); the driver calls of the step
by thread; the largest gaps; kernel time by name.
"""
import collections
import sys


def load(path):
    kernels, apis, copies = [], [], []
    for line in open(path, errors="replace"):
        parts = line.rstrip("\n").split(",", 5)
        if len(parts) < 6:
            continue
        kind, start, end, where, corr, name = parts
        rec = (int(start), int(end), int(where), int(corr), name)
        if kind == "K":
            kernels.append(rec)
        elif kind == "A":
            apis.append(rec)
        else:
            copies.append(rec[:4] + (kind + name,))
    return sorted(kernels), sorted(apis), sorted(copies)


def by_name(kernels, top):
    total, calls = collections.defaultdict(int), collections.Counter()
    for s, e, _, _, n in kernels:
        total[n] += e - s
        calls[n] += 1
    for n, ns in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{ns / 1e6:9.3f} ms {calls[n]:6d} {ns / calls[n] / 1e3:9.1f} us  {n[:120]}")


def step(kernels, apis, copies, mark):
    marked = [i for i, k in enumerate(kernels) if mark in k[4]]
    groups = []
    for i in marked:
        if groups and i - groups[-1][-1] <= 64:
            groups[-1].append(i)
        else:
            groups.append([i])
    if len(groups) < 2:
        sys.exit(f"fewer than two groups of '{mark}' kernels: no whole step in the trace")
    lo, hi = groups[-2][-1] + 1, groups[-1][-1] + 1
    span = kernels[lo:hi]
    t0, t1 = kernels[lo - 1][1], span[-1][1]
    on_stream = [c for c in copies if t0 <= c[0] <= t1]
    print(f"step: {len(span)} kernels, {len(on_stream)} copies/memsets, "
          f"{(t1 - t0) / 1e6:.3f} ms from the previous step's last '{mark}' kernel to this one's")

    launch = {a[3]: a for a in apis}
    events = sorted([(k[0], k[1], "K", k) for k in span] + [(c[0], c[1], c[4][0], c) for c in on_stream])
    busy, last_end, between = 0, t0, []
    gaps = collections.defaultdict(lambda: [0, 0])
    largest = []
    for s, e, kind, rec in events:
        if kind != "K":
            between.append(kind)
            continue
        gap = max(0, s - last_end)
        api = launch.get(rec[3])
        late = api is not None and api[1] > last_end and gap > 0
        key = ("host late" if late else "launched in time") + (
            ", after a host-to-device copy" if "M" in between else
            ", after a memset" if "S" in between else "")
        gaps[key][0] += gap
        gaps[key][1] += 1
        largest.append((gap, last_end, rec[4], key))
        busy += max(0, e - max(s, last_end))
        last_end = max(last_end, e)
        between = []
    print(f"device busy {busy / 1e6:.3f} ms, idle {(t1 - t0 - busy) / 1e6:.3f} ms")
    print("kernel boundaries (the idle time before each kernel):")
    for key, (ns, count) in sorted(gaps.items(), key=lambda kv: -kv[1][0]):
        print(f"  {key:55s} {count:6d}, {ns / 1e6:7.3f} ms, {ns / max(count, 1) / 1e3:6.2f} us each")

    per = collections.defaultdict(lambda: [0, 0])
    for s, e, thread, _, name in apis:
        if t0 <= s <= t1:
            per[(thread, name)][0] += e - s
            per[(thread, name)][1] += 1
    print("driver calls in the step (thread, time, calls):")
    for (thread, name), (ns, count) in sorted(per.items(), key=lambda kv: -kv[1][0])[:12]:
        print(f"  {thread:>12}: {ns / 1e6:8.3f} ms {count:6d}  {name}")
    print("largest gaps:")
    for gap, at, name, key in sorted(largest, reverse=True)[:8]:
        print(f"  {gap / 1e3:8.1f} us at {(at - t0) / 1e6:8.3f} ms before {name[:50]} ({key})")
    last = launch.get(span[-1][3])
    if last:
        print(f"host issued the step's last kernel at {(last[0] - t0) / 1e6:.3f} ms; "
              f"the device ended it at {(t1 - t0) / 1e6:.3f} ms")
    print("kernel time by name:")
    by_name(span, 40)


def main():
    path, mode = sys.argv[1], sys.argv[2]
    kernels, apis, copies = load(path)
    print(f"{path}: {len(kernels)} kernels, {len(apis)} driver calls, {len(copies)} copies/memsets")
    if mode == "totals":
        by_name(kernels, 40)
    else:
        step(kernels, apis, copies, sys.argv[3] if len(sys.argv) > 3 else "adamw")


if __name__ == "__main__":
    main()
