//! Compiles a crate's CUDA kernels to PTX with nvcc, for the build scripts of the
//! crates that own kernels (`qtrain-device`: the ops under `src/ops/`;
//! `qtrain-optim`: the fused AdamW update). Each `NAME.cu` becomes
//! `$OUT_DIR/NAME.ptx`, which the crate embeds with `include_str!`. The target
//! architecture comes from `CUDA_COMPUTE_CAP` (default 90, H100/H200; 86 = A10/RTX
//! 30, 89 = L4/RTX 40, 80 = A100, 75 = T4); `NVCC` names the compiler (default
//! `nvcc` on PATH). Without the crate's `cuda` feature this does nothing, so the
//! default build needs no CUDA toolkit. `scripts/check-cuda-build.sh` compiles the
//! same files with the same flags for every supported architecture.

use std::path::{Path, PathBuf};
use std::process::Command;

/// nvcc's flags besides the architecture, the include directory and the files.
pub const NVCC_FLAGS: [&str; 3] = ["--ptx", "-O3", "-std=c++17"];

/// Every `*.cu` below `dir`, sorted.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for p in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|e| e == "cu") {
            out.push(p);
        }
    }
    out.sort();
}

/// Compiles every `*.cu` below `dir` (relative to the crate) with `include` (the
/// directory of `common.cuh`) on the include path.
pub fn compile_kernels(dir: &str, include: &str) {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let (dir, include) = (manifest.join(dir), manifest.join(include));
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    println!(
        "cargo:rerun-if-changed={}",
        include.join("common.cuh").display()
    );
    // The directory too: cargo then rescans it, so a kernel added in a new op
    // directory is compiled (naming only the files seen would miss it).
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut srcs = Vec::new();
    sources(&dir, &mut srcs);
    assert!(!srcs.is_empty(), "no .cu files below {}", dir.display());
    for src in srcs {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
        let ptx = out.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .args(NVCC_FLAGS)
            .arg(format!("-arch=compute_{cap}"))
            .arg("-I")
            .arg(&include)
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("running {nvcc} (is the CUDA toolkit on PATH?): {e}"));
        assert!(status.success(), "nvcc failed on {}", src.display());
        sm90a_variant(
            &nvcc,
            &cap,
            &include,
            &src,
            &out.join(format!("{stem}_sm90a.ptx")),
        );
    }
}

/// A kernel file that defines `SM90A_MARKER` has a second build for Hopper's
/// arch-specific instructions (wgmma): with `-arch=compute_90a` and the marker defined,
/// which selects the kernels that use them. The PTX loads on compute capability 9.0 only
/// (the crate picks it at run time); for any other `CUDA_COMPUTE_CAP` the file is empty.
fn sm90a_variant(nvcc: &str, cap: &str, include: &Path, src: &Path, ptx: &Path) {
    let text = std::fs::read_to_string(src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    if !text.contains(SM90A_MARKER) {
        return;
    }
    if cap != "90" {
        std::fs::write(ptx, "").unwrap_or_else(|e| panic!("{}: {e}", ptx.display()));
        return;
    }
    let status = Command::new(nvcc)
        .args(NVCC_FLAGS)
        .arg("-arch=compute_90a")
        .arg(format!("-D{SM90A_MARKER}"))
        .arg("-I")
        .arg(include)
        .arg("-o")
        .arg(ptx)
        .arg(src)
        .status()
        .unwrap_or_else(|e| panic!("running {nvcc}: {e}"));
    assert!(
        status.success(),
        "nvcc (compute_90a) failed on {}",
        src.display()
    );
}

/// The macro a kernel file tests to build its sm_90a-only kernels.
pub const SM90A_MARKER: &str = "QTRAIN_SM90A_VARIANT";
