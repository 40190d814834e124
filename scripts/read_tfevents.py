#!/usr/bin/env python3
"""Print the scalars of qtrain's TensorBoard event files with TensorBoard's own loader.

qtrain writes event files by hand (crates/qtrain-train/src/tensorboard.rs); this
checks them against the reader TensorBoard itself uses, so a framing or CRC mistake
shows up as an error or as missing scalars here rather than as an empty dashboard.

Usage:
    pip install tensorboard
    python scripts/read_tfevents.py RUN_DIR_OR_EVENT_FILE [--tag train/loss] [--strict]

RUN_DIR is a run's output directory (every events.out.tfevents.* file in it is read)
or one event file. --strict exits with status 1 when a file holds no scalars.
"""

import argparse
import glob
import os
import sys

from tensorboard.backend.event_processing import event_accumulator


def event_files(path):
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "events.out.tfevents.*")))
        if not files:
            sys.exit(f"{path}: no events.out.tfevents.* file")
        return files
    return [path]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", help="run directory or event file")
    ap.add_argument("--tag", action="append", help="only these tags (repeatable)")
    ap.add_argument("--strict", action="store_true", help="fail if a file has no scalars")
    args = ap.parse_args()

    status = 0
    for f in event_files(args.path):
        # size_guidance 0 = keep every point, not TensorBoard's default sample.
        acc = event_accumulator.EventAccumulator(
            f, size_guidance={event_accumulator.SCALARS: 0}
        )
        acc.Reload()
        tags = acc.Tags().get("scalars", [])
        print(f"== {f}: file_version={acc.file_version!r}, {len(tags)} scalar tags")
        if not tags and args.strict:
            status = 1
        for tag in sorted(tags):
            if args.tag and tag not in args.tag:
                continue
            events = acc.Scalars(tag)
            print(f"{tag}: {len(events)} points")
            for e in events:
                print(f"  step {e.step:>8}  value {e.value:.6g}  wall_time {e.wall_time:.3f}")
    sys.exit(status)


if __name__ == "__main__":
    main()
