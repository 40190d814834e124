//! End-to-end behaviour on a least-squares problem: the 8-bit optimizer tracks the f32
//! reference, and save / load / continue equals an uninterrupted run bit for bit.

mod common;

use common::{bits_eq, dist, LeastSquares};
use qtrain_optim::{
    clip_grad_norm, AdamW32, AdamW8bit, AdamWConfig, LrSchedule, Optimizer, ParamSpec,
    ScheduleKind, StateFormat,
};

// W is 64×130 = 8320 elements: 8-bit state in 33 blocks, the last one ragged (128
// elements). b has 130 elements: f32 state even in the 8-bit optimizer.
const N: usize = 256;
const DIN: usize = 64;
const DOUT: usize = 130;

fn specs() -> Vec<ParamSpec> {
    vec![
        ParamSpec::new("layer.w", DIN * DOUT),
        ParamSpec::new("layer.b", DOUT),
    ]
}

fn config() -> AdamWConfig {
    AdamWConfig {
        weight_decay: 1e-3,
        ..AdamWConfig::default()
    }
}

fn schedule() -> LrSchedule {
    LrSchedule {
        kind: ScheduleKind::Cosine,
        peak_lr: 1e-2,
        warmup_steps: 20,
        min_lr_ratio: 0.05,
    }
}

/// Runs `steps` of a training loop (clip, schedule, step) on `opt`.
fn train(
    opt: &mut dyn Optimizer,
    prob: &LeastSquares,
    w: &mut [f32],
    b: &mut [f32],
    steps: std::ops::Range<u64>,
    total: u64,
    mut on_loss: impl FnMut(f64),
) {
    let mut gw = vec![0.0; w.len()];
    let mut gb = vec![0.0; b.len()];
    for step in steps {
        assert_eq!(opt.step_count(), step);
        let loss = prob.loss_grad(w, b, &mut gw, &mut gb);
        let norm = clip_grad_norm(&mut [&mut gw[..], &mut gb[..]], 5.0);
        assert!(norm.is_finite());
        let lr = schedule().lr_at(step, total);
        let stats = opt.step(&mut [&mut *w, &mut *b], &[&gw, &gb], lr).unwrap();
        assert_eq!(stats.nonfinite_grads, 0);
        on_loss(loss);
    }
}

/// The tolerance claim: over 400 steps (20 warmup, cosine decay from 1e-2), 8-bit
/// AdamW stays close to f32 AdamW on the same problem from the same start.
///
/// Measured (seeds 1 to 3, the bitsandbytes-faithful update with its sign fix):
/// final losses within 1.7e-4 of each other (relative), final weights
/// `‖W8 − W32‖ / ‖W32 − W0‖` within 3.2e-5, and the loss curves at most 6.9 % apart
/// at any single step; that worst gap sits in the steepest part of the descent
/// (step ~64, loss ~0.6 from ~118), where 8-bit runs slightly ahead and a small
/// shift in time is a large relative gap. Asserted with about 1.5-2x margin:
/// 10 %, 4e-4, 7e-5 (weights and biases).
#[test]
fn adamw8bit_tracks_f32_reference_on_least_squares() {
    const STEPS: u64 = 400;
    for seed in 1..=3u64 {
        let prob = LeastSquares::new(seed, N, DIN, DOUT, 0.01);
        let (w0, b0) = prob.init(100 + seed);

        let mut opt32 = AdamW32::new(config(), &specs()).unwrap();
        let (mut w32, mut b32) = (w0.clone(), b0.clone());
        let mut loss32 = Vec::new();
        train(
            &mut opt32,
            &prob,
            &mut w32,
            &mut b32,
            0..STEPS,
            STEPS,
            |l| loss32.push(l),
        );

        let mut opt8 = AdamW8bit::new(config(), &specs()).unwrap();
        assert_eq!(opt8.states()[0].format(), StateFormat::Blockwise8);
        assert_eq!(opt8.states()[1].format(), StateFormat::F32);
        let (mut w8, mut b8) = (w0.clone(), b0.clone());
        let mut loss8 = Vec::new();
        train(&mut opt8, &prob, &mut w8, &mut b8, 0..STEPS, STEPS, |l| {
            loss8.push(l)
        });

        let initial = loss32[0];
        let final32 = *loss32.last().unwrap();
        let final8 = *loss8.last().unwrap();
        // Both actually solve the problem (noise floor ~1.6e-5 * 130 / 2 ≈ 1e-3 of the
        // initial loss here).
        assert!(
            final32 < 1e-2 * initial,
            "f32 did not converge: {final32} vs {initial}"
        );
        assert!(
            final8 < 1e-2 * initial,
            "8-bit did not converge: {final8} vs {initial}"
        );

        let (worst_step, max_rel_loss) = loss8
            .iter()
            .zip(&loss32)
            .map(|(a, b)| (a - b).abs() / b)
            .enumerate()
            .fold((0, 0.0f64), |m, (i, d)| if d > m.1 { (i, d) } else { m });
        eprintln!(
            "seed {seed}: worst step {worst_step}: f32 {:.4e} 8-bit {:.4e}",
            loss32[worst_step], loss8[worst_step]
        );
        let final_rel_loss = (final8 - final32).abs() / final32;
        let rel_w = dist(&w8, &w32) / dist(&w32, &w0);
        let rel_b = dist(&b8, &b32) / dist(&b32, &b0);
        eprintln!(
            "seed {seed}: initial loss {initial:.4e}, final f32 {final32:.4e}, final 8-bit \
             {final8:.4e}; max rel loss diff {max_rel_loss:.3e}, final rel loss diff \
             {final_rel_loss:.3e}, rel W diff {rel_w:.3e}, rel b diff {rel_b:.3e}"
        );
        assert!(
            max_rel_loss < 1e-1,
            "seed {seed}: loss curves diverge: {max_rel_loss}"
        );
        assert!(
            final_rel_loss < 4e-4,
            "seed {seed}: final losses differ: {final_rel_loss}"
        );
        assert!(rel_w < 7e-5, "seed {seed}: weights differ: {rel_w}");
        assert!(rel_b < 7e-5, "seed {seed}: biases differ: {rel_b}");
    }
}

/// The very first 8-bit update is computed from unquantized moments of a zero state,
/// so it equals the f32 optimizer's first update up to the order of one product:
/// bitsandbytes' 8-bit blockwise kernel computes `(1 - b2) * g * g` left to right,
/// its 32-bit kernel `(1 - b2) * (g * g)`, and we follow each. That moves `v` by at
/// most an ulp, hence the update by a relative 1e-6 at most.
#[test]
fn first_step_matches_f32_up_to_operation_order() {
    let prob = LeastSquares::new(7, N, DIN, DOUT, 0.01);
    let (w0, b0) = prob.init(7);
    let mut gw = vec![0.0; w0.len()];
    let mut gb = vec![0.0; b0.len()];
    prob.loss_grad(&w0, &b0, &mut gw, &mut gb);

    let mut opt8 = AdamW8bit::new(config(), &specs()).unwrap();
    let mut opt32 = AdamW32::new(config(), &specs()).unwrap();
    let (mut w8, mut b8) = (w0.clone(), b0.clone());
    let (mut w32, mut b32) = (w0.clone(), b0.clone());
    let s8 = opt8
        .step(&mut [&mut w8, &mut b8], &[&gw, &gb], 1e-3)
        .unwrap();
    let s32 = opt32
        .step(&mut [&mut w32, &mut b32], &[&gw, &gb], 1e-3)
        .unwrap();
    // The update (p - p0) agrees to a relative 1e-6 of the update itself.
    for ((a, b), p0) in w8.iter().zip(&w32).zip(&w0) {
        let (d8, d32) = (a - p0, b - p0);
        assert!(
            (d8 - d32).abs() <= 1e-6 * d32.abs() + 1e-12,
            "{d8} vs {d32}"
        );
    }
    // The bias has fewer than `min_8bit_size` elements: f32 state in both, bit-identical.
    assert!(bits_eq(&b8, &b32));
    assert!((s8.update_norm - s32.update_norm).abs() <= 1e-6 * s32.update_norm);
    assert!(s8.update_norm > 0.0);
}

fn resume_roundtrip<O: Optimizer + Clone + PartialEq + std::fmt::Debug>(
    new: impl Fn() -> O,
    load: impl Fn(&std::path::Path) -> O,
) {
    const TOTAL: u64 = 60;
    const SPLIT: u64 = 25;
    let prob = LeastSquares::new(11, N, DIN, DOUT, 0.01);
    let (w0, b0) = prob.init(11);

    // Uninterrupted.
    let mut full = new();
    let (mut wf, mut bf) = (w0.clone(), b0.clone());
    train(&mut full, &prob, &mut wf, &mut bf, 0..TOTAL, TOTAL, |_| {});

    // Interrupted at SPLIT: save, drop, load, continue. The trainer saves its f32
    // master weights separately; here they are simply kept.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optim.safetensors");
    let (mut wi, mut bi) = (w0.clone(), b0.clone());
    {
        let mut first = new();
        train(&mut first, &prob, &mut wi, &mut bi, 0..SPLIT, TOTAL, |_| {});
        first.save_state(&path).unwrap();
        let reloaded = load(&path);
        assert_eq!(reloaded, first, "loaded state differs from saved state");
    }
    let mut resumed = load(&path);
    assert_eq!(resumed.step_count(), SPLIT);
    train(
        &mut resumed,
        &prob,
        &mut wi,
        &mut bi,
        SPLIT..TOTAL,
        TOTAL,
        |_| {},
    );

    assert!(bits_eq(&wi, &wf), "weights differ after resume");
    assert!(bits_eq(&bi, &bf), "biases differ after resume");
    assert_eq!(resumed, full, "optimizer state differs after resume");
    // No temporary files are left next to the checkpoint.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("optim.safetensors")]);
}

#[test]
fn adamw8bit_save_load_continue_is_bit_exact() {
    resume_roundtrip(
        || AdamW8bit::new(config(), &specs()).unwrap(),
        |p| AdamW8bit::load_state(p).unwrap(),
    );
    // The variant that checks against the caller's parameters restores the same thing.
    resume_roundtrip(
        || AdamW8bit::new(config(), &specs()).unwrap(),
        |p| AdamW8bit::load_state_for(p, &specs()).unwrap(),
    );
}

#[test]
fn adamw32_save_load_continue_is_bit_exact() {
    resume_roundtrip(
        || AdamW32::new(config(), &specs()).unwrap(),
        |p| AdamW32::load_state(p).unwrap(),
    );
}
