//! The flash-attention kernels (`src/ops/attention/attention.cu`) on the host: the file
//! is compiled with `-DQT_EMU` against the warp-primitive emulator (`emu/emu.h`: every
//! CUDA thread a host thread, the mma/ldmatrix fragment layouts transcribed from the PTX
//! ISA) and `emu/attention_emu.cpp` checks every kernel (forward in both CTA shapes, the
//! split backward, the fused backward ordered and with atomics) against a double-
//! precision reference on random data, for head dims 16..128, ragged ends, windows,
//! packed segments, GQA and batch > 1. This is how the kernels' index arithmetic,
//! masking and the fused backward's turn order are checked without a GPU; `qtrain
//! doctor` checks the compiled kernels on one.

use std::path::Path;
use std::process::Command;

#[test]
fn attention_kernels_match_the_reference_under_emulation() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ops/attention");
    let exe = std::env::temp_dir().join(format!("qtrain-attention-emu-{}", std::process::id()));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let built = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-DQT_EMU", "-Wall"])
        .arg("-Wno-unknown-pragmas")
        .arg("-I")
        .arg(&dir)
        .arg(dir.join("emu/attention_emu.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("running {cxx} (a C++20 compiler, g++ 12+): {e}"));
    assert!(
        built.status.success(),
        "{cxx} failed on emu/attention_emu.cpp:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&exe).output().expect("running the emulation");
    let _ = std::fs::remove_file(&exe);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success() && stdout.contains("all emulated attention checks passed"),
        "emulated attention checks failed:\n{stdout}\n{stderr}"
    );
    // Every shape of the harness ran and passed.
    let passed = stdout.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(passed, 8, "{stdout}");
}
