//! `qtrain doctor`: checks an install on a GPU machine. Reports the device and the
//! precision qtrain trains in on it, then prints the self-tests of the libraries:
//! every kernel against its CPU reference on random data (max error and achieved
//! bandwidth; `qtrain_device::ops`, `qtrain_optim::device`) and a tiny model's
//! training step on the GPU against the CPU reference (`qtrain_train::selftest`).
//! Exits non-zero on any mismatch. This is also how qtrain is tested on GPU
//! machines without a Rust toolchain: build elsewhere, copy the binary, run
//! `qtrain doctor`. With `--cpu` every check runs on the CPU (both sides are then
//! the reference: a check of the install and of the checks themselves, for CI).

use anyhow::{bail, Result};
use candle_core::Device;
use qtrain_device::selftest::Check;
use qtrain_device::Dev;

#[derive(clap::Args)]
pub struct Args {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// Run every check on the CPU instead of a GPU (small shapes, no speeds).
    #[arg(long)]
    cpu: bool,
    /// Run one group of checks only (e.g. under a profiler): nf4, kernels (every fused
    /// kernel and GEMM), attention, optimizer, step (a tiny model's training step).
    #[arg(long, value_enum)]
    only: Option<Group>,
}

/// The groups of checks, in the order a full run prints them.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Group {
    Nf4,
    Kernels,
    Attention,
    Optimizer,
    Step,
}

pub fn run(a: Args) -> Result<()> {
    let device = if a.cpu {
        Device::Cpu
    } else if candle_core::utils::cuda_is_available() {
        Device::new_cuda(a.gpu)?
    } else {
        bail!(
            "this qtrain was built without CUDA: rebuild with `cargo build --release --features \
             cuda`, or check the CPU paths with `qtrain doctor --cpu`"
        );
    };
    // On a GPU: Mistral-7B-sized shapes and speeds; on the CPU: small shapes.
    let full = device.is_cuda();
    let dev = Dev::from_candle(&device)?;
    let mut failures = Vec::new();
    let (about_gpu, supported) = qtrain_train::gpu::describe(&device);
    for line in about_gpu {
        println!("{line}");
    }
    if !supported {
        failures.push("unsupported GPU".to_string());
    }
    // Printed group by group as they finish (the GPU groups take a while).
    let mut report = |checks: Vec<Check>| {
        for c in checks {
            let verdict = if c.ok { "ok" } else { "MISMATCH" };
            println!("{}: {} {verdict}", c.name, c.detail);
            if !c.ok {
                failures.push(c.name);
            }
        }
    };
    let runs = |g: Group| a.only.is_none_or(|o| o == g);
    if runs(Group::Nf4) {
        // NF4 dequantization: bit-exact against the CPU reference, and bandwidth.
        report(qtrain_device::ops::nf4::self_test(&device, full)?);
        // NF4 quantization (how the loader quantizes on a GPU), byte for byte.
        report(qtrain_device::ops::nf4_quant::self_test(&device, full));
    }
    if runs(Group::Kernels) {
        // Every fused kernel against its CPU reference (bf16 on the GPU), attention
        // included.
        report(qtrain_device::selftest::run_basic(&dev, full)?);
    } else if a.only == Some(Group::Attention) {
        report(qtrain_device::ops::attention::self_test(&dev, full)?);
    }
    if runs(Group::Optimizer) {
        // The fused 8-bit AdamW against the CPU optimizer (bit-exact), and its speed.
        let optimizer_layers = if full { 32 } else { 1 };
        report(qtrain_optim::device::selftest::selftest_layers(
            &dev,
            optimizer_layers,
        ));
    }
    if runs(Group::Step) {
        // A tiny model's training step, decoding and loading against the CPU.
        report(qtrain_train::selftest::step_checks(&device));
    }
    if failures.is_empty() {
        println!("all checks passed");
        Ok(())
    } else {
        bail!("checks failed: {}", failures.join(", "))
    }
}
