#!/usr/bin/env python3
"""Side-by-side table of `qtrain bench` and scripts/peer_qlora.py results.

    python3 scripts/bench_compare_table.py OUT_DIR

Reads what scripts/bench-compare.sh leaves in OUT_DIR:
- qtrain-*.stamped: qtrain bench's stdout, each line prefixed by the unix time it was
  read at and a tab (a case's window runs from the previous line, or the start stamp
  in qtrain-*.start, to its own line);
- peer.jsonl: peer_qlora.py's JSON lines (each carries t_start/t_end);
- smi-*.csv: nvidia-smi samples `timestamp, memory.used [MiB]` taken during the runs.
Lines that are not JSON objects are skipped, so both tools may log freely. qtrain's
fields are read defensively: tokens_per_s, step_s, case, targets, and a peak memory
field if it has one (any numeric key with "peak" and "mem" in its name).
Prints one row per (targets, case): both throughputs, qtrain/peer, and the peak
memories (allocator figures where a tool reports them, nvidia-smi's whole-device
peak inside the case's time window). Also writes OUT_DIR/compare.json.
"""
import datetime
import glob
import json
import os
import sys

PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = float(1 << 30)


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


def read_stamped(path):
    """[(t_start, t_end, record)] from a qtrain-*.stamped file."""
    start = None
    spath = path[: -len(".stamped")] + ".start"
    if os.path.exists(spath):
        try:
            start = float(open(spath).read().strip())
        except ValueError:
            start = None
    out = []
    prev = start
    for line in open(path, errors="replace"):
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


def read_smi(paths):
    """[(unix time, MiB)] from nvidia-smi csv files (timestamp, memory.used)."""
    samples = []
    for p in paths:
        for line in open(p, errors="replace"):
            parts = [x.strip() for x in line.split(",")]
            if len(parts) < 2:
                continue
            try:
                mib = float(parts[-1])
                t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            except ValueError:
                continue
            samples.append((t, mib))
    samples.sort()
    return samples


def smi_peak(samples, t0, t1):
    if t0 is None or t1 is None:
        return None
    # nvidia-smi samples every 100 ms: a little slack keeps short windows non-empty.
    vals = [m for t, m in samples if t0 - 0.15 <= t <= t1 + 0.15]
    return max(vals) / 1024.0 if vals else None


def qtrain_peak_gib(rec):
    """(GiB, key) of the first peak-memory-looking numeric field, else (None, None)."""
    for k, v in rec.items():
        kl = k.lower()
        if "peak" not in kl or "mem" not in kl or isinstance(v, bool) or not isinstance(v, (int, float)):
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
    for k, v in rec.items():  # nested, e.g. {"memory": {"peak_bytes": ...}}
        if isinstance(v, dict):
            g, kk = qtrain_peak_gib({f"{k}_{a}": b for a, b in v.items()})
            if g is not None:
                return g, kk
    return None, None


def num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def fmt(v, spec, width):
    return format(v, spec).rjust(width) if v is not None else "-".rjust(width)


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    d = sys.argv[1]
    smi = read_smi(sorted(glob.glob(os.path.join(d, "smi-*.csv"))))
    rows = {}
    order = []

    def row(label, case):
        key = (label, case)
        if key not in rows:
            rows[key] = {"targets": label, "case": case}
            order.append(key)
        return rows[key]

    peak_key = None
    for path in sorted(glob.glob(os.path.join(d, "qtrain-*.stamped"))):
        for t0, t1, rec in read_stamped(path):
            case = str(rec.get("case", "?")).strip()
            r = row(target_label(rec.get("targets")), case)
            r["qtrain_tokens_per_s"] = num(rec.get("tokens_per_s"))
            r["qtrain_step_s"] = num(rec.get("step_s"))
            g, k = qtrain_peak_gib(rec)
            r["qtrain_peak_gib"] = g
            peak_key = peak_key or k
            r["qtrain_smi_peak_gib"] = smi_peak(smi, t0, t1)
            losses = rec.get("losses")
            if isinstance(losses, list) and len(losses) >= 2 and all(num(x) is not None for x in losses):
                r["qtrain_loss_falls"] = losses[-1] < losses[0]
    env = None
    ppath = os.path.join(d, "peer.jsonl")
    if os.path.exists(ppath):
        for line in open(ppath, errors="replace"):
            rec = parse_json_line(line)
            if rec is None:
                continue
            env = env or rec
            r = row(target_label(rec.get("targets")), str(rec.get("case", "?")).strip())
            r["peer_status"] = rec.get("status")
            r["peer_tokens_per_s"] = num(rec.get("tokens_per_s"))
            r["peer_step_s"] = num(rec.get("step_s"))
            resv = num(rec.get("peak_memory_reserved_bytes"))
            alloc = num(rec.get("peak_memory_allocated_bytes"))
            r["peer_reserved_gib"] = resv / GIB if resv is not None else None
            r["peer_allocated_gib"] = alloc / GIB if alloc is not None else None
            r["peer_smi_peak_gib"] = smi_peak(smi, num(rec.get("t_start")), num(rec.get("t_end")))
            r["peer_loss_falls"] = rec.get("loss_falls")
    # q/k/v/o first, then all seven, then anything else; cases as they first came.
    rank = {"qkvo": 0, "all": 1}
    first = {k: i for i, k in enumerate(order)}
    order = sorted(order, key=lambda k: (rank.get(k[0], 2), k[0], first[k]))
    for r in rows.values():
        q, p = r.get("qtrain_tokens_per_s"), r.get("peer_tokens_per_s")
        r["ratio"] = q / p if q and p else None

    if env:
        print(
            f"peer: transformers {env.get('transformers')} + peft {env.get('peft')} + bitsandbytes "
            f"{env.get('bitsandbytes')}, torch {env.get('torch')}, {env.get('gpu')}, autocast {env.get('autocast')}"
        )
    head = (
        f"{'targets':<8} {'case':<9} {'qtrain tok/s':>12} {'peer tok/s':>10} {'ratio':>6} "
        f"{'q peak GiB':>10} {'q smi GiB':>9} {'p alloc GiB':>11} {'p resv GiB':>10} {'p smi GiB':>9}  notes"
    )
    print(head)
    print("-" * len(head))
    for key in order:
        r = rows[key]
        notes = []
        if r.get("peer_status") not in (None, "ok"):
            notes.append(f"peer {str(r['peer_status']).upper()}")
        if "peer_tokens_per_s" not in r:
            notes.append("no peer result")
        if "qtrain_tokens_per_s" not in r:
            notes.append("no qtrain result")
        if r.get("qtrain_loss_falls") is False:
            notes.append("qtrain loss did not fall")
        if r.get("peer_loss_falls") is False:
            notes.append("peer loss did not fall")
        print(
            f"{r['targets']:<8} {r['case']:<9} {fmt(r.get('qtrain_tokens_per_s'), '.0f', 12)} "
            f"{fmt(r.get('peer_tokens_per_s'), '.0f', 10)} {fmt(r.get('ratio'), '.2f', 6)} "
            f"{fmt(r.get('qtrain_peak_gib'), '.2f', 10)} {fmt(r.get('qtrain_smi_peak_gib'), '.2f', 9)} "
            f"{fmt(r.get('peer_allocated_gib'), '.2f', 11)} {fmt(r.get('peer_reserved_gib'), '.2f', 10)} "
            f"{fmt(r.get('peer_smi_peak_gib'), '.2f', 9)}  {'; '.join(notes)}"
        )
    print(
        "ratio = qtrain tokens/s / peer tokens/s. q peak: qtrain's own field"
        + (f" `{peak_key}`" if peak_key else " (none in its JSON)")
        + "; p alloc/resv: torch max_memory_allocated/reserved; smi: nvidia-smi whole-device peak during the case"
        " (qtrain's first case window includes its model load)."
    )
    with open(os.path.join(d, "compare.json"), "w") as f:
        json.dump([rows[k] for k in order], f, indent=1)


if __name__ == "__main__":
    main()
