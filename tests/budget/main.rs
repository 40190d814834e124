//! The time budget covers the whole process: `qtrain run --minutes B` (the
//! built-in tiny CPU demo: loading, evaluations, sample answers, checkpoints and
//! the export included) exits within [B - max(1% of B, 30 s), B] of being started,
//! timed from outside. Its own test binary: cargo runs test binaries one at a time,
//! so the other end-to-end tests do not share the CPU with it.

#[path = "../common/mod.rs"]
mod common;

use common::*;
use std::time::Instant;

#[test]
fn the_whole_process_ends_inside_the_budget_window() {
    let budget_s: f64 = 40.0;
    let out = tempfile::tempdir().unwrap();
    cache();
    let mut cmd = qtrain(["run", "--minutes"]);
    cmd.arg(format!("{}", budget_s / 60.0))
        .arg("--out")
        .arg(out.path());
    let t = Instant::now();
    let o = ok(cmd);
    let wall = t.elapsed().as_secs_f64();
    let lo = budget_s - (0.01 * budget_s).max(30.0);
    assert!(
        wall <= budget_s && wall >= lo,
        "exited after {wall:.1} s, window [{lo}, {budget_s}]\n{}\n{}",
        stdout(&o),
        stderr(&o)
    );
    let said = stdout(&o);
    let steps: u64 = said
        .split("trained ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    assert!(steps > 10, "{said}");
    assert!(
        said.contains("time:         budget 40.0 s, process wall time"),
        "{said}"
    );
    // The accounting is the last record of the metrics: process time within the
    // budget and the phases adding up to it.
    let metrics = String::from_utf8(read(out.path().join("metrics.jsonl"))).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    let get = |k: &str| last[k].as_f64().unwrap_or_else(|| panic!("{k} in {last}"));
    assert_eq!(get("budget/budget_s"), budget_s);
    let process = get("budget/wall_s");
    assert!(process <= wall && process >= lo, "{process} vs {wall}");
    let phases: f64 = [
        "setup",
        "load",
        "evaluation",
        "samples",
        "steps",
        "checkpoints",
        "export",
        "other",
    ]
    .iter()
    .map(|p| get(&format!("budget/{p}_s")))
    .sum();
    assert!((phases - process).abs() < 1e-6, "{phases} vs {process}");
    assert!(get("budget/steps_s") > 0.5 * process, "{last}");
}
