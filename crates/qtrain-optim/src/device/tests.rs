//! The device optimizer on the CPU device against the host optimizers.

use super::selftest::{compare, mixed_specs, selftest_layers};
use super::*;
use crate::{AdamW32, AdamW8bit, PagingPolicy, ParamSpec};
use qtrain_device::selftest::random;

fn cfg(paging: PagingPolicy, weight_decay: f32) -> AdamWConfig {
    AdamWConfig {
        paging,
        weight_decay,
        ..AdamWConfig::default()
    }
}

fn split<'a>(flat: &'a mut [f32], specs: &[ParamSpec]) -> Vec<&'a mut [f32]> {
    let mut out = Vec::new();
    let mut rest = flat;
    for s in specs {
        let (a, b) = rest.split_at_mut(s.numel);
        out.push(a);
        rest = b;
    }
    out
}

fn split_ref<'a>(flat: &'a [f32], specs: &[ParamSpec]) -> Vec<&'a [f32]> {
    let mut out = Vec::new();
    let mut rest = flat;
    for s in specs {
        let (a, b) = rest.split_at(s.numel);
        out.push(a);
        rest = b;
    }
    out
}

/// Gradients with a NaN and an infinity in the middle of 8-bit and f32 tensors.
fn grads(n: usize, t: u64) -> Vec<f32> {
    let mut g = random(n, 0.1, 50 + t);
    if t % 2 == 1 {
        g[n / 3] = f32::NAN;
        g[60] = f32::INFINITY;
    }
    g
}

#[test]
fn cpu_device_matches_the_host_optimizer_bit_for_bit() {
    let dev = Dev::cpu();
    for (paging, chunk) in [
        (PagingPolicy::Never, PAGED_CHUNK_BYTES),
        (PagingPolicy::Always, PAGED_CHUNK_BYTES),
        (PagingPolicy::Always, 1),
        (PagingPolicy::Always, 20_000),
    ] {
        let o = compare(&dev, &mixed_specs(), paging, chunk, 6, 0).unwrap();
        assert!(o.ok(), "{paging:?} chunk {chunk}: {o:?}");
        // On the CPU the statistics are summed in the host order too.
        assert_eq!(o.norm_rel, 0.0, "{paging:?} chunk {chunk}");
        assert!(o.nonfinite >= 6, "the gradients carry NaN and infinities");
        assert!(o.param_mismatches == 0 && o.params == 149_116);
    }
}

#[test]
fn chunking_follows_the_cap() {
    let dev = Dev::cpu();
    let specs = mixed_specs();
    let one = DeviceAdamW8bit::from_host_chunked(
        &AdamW8bit::new(cfg(PagingPolicy::Always, 0.01), &specs).unwrap(),
        &dev,
        1,
    )
    .unwrap();
    assert_eq!(one.chunks(), specs.len());
    let grouped = DeviceAdamW8bit::from_host_chunked(
        &AdamW8bit::new(cfg(PagingPolicy::Always, 0.01), &specs).unwrap(),
        &dev,
        20_000,
    )
    .unwrap();
    assert!(grouped.chunks() > 1 && grouped.chunks() < specs.len());
    let resident = DeviceAdamW8bit::new(cfg(PagingPolicy::Never, 0.01), &specs, &dev).unwrap();
    assert_eq!(resident.chunks(), 1);
    assert_eq!(resident.placement(), StatePlacement::Resident);
    // Resident holds the arena; paged two staging buffers of the largest chunk.
    assert_eq!(resident.device_bytes(), resident.arena_bytes() as u64);
    let c = &grouped.core;
    let largest = c.chunks.iter().map(|c| c.bytes.len()).max().unwrap();
    assert_eq!(grouped.device_bytes(), 2 * largest as u64);
    for w in c.chunks.windows(2) {
        assert_eq!(w[0].tensors.end, w[1].tensors.start);
        assert_eq!(w[0].bytes.end, w[1].bytes.start);
        assert_eq!(w[0].params.end, w[1].params.start);
        assert_eq!(w[0].blocks.end, w[1].blocks.start);
    }
    for ch in &c.chunks {
        assert!(ch.bytes.len() <= 20_000 || ch.tensors.len() == 1, "{ch:?}");
    }
    assert_eq!(c.chunks.last().unwrap().params.end, grouped.numel());
    assert_eq!(c.chunks.last().unwrap().bytes.end, grouped.arena_bytes());
}

#[test]
fn arena_records_are_aligned_and_round_trip() {
    let specs = mixed_specs();
    let mut host = AdamW8bit::new(cfg(PagingPolicy::Never, 0.01), &specs).unwrap();
    let n: usize = specs.iter().map(|s| s.numel).sum();
    let mut p = random(n, 1.0, 3);
    for t in 0..2 {
        let g = grads(n, t);
        host.step(&mut split(&mut p, &specs), &split_ref(&g, &specs), 1e-3)
            .unwrap();
    }
    let core = &host.core;
    let d: Vec<_> = core
        .states
        .iter()
        .map(|s| (s.name.clone(), s.numel, s.format()))
        .collect();
    let slots = layout(&d);
    let mut end = 0;
    for (s, st) in slots.iter().zip(&core.states) {
        assert_eq!(s.rec_off, end);
        assert_eq!(s.rec_off % 16, 0);
        assert!(s
            .parts
            .iter()
            .all(|p| p % 4 == 0 || s.format == StateFormat::Blockwise8));
        assert_eq!(s.parts[2] % 4, 0);
        end = s.rec_off + s.rec_len;
        let mut rec = vec![0xAAu8; s.rec_len];
        encode(&st.storage, s, &mut rec);
        assert_eq!(decode(&rec, s), st.storage, "{}", s.name);
    }
    // The table's words are the slots' fields.
    let w = table_words(&slots);
    assert_eq!(w.len(), slots.len() * ENTRY_WORDS);
    let s = &slots[4];
    assert_eq!(w[4 * 16 + 2] as usize, s.numel);
    assert_eq!(w[4 * 16 + 4] as usize, s.block_start);
    assert_eq!(w[4 * 16 + 6], 1, "8-bit");
    assert_eq!(w[16 + 6], 0, "f32");
    assert_eq!(w[4 * 16 + 12] as usize, s.rec_off + s.parts[2]);
}

#[test]
fn adamw32_and_no_weight_decay_match_too() {
    let dev = Dev::cpu();
    let specs = mixed_specs();
    let n: usize = specs.iter().map(|s| s.numel).sum();
    for paging in [PagingPolicy::Never, PagingPolicy::Always] {
        let mut h32 = AdamW32::new(cfg(paging, 0.0), &specs).unwrap();
        let mut d32 = DeviceAdamW32::from_host_chunked(&h32, &dev, 30_000).unwrap();
        let mut h8 = AdamW8bit::new(cfg(paging, 0.0), &specs).unwrap();
        let mut d8 = DeviceAdamW8bit::new(cfg(paging, 0.0), &specs, &dev).unwrap();
        let p0 = random(n, 1.0, 9);
        let (mut p32, mut p8) = (p0.clone(), p0.clone());
        let (b32, b8) = (dev.upload(&p0, "p").unwrap(), dev.upload(&p0, "p").unwrap());
        let gb = dev.zeros::<f32>(n, "g").unwrap();
        for t in 0..4 {
            let g = grads(n, t);
            dev.write(gb.all(), &g).unwrap();
            let lr = 1e-3 * (t + 1) as f32;
            let a = h32
                .step(&mut split(&mut p32, &specs), &split_ref(&g, &specs), lr)
                .unwrap();
            let b = d32.step(b32.all(), gb.all(), lr).unwrap();
            assert_eq!(a, b);
            let a = h8
                .step(&mut split(&mut p8, &specs), &split_ref(&g, &specs), lr)
                .unwrap();
            let b = d8.step(b8.all(), gb.all(), lr).unwrap();
            assert_eq!(a, b);
        }
        assert_eq!(dev.download(b32.all()).unwrap(), p32);
        assert_eq!(dev.download(b8.all()).unwrap(), p8);
        assert_eq!(d32.to_host().unwrap(), h32);
        assert_eq!(d8.to_host().unwrap(), h8);
    }
}

#[test]
fn checkpoints_are_the_host_format_and_resume_on_either_path() {
    let dev = Dev::cpu();
    let dir = tempfile::tempdir().unwrap();
    let specs = mixed_specs();
    let n: usize = specs.iter().map(|s| s.numel).sum();
    let config = cfg(PagingPolicy::Always, 0.01);
    let p0 = random(n, 1.0, 11);
    let gs: Vec<Vec<f32>> = (0..6).map(|t| grads(n, t)).collect();
    let lr = |t: usize| 1e-3 + 1e-4 * t as f32;

    // The reference: 6 host steps.
    let mut reference = AdamW8bit::new(config, &specs).unwrap();
    let mut pr = p0.clone();
    for (t, g) in gs.iter().enumerate() {
        reference
            .step(&mut split(&mut pr, &specs), &split_ref(g, &specs), lr(t))
            .unwrap();
    }

    // 3 device steps, checkpoint, 3 host steps.
    let mut d = DeviceAdamW8bit::new(config, &specs, &dev).unwrap();
    let pb = dev.upload(&p0, "p").unwrap();
    let gb = dev.zeros::<f32>(n, "g").unwrap();
    for (t, g) in gs.iter().enumerate().take(3) {
        dev.write(gb.all(), g).unwrap();
        d.step(pb.all(), gb.all(), lr(t)).unwrap();
    }
    let path = dir.path().join("optimizer.safetensors");
    d.save_state(&path).unwrap();
    let mut h = AdamW8bit::load_state_for(&path, &specs).unwrap();
    assert_eq!(h, d.to_host().unwrap());
    assert_eq!(h.step_count(), 3);
    let mut ph = dev.download(pb.all()).unwrap();
    for (t, g) in gs.iter().enumerate().skip(3) {
        h.step(&mut split(&mut ph, &specs), &split_ref(g, &specs), lr(t))
            .unwrap();
    }
    assert_eq!(h, reference);
    assert_eq!(ph, pr);

    // 3 host steps, checkpoint, 3 device steps (resident this time).
    let mut h = AdamW8bit::new(config, &specs).unwrap();
    let mut ph = p0.clone();
    for (t, g) in gs.iter().enumerate().take(3) {
        h.step(&mut split(&mut ph, &specs), &split_ref(g, &specs), lr(t))
            .unwrap();
    }
    h.save_state(&path).unwrap();
    let mut d = DeviceAdamW8bit::load_state_for(&path, &specs, &dev).unwrap();
    assert_eq!(d.step_count(), 3);
    assert_eq!(d.placement(), StatePlacement::Paged);
    let pb = dev.upload(&ph, "p").unwrap();
    for (t, g) in gs.iter().enumerate().skip(3) {
        dev.write(gb.all(), g).unwrap();
        d.step(pb.all(), gb.all(), lr(t)).unwrap();
    }
    assert_eq!(d.to_host().unwrap(), reference);
    assert_eq!(dev.download(pb.all()).unwrap(), pr);

    // A device checkpoint loads as the host optimizer of the same state, also when
    // read without the parameter list.
    d.save_state(&path).unwrap();
    assert_eq!(AdamW8bit::load_state(&path).unwrap(), reference);
    // And the wrong kind is refused with the host's error.
    assert!(matches!(
        DeviceAdamW32::load_state_for(&path, &specs, &dev),
        Err(OptimError::WrongOptimizer { .. })
    ));
}

#[test]
fn bad_calls_change_nothing() {
    let dev = Dev::cpu();
    let specs = mixed_specs();
    let n: usize = specs.iter().map(|s| s.numel).sum();
    let mut d = DeviceAdamW8bit::new(cfg(PagingPolicy::Never, 0.01), &specs, &dev).unwrap();
    let p = dev.upload(&random(n, 1.0, 1), "p").unwrap();
    let g = dev.upload(&random(n, 1.0, 2), "g").unwrap();
    let short = dev.zeros::<f32>(n - 1, "short").unwrap();
    let before = d.to_host().unwrap();
    assert!(matches!(
        d.step(short.all(), g.all(), 1e-3),
        Err(OptimError::FlatLen {
            what: "parameter",
            ..
        })
    ));
    assert!(matches!(
        d.step(p.all(), short.all(), 1e-3),
        Err(OptimError::FlatLen {
            what: "gradient",
            ..
        })
    ));
    for lr in [f32::NAN, -1.0, f32::INFINITY] {
        assert!(matches!(
            d.step(p.all(), g.all(), lr),
            Err(OptimError::InvalidLr(_))
        ));
    }
    assert_eq!(d.to_host().unwrap(), before);
    assert_eq!(d.step_count(), 0);
    let e = DeviceAdamW8bit::new(
        cfg(PagingPolicy::Never, 0.01),
        &[ParamSpec::new("a", 3), ParamSpec::new("a", 4)],
        &dev,
    );
    assert!(matches!(e, Err(OptimError::DuplicateName(_))));
}

#[test]
fn empty_and_zero_sized_parameters_step() {
    let dev = Dev::cpu();
    let config = AdamWConfig {
        min_8bit_size: 0,
        paging: PagingPolicy::Always,
        ..AdamWConfig::default()
    };
    let mut d = DeviceAdamW8bit::new(config, &[], &dev).unwrap();
    let e = dev.zeros::<f32>(0, "e").unwrap();
    let s = d.step(e.all(), e.all(), 1e-3).unwrap();
    assert_eq!((s.step, s.nonfinite_grads, s.update_norm), (1, 0, 0.0));
    // A zero-element 8-bit tensor between two others.
    let specs = [
        ParamSpec::new("a", 300),
        ParamSpec::new("empty", 0),
        ParamSpec::new("b", 5),
    ];
    let mut h = AdamW8bit::new(config, &specs).unwrap();
    let mut d = DeviceAdamW8bit::from_host_chunked(&h, &dev, 1).unwrap();
    let mut p = random(305, 1.0, 4);
    let g = random(305, 1.0, 5);
    let pb = dev.upload(&p, "p").unwrap();
    let gb = dev.upload(&g, "g").unwrap();
    let a = h
        .step(&mut split(&mut p, &specs), &split_ref(&g, &specs), 1e-2)
        .unwrap();
    assert_eq!(d.step(pb.all(), gb.all(), 1e-2).unwrap(), a);
    assert_eq!(d.to_host().unwrap(), h);
    assert_eq!(dev.download(pb.all()).unwrap(), p);
}

#[test]
fn device_clipping_matches_the_host() {
    let dev = Dev::cpu();
    let specs = mixed_specs();
    let n: usize = specs.iter().map(|s| s.numel).sum();
    for (scale, max_norm) in [(1.0f32, 1.0f32), (1e-3, 1.0), (1.0, 0.0), (1.0, f32::NAN)] {
        let g: Vec<f32> = random(n, 1.0, 21).iter().map(|x| x * scale).collect();
        let mut h = g.clone();
        let want = crate::clip_grad_norm(&mut split(&mut h, &specs), max_norm);
        let b = dev.upload(&g, "g").unwrap();
        let got = clip_grad_norm(&dev, b.all(), max_norm).unwrap();
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "scale {scale} max {max_norm}"
        );
        assert_eq!(dev.download(b.all()).unwrap(), h);
    }
    // Non-finite norm: reported, gradients untouched.
    let mut g = random(n, 1.0, 22);
    g[77] = f32::NAN;
    let b = dev.upload(&g, "g").unwrap();
    assert!(clip_grad_norm(&dev, b.all(), 1.0).unwrap().is_nan());
    let back = dev.download(b.all()).unwrap();
    assert_eq!(back[0].to_bits(), g[0].to_bits());
    assert_eq!(back[n - 1].to_bits(), g[n - 1].to_bits());
}

#[test]
fn selftest_passes_on_the_cpu() {
    // The device side runs the host code here; this exercises the harness (random
    // special cases, comparisons, both placements) so the GPU run tests the kernel.
    for c in selftest_layers(&Dev::cpu(), 1) {
        assert!(c.ok, "{}: {}", c.name, c.detail);
    }
}
