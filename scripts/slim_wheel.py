#!/usr/bin/env python3
"""Copy a wheel without the files a regex matches, so it fits the GPU machine's transfer.

    python3 scripts/slim_wheel.py IN.whl OUT_DIR --drop REGEX

The bitsandbytes 0.50.2 wheel is 43 MB: native libraries for every CUDA 11.8-13.2,
ROCm and XPU release. The GPU machine's torch is cu130, and bitsandbytes only loads
a library of the runtime's major version (cextension.get_cuda_bnb_library_path), so
for it:

    python3 scripts/slim_wheel.py bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl .whl \
        --drop '^bitsandbytes/libbitsandbytes_(cuda1[12][0-9]|rocm[0-9]+|xpu[0-9]+)\\.so$'

keeps libbitsandbytes_cpu.so, _cuda130.so and _cuda132.so (7.1 MB).
Unsloth 2026.10.9's wheel is 29 MB, nearly all of it Unsloth Studio (a web UI the
trainer never imports); `--drop '^studio/'` leaves 2.2 MB.
The output keeps the wheel's file name; its RECORD lists exactly the files kept, with
their original hashes (the kept files are copied byte for byte).
"""
import argparse
import csv
import io
import os
import re
import sys
import zipfile


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheel")
    p.add_argument("out_dir")
    p.add_argument("--drop", required=True, help="regex over archive paths to leave out")
    a = p.parse_args()
    drop = re.compile(a.drop)
    name = os.path.basename(a.wheel)
    os.makedirs(a.out_dir, exist_ok=True)
    out_path = os.path.join(a.out_dir, name)
    if os.path.abspath(out_path) == os.path.abspath(a.wheel):
        raise SystemExit(f"{out_path}: output would overwrite the input; use another OUT_DIR")
    with zipfile.ZipFile(a.wheel) as zin:
        names = zin.namelist()
        records = [n for n in names if n.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            raise SystemExit(f"{a.wheel}: expected one .dist-info/RECORD, found {records}")
        record = records[0]
        dropped = [n for n in names if drop.search(n)]
        if record in dropped or any(n.endswith((".dist-info/METADATA", ".dist-info/WHEEL")) for n in dropped):
            raise SystemExit("--drop must not match the wheel's metadata files")
        if not dropped:
            raise SystemExit(f"--drop {a.drop!r} matches nothing in {a.wheel}")
        rows = list(csv.reader(io.StringIO(zin.read(record).decode("utf-8"))))
        kept_rows = [r for r in rows if r and not drop.search(r[0])]
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(kept_rows)
        tmp = out_path + ".tmp"
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if info.filename in dropped:
                    continue
                data = buf.getvalue().encode("utf-8") if info.filename == record else zin.read(info)
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
        os.replace(tmp, out_path)
    kept = sorted(set(names) - set(dropped))
    print(f"{out_path}: {os.path.getsize(out_path)} bytes, {len(kept)} files kept, {len(dropped)} dropped:", file=sys.stderr)
    for n in dropped:
        print(f"  - {n}", file=sys.stderr)
    for n in kept:
        if n.endswith(".so"):
            print(f"  + {n}", file=sys.stderr)


if __name__ == "__main__":
    main()
