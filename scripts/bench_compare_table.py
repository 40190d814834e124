#!/usr/bin/env python3
"""One table of `qtrain bench` and every peer (peer_qlora.py's recipes, peer_unsloth.py).

    python3 scripts/bench_compare_table.py [--out PREFIX] OUT_DIR [MORE_DIRS ...]

Reads what scripts/bench-compare.sh leaves in each OUT_DIR (several directories, e.g.
the results of two device commands, merge into one table):
- qtrain*-T.stamped: a qtrain bench variant's stdout (variant `qtrain`, or
  `qtrain-NAME` from QTRAIN_VARIANTS), each line prefixed by the unix time it was
  read at and a tab; a case's window runs from the previous line (or the time in
  the matching .start file) to its own line;
- peer*.jsonl: the peers' JSON lines (each carries t_start/t_end and `peer`, e.g.
  hf-autocast, hf-liger, hf-plain, unsloth; lines of the older peer_qlora.py,
  without `peer`, count as hf-autocast or hf-plain by their `autocast` field);
- smi-*.csv: nvidia-smi samples taken during the runs, `timestamp, memory.used [MiB]`
  or (bench-compare.sh since v12) `timestamp, memory.used, utilization.gpu, clocks.sm,
  power.draw, clocks_event_reasons.active`;
- durations.tsv: how long each phase of bench-compare.sh took (printed as is).
Lines that are not JSON objects are skipped, so every tool may log freely.

Per target set and case it prints every tool's tokens/s, step time and peak memory
(with the status of a peer that failed to import, errored or ran out of memory),
then qtrain's ratios: tokens/s against the FASTEST peer of that case and peak
memory against the peer with the LOWEST peak. Peak memory for the ratios is the
whole device's memory in use, which is what qtrain reports
(`peak_device_mem_used_mib`, total - free); for a peer it is nvidia-smi's peak inside
the case's time window, or torch's max_memory_reserved where no sample fell in it
(marked `r`). torch's allocated/reserved figures are listed too. Where the samples
carry clocks, each tool's case lists the mean SM clock and power over the samples with
the GPU busy (utilization >= 50%) and the share of them limited by power (the SW power
cap or the HW power brake): a long training step on an H100/H200 runs at its power
limit, and the clock it gets there is part of the comparison.
Writes PREFIX.json (every row) and PREFIX.md (the ratio table in Markdown, for
docs/perf.md); PREFIX defaults to OUT_DIR/compare.
"""
import argparse
import datetime
import glob
import json
import os
import sys

PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = float(1 << 30)
PEER_ORDER = ["hf-plain", "hf-autocast", "hf-liger", "unsloth"]
# A tool that produced results for some cases but not this one (crashed, timed out).
MISSING = {"kind": "?", "status": "no result"}


def target_label(targets):
    if isinstance(targets, list):
        targets = ",".join(targets)
    t = str(targets or "").strip()
    if t in ("qkvo", "all"):
        return t
    names = sorted({x.strip() for x in t.split(",") if x.strip()}, key=lambda n: PROJS.index(n) if n in PROJS else 99)
    if names == PROJS[:4]:
        return "qkvo"
    if names == PROJS:
        return "all"
    return ",".join(names) or "?"


def parse_json_line(line):
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def read_lines(path):
    with open(path, errors="replace") as f:
        return f.readlines()


def read_stamped(path):
    """[(t_start, t_end, record)] from a qtrain*.stamped file."""
    start = None
    spath = path[: -len(".stamped")] + ".start"
    if os.path.exists(spath):
        try:
            with open(spath) as f:
                start = float(f.read().strip())
        except ValueError:
            start = None
    out = []
    prev = start
    for line in read_lines(path):
        stamp, _, rest = line.partition("\t")
        try:
            t = float(stamp)
        except ValueError:
            continue
        rec = parse_json_line(rest)
        if rec is not None:
            out.append((prev, t, rec))
        prev = t
    return out


def qtrain_variant(path):
    """`qtrain-lowmem` from .../qtrain-lowmem-qkvo.stamped (the last `-T` is the target set)."""
    stem = os.path.basename(path)[: -len(".stamped")]
    variant, sep, _ = stem.rpartition("-")
    return variant if sep and variant else stem


# clocks_event_reasons bits that mean "limited by power": SW power cap, HW power brake.
POWER_LIMITED = 0x4 | 0x80


def read_smi(paths):
    """[(unix time, MiB, clocks)] from nvidia-smi csv files: `timestamp, memory.used`, or
    `timestamp, memory.used, utilization.gpu, clocks.sm, power.draw,
    clocks_event_reasons.active`, where clocks is (utilization %, SM MHz, W, power
    limited) and None for the two-column form or an unreadable field ([N/A])."""
    samples = []
    for p in paths:
        for line in read_lines(p):
            parts = [x.strip() for x in line.split(",")]
            if len(parts) < 2:
                continue
            try:
                mib = float(parts[1])
                t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            except ValueError:
                continue
            clocks = None
            if len(parts) >= 6:
                try:
                    clocks = (float(parts[2]), float(parts[3]), float(parts[4]), bool(int(parts[5], 16) & POWER_LIMITED))
                except ValueError:
                    clocks = None
            samples.append((t, mib, clocks))
    samples.sort(key=lambda x: x[0])
    return samples


def in_window(samples, t0, t1):
    """The samples of the window t0..t1 (none without both ends)."""
    if t0 is None or t1 is None:
        return []
    # nvidia-smi samples every 100 ms: a little slack keeps short windows non-empty.
    return [s for s in samples if t0 - 0.15 <= s[0] <= t1 + 0.15]


def smi_peak(samples, t0, t1):
    vals = [m for _, m, _ in in_window(samples, t0, t1)]
    return max(vals) / 1024.0 if vals else None


def smi_clocks(samples, t0, t1):
    """{sm_mhz, power_w, power_limited} over the busy samples (utilization >= 50%) in
    the window: means, and the share limited by power; {} without such samples."""
    busy = [c for _, _, c in in_window(samples, t0, t1) if c is not None and c[0] >= 50]
    if not busy:
        return {}
    n = float(len(busy))
    return {
        "sm_mhz": sum(c[1] for c in busy) / n,
        "power_w": sum(c[2] for c in busy) / n,
        "power_limited": sum(c[3] for c in busy) / n,
    }


def num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def qtrain_peak_gib(rec):
    """(GiB, key): `peak_device_mem_used_mib` when present, else the first numeric field
    with "peak" and "mem" in its name (units from its suffix, bytes without one)."""
    v = num(rec.get("peak_device_mem_used_mib"))
    if v is not None:
        return v / 1024.0, "peak_device_mem_used_mib"
    for k, v in rec.items():
        kl = k.lower()
        if "peak" not in kl or "mem" not in kl or num(v) is None:
            continue
        if kl.endswith("gib"):
            return float(v), k
        if kl.endswith("mib"):
            return v / 1024.0, k
        if kl.endswith("gb"):
            return v * 1e9 / GIB, k
        if kl.endswith("mb"):
            return v * 1e6 / GIB, k
        return v / GIB, k  # bytes
    return None, None


def peer_label(rec):
    p = rec.get("peer")
    if isinstance(p, str) and p:
        return p
    tool, recipe = rec.get("tool"), rec.get("recipe")
    if tool and recipe:
        return tool if tool == recipe else f"{tool}-{recipe}"
    # peer_qlora.py before recipes: autocast bf16 or none
    return "hf-plain" if rec.get("autocast") == "none" else "hf-autocast"


def loss_falls(rec):
    if isinstance(rec.get("loss_falls"), bool):
        return rec["loss_falls"]
    losses = rec.get("losses")
    if isinstance(losses, list) and len(losses) >= 2 and all(num(x) is not None for x in losses):
        return losses[-1] < losses[0]
    return None


def collect(dirs):
    """{(targets, case): {"targets", "case", "tools": {name: entry}}} and the row order.

    An entry: kind (qtrain/peer), status, tokens_per_s, step_s, peak_gib (the figure the
    ratios use), peak_src, allocated_gib, reserved_gib, smi_gib, loss_falls, error."""
    rows, order, envs, durations = {}, [], {}, []

    def row(label, case):
        key = (label, case)
        if key not in rows:
            rows[key] = {"targets": label, "case": case, "tools": {}}
            order.append(key)
        return rows[key]

    for d in dirs:
        smi = read_smi(sorted(glob.glob(os.path.join(d, "smi-*.csv"))))
        for path in sorted(glob.glob(os.path.join(d, "qtrain*.stamped"))):
            name = qtrain_variant(path)
            for t0, t1, rec in read_stamped(path):
                r = row(target_label(rec.get("targets")), str(rec.get("case", "?")).strip())
                g, k = qtrain_peak_gib(rec)
                tps = num(rec.get("tokens_per_s"))
                status = rec.get("status") or ("ok" if tps else "error")
                r["tools"][name] = {
                    "kind": "qtrain",
                    "status": status,
                    "error": rec.get("error"),
                    "tokens_per_s": tps,
                    "step_s": num(rec.get("step_s")),
                    "peak_gib": g,
                    "peak_src": k,
                    "smi_gib": smi_peak(smi, t0, t1),
                    "loss_falls": loss_falls(rec),
                    "dir": d,
                    **smi_clocks(smi, t0, t1),
                }
        paths = sorted(set(glob.glob(os.path.join(d, "peer*.jsonl"))))
        for path in paths:
            for line in read_lines(path):
                rec = parse_json_line(line)
                if rec is None or "case" not in rec:
                    continue
                name = peer_label(rec)
                if rec.get("torch"):
                    envs.setdefault(name, rec)
                r = row(target_label(rec.get("targets")), str(rec.get("case", "?")).strip())
                resv = num(rec.get("peak_memory_reserved_bytes"))
                alloc = num(rec.get("peak_memory_allocated_bytes"))
                smi_g = smi_peak(smi, num(rec.get("t_start")), num(rec.get("t_end")))
                ok = rec.get("status") == "ok"
                if smi_g is not None:
                    peak, src = smi_g, "nvidia-smi"
                elif resv is not None:
                    peak, src = resv / GIB, "reserved"
                else:
                    peak, src = None, None
                r["tools"][name] = {
                    "kind": "peer",
                    "status": rec.get("status") or "?",
                    "error": rec.get("error"),
                    "tokens_per_s": num(rec.get("tokens_per_s")) if ok else None,
                    "step_s": num(rec.get("step_s")) if ok else None,
                    "peak_gib": peak if ok else None,
                    "peak_src": src,
                    "allocated_gib": alloc / GIB if alloc is not None else None,
                    "reserved_gib": resv / GIB if resv is not None else None,
                    # a set-up failure's window is an instant; an OOM's peak is worth seeing
                    "smi_gib": smi_g if rec.get("status") in ("ok", "oom") else None,
                    "loss_falls": loss_falls(rec) if ok else None,
                    "loss_impl": rec.get("loss_impl"),
                    "model_load": rec.get("model_load"),
                    "dir": d,
                    **(smi_clocks(smi, num(rec.get("t_start")), num(rec.get("t_end"))) if ok else {}),
                }
        dpath = os.path.join(d, "durations.tsv")
        if os.path.exists(dpath):
            for line in read_lines(dpath):
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 2:
                    durations.append((d, parts[0], parts[1], parts[2] if len(parts) > 2 else ""))
    rank = {"qkvo": 0, "all": 1}
    first = {k: i for i, k in enumerate(order)}
    order = sorted(order, key=lambda k: (rank.get(k[0], 2), k[0], case_key(k[1]), first[k]))
    for key in order:
        add_ratios(rows[key])
    return rows, order, envs, durations


def case_key(case):
    """Sort cases by tokens per row, then rows: 8x512 < 4x2048 < 1x8192 < 1x32768."""
    b, _, s = case.partition("x")
    try:
        return (int(s), -int(b))
    except ValueError:
        return (1 << 62, 0)


def add_ratios(r):
    """The fastest and the lowest-memory peer of a row, and each qtrain variant's ratios."""
    peers = {n: e for n, e in r["tools"].items() if e["kind"] == "peer" and e["status"] == "ok"}
    fast = max(((e["tokens_per_s"], n) for n, e in peers.items() if e["tokens_per_s"]), default=None)
    low = min(((e["peak_gib"], n) for n, e in peers.items() if e["peak_gib"] is not None), default=None)
    r["fastest_peer"] = {"name": fast[1], "tokens_per_s": fast[0]} if fast else None
    r["lowest_memory_peer"] = {"name": low[1], "peak_gib": low[0]} if low else None
    for e in r["tools"].values():
        if e["kind"] != "qtrain":
            continue
        e["speed_ratio"] = e["tokens_per_s"] / fast[0] if fast and e.get("tokens_per_s") else None
        e["memory_ratio"] = e["peak_gib"] / low[0] if low and e.get("peak_gib") and low[0] else None


def tool_order(names):
    def key(n):
        if n.startswith("qtrain"):
            return (0, n != "qtrain", n)
        return (1, PEER_ORDER.index(n) if n in PEER_ORDER else len(PEER_ORDER), n)

    return sorted(names, key=key)


def fmt(v, spec, width=0):
    s = format(v, spec) if v is not None else "-"
    return s.rjust(width) if width else s


def share(v):
    return f"{100.0 * v:.0f}%" if v is not None else "-"


def ratio(v):
    return f"{v:.2f}x" if v is not None else "-"


def status_text(e):
    st = str(e.get("status") or "?")
    if st == "ok":
        return "ok" if e.get("loss_falls") is not False else "ok, LOSS DID NOT FALL"
    err = e.get("error")
    return f"{st.upper()}" + (f": {err}" if err else "")


def render_text(rows, order, envs, durations):
    out = []
    for name in tool_order(envs):
        e = envs[name]
        extra = ", ".join(f"{k} {e[k]}" for k in ("unsloth", "liger_kernel", "trl") if e.get(k))
        cuda = f" (CUDA {e['torch_cuda']})" if e.get("torch_cuda") else ""
        out.append(
            f"{name}: torch {e.get('torch')}{cuda}, transformers {e.get('transformers')}, "
            f"peft {e.get('peft')}, bitsandbytes {e.get('bitsandbytes')}{', ' + extra if extra else ''}; {e.get('gpu')}"
            + (f"; loss: {e.get('loss_impl')}" if e.get("loss_impl") else "")
        )
    head = (
        f"{'targets':<8} {'case':<8} {'tool':<16} {'tok/s':>8} {'step s':>7} {'peak GiB':>9} "
        f"{'alloc':>6} {'resv':>6} {'smi':>6} {'MHz':>5} {'W':>4} {'plim':>4}  status"
    )
    out += [head, "-" * len(head)]
    everyone = tool_order({n for k in order for n in rows[k]["tools"]})
    for key in order:
        r = rows[key]
        first = True
        for name in everyone:
            e = r["tools"].get(name, MISSING)
            mark = "r" if e.get("peak_src") == "reserved" and e.get("peak_gib") is not None else " "
            out.append(
                f"{r['targets'] if first else '':<8} {r['case'] if first else '':<8} {name:<16} "
                f"{fmt(e.get('tokens_per_s'), '.0f', 8)} {fmt(e.get('step_s'), '.3f', 7)} "
                f"{fmt(e.get('peak_gib'), '.2f', 8)}{mark} {fmt(e.get('allocated_gib'), '.2f', 6)} "
                f"{fmt(e.get('reserved_gib'), '.2f', 6)} {fmt(e.get('smi_gib'), '.2f', 6)} "
                f"{fmt(e.get('sm_mhz'), '.0f', 5)} {fmt(e.get('power_w'), '.0f', 4)} "
                f"{share(e.get('power_limited')):>4}  {status_text(e)}"
            )
            first = False
    out.append("")
    out.append("qtrain against the fastest peer (tokens/s) and the lowest-memory peer (peak GiB) of each case:")
    head = f"{'targets':<8} {'case':<8} {'tool':<16} {'tok/s':>8} {'fastest peer':>24} {'speed':>6} {'peak GiB':>9} {'lowest-memory peer':>24} {'memory':>7}"
    out += [head, "-" * len(head)]
    for key in order:
        r = rows[key]
        fast, low = r["fastest_peer"], r["lowest_memory_peer"]
        fs = f"{fast['name']} {fast['tokens_per_s']:.0f}" if fast else "none ran"
        ls = f"{low['name']} {low['peak_gib']:.2f}" if low else "none ran"
        for name in [n for n in everyone if n.startswith("qtrain")] or ["qtrain"]:
            e = r["tools"].get(name, MISSING)
            out.append(
                f"{r['targets']:<8} {r['case']:<8} {name:<16} {fmt(e.get('tokens_per_s'), '.0f', 8)} "
                f"{fs:>24} {ratio(e.get('speed_ratio')):>6} {fmt(e.get('peak_gib'), '.2f', 9)} "
                f"{ls:>24} {ratio(e.get('memory_ratio')):>7}"
            )
    out.append(
        "speed = qtrain tok/s / fastest peer's; memory = qtrain peak / lowest peer peak (below 1 = less memory). "
        "Peak GiB: whole-device memory in use (qtrain's own figure; peers: nvidia-smi in the case window, "
        "r = torch max_memory_reserved where no sample fell in it); alloc/resv: torch's allocator; "
        "smi: nvidia-smi peak in the case window (qtrain's first window includes its model load); "
        "MHz, W: mean SM clock and power draw over the window's busy samples, plim: the share of them "
        "limited by power (SW power cap or HW power brake)."
    )
    if durations:
        out.append("")
        out.append("phases (bench-compare.sh): " + "; ".join(f"{p} {s}s{(' ' + n) if n else ''}" for _, p, s, n in durations))
    return "\n".join(out)


def render_markdown(rows, order):
    peers = tool_order({n for k in order for n, e in rows[k]["tools"].items() if e["kind"] == "peer"})
    qs = tool_order({n for k in order for n, e in rows[k]["tools"].items() if e["kind"] == "qtrain"})
    cols = ["targets", "case"] + [f"{q} tok/s / GiB" for q in qs] + [f"{p} tok/s / GiB" for p in peers]
    cols += ["fastest peer"] + [f"{q} speed" for q in qs] + ["lowest-memory peer"] + [f"{q} memory" for q in qs]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for key in order:
        r = rows[key]
        cells = [r["targets"], r["case"].replace("x", " x ")]
        for n in qs + peers:
            e = r["tools"].get(n, MISSING)
            if e["status"] == "ok" and e.get("tokens_per_s"):
                cells.append(f"{e['tokens_per_s']:,.0f} / {fmt(e.get('peak_gib'), '.1f')}")
            else:
                cells.append(str(e["status"]).upper())
        fast, low = r["fastest_peer"], r["lowest_memory_peer"]
        cells.append(fast["name"] if fast else "-")
        cells += [f"**{ratio(r['tools'].get(q, MISSING).get('speed_ratio'))}**" for q in qs]
        cells.append(low["name"] if low else "-")
        cells += [ratio(r["tools"].get(q, MISSING).get("memory_ratio")) for q in qs]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="bench-compare.sh output directories")
    p.add_argument("--out", default=None, help="prefix of the .json/.md written (default: FIRST_DIR/compare)")
    a = p.parse_args(argv)
    for d in a.dirs:
        if not os.path.isdir(d):
            raise SystemExit(f"{d}: not a directory")
    rows, order, envs, durations = collect(a.dirs)
    if not order:
        print(f"no results in {', '.join(a.dirs)}")
        return 1
    print(render_text(rows, order, envs, durations))
    prefix = a.out or os.path.join(a.dirs[0], "compare")
    try:
        with open(prefix + ".json", "w") as f:
            json.dump([rows[k] for k in order], f, indent=1)
        with open(prefix + ".md", "w") as f:
            f.write(render_markdown(rows, order) + "\n")
    except OSError as e:
        print(f"(not written: {e}; pass --out PREFIX)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
