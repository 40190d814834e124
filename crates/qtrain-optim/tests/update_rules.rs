//! The update rule element by element: quantization maps, bias correction, epsilon and
//! weight-decay placement, sign preservation, non-finite gradients, validation, state
//! formats and placement.

mod common;

use common::bits_eq;
use qtrain_optim::{
    AdamW32, AdamW8bit, AdamWConfig, OptimError, PagingPolicy, ParamSpec, StateFormat,
    StatePlacement, StateStorage, BLOCKSIZE,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rel_close(a: f32, b: f64, tol: f64) -> bool {
    (f64::from(a) - b).abs() <= tol * b.abs().max(1e-30)
}

#[test]
fn quantization_maps_are_bitsandbytes_dynamic_maps() {
    let s = qtrain_quant::signed_dynamic_map();
    let u = qtrain_quant::unsigned_dynamic_map();
    assert!(
        s.windows(2).all(|w| w[0] < w[1]),
        "signed map not increasing"
    );
    assert!(
        u.windows(2).all(|w| w[0] < w[1]),
        "unsigned map not increasing"
    );
    // Signed: 127 negative codes, an exact zero at 127, 127 positive codes, 1.0 on top.
    // The extremes are the means of the top linspace(0.1, 1, 65) interval, and the
    // smallest magnitude is 1e-6 * 0.55.
    assert_eq!(s[127], 0.0);
    assert_eq!(s[255], 1.0);
    assert!(rel_close(s[254], 0.99296875, 1e-6));
    assert!(rel_close(s[0], -0.99296875, 1e-6));
    assert!(rel_close(s[128], 5.5e-7, 1e-5));
    assert!(rel_close(s[126], -5.5e-7, 1e-5));
    // Unsigned: 0 at the bottom, twice the resolution (linspace(0.1, 1, 129) on top).
    assert_eq!(u[0], 0.0);
    assert_eq!(u[255], 1.0);
    assert!(rel_close(u[254], 0.996484375, 1e-6));
    assert!(rel_close(u[1], 3.25e-7, 1e-5));
    assert_eq!(&qtrain_quant::create_dynamic_map(true, 7, 8)[..], &s[..]);
    assert_eq!(&qtrain_quant::create_dynamic_map(false, 7, 8)[..], &u[..]);
}

/// After one step from zero state the stored moments are `(1-b1) g` and `(1-b2) g²`,
/// quantized blockwise: each is within half the largest gap of its map (0.0071 of the
/// block absmax for the signed map, 0.0036 for the unsigned one) of the exact value.
#[test]
fn stored_moments_are_blockwise_quantized_exact_moments() {
    let n = 3 * BLOCKSIZE + 17;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let g: Vec<f32> = (0..n)
        .map(|i| rng.random_range(-1.0f32..1.0) * if i < BLOCKSIZE { 1e-4 } else { 10.0 })
        .collect();
    let mut p = vec![0.0f32; n];
    // 785 elements is below the default `min_8bit_size` (4096): lower it so this
    // parameter gets 8-bit state.
    let cfg = AdamWConfig {
        min_8bit_size: 1,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW8bit::new(cfg, &[ParamSpec::new("p", n)]).unwrap();
    opt.step(&mut [&mut p], &[&g], 1e-3).unwrap();
    let state = &opt.states()[0];
    assert_eq!(state.format(), StateFormat::Blockwise8);
    let StateStorage::Blockwise8 {
        m_absmax, v_absmax, ..
    } = state.storage()
    else {
        unreachable!()
    };
    assert_eq!(m_absmax.len(), 4);
    let (m, v) = state.moments();
    for (b, chunk) in g.chunks(BLOCKSIZE).enumerate() {
        // (1 - b1) and (1 - b2) as the optimizer computes them in f32
        // (1 - 0.999f32 is 1.0000467e-3, not 1e-3).
        let (c1, c2) = (1.0f32 - 0.9, 1.0f32 - 0.999);
        let exact_m: Vec<f32> = chunk.iter().map(|&x| c1 * x).collect();
        let exact_v: Vec<f32> = chunk.iter().map(|&x| c2 * x * x).collect();
        let am = exact_m.iter().fold(0.0f32, |a, x| a.max(x.abs()));
        let av = exact_v.iter().fold(0.0f32, |a, x| a.max(x.abs()));
        assert!(rel_close(m_absmax[b], f64::from(am), 1e-6));
        assert!(rel_close(v_absmax[b], f64::from(av), 1e-6));
        for (j, (&em, &ev)) in exact_m.iter().zip(&exact_v).enumerate() {
            let i = b * BLOCKSIZE + j;
            assert!(
                (m[i] - em).abs() <= 0.00704 * am,
                "m[{i}] = {} vs {em}",
                m[i]
            );
            assert!(
                (v[i] - ev).abs() <= 0.00352 * av,
                "v[{i}] = {} vs {ev}",
                v[i]
            );
            // The momentum keeps its sign.
            assert_eq!(m[i] < 0.0, em < 0.0, "m[{i}] = {} vs {em}", m[i]);
        }
    }
}

/// A momentum far below the smallest code of its block rounds to the map's zero, +0.
/// For a negative momentum that would flip its sign bit, so bitsandbytes (and we) nudge
/// its code to the smallest negative code; a tiny positive momentum stays at +0.
#[test]
fn tiny_negative_momentum_keeps_its_sign() {
    let n = BLOCKSIZE;
    let mut g = vec![0.0f32; n];
    g[0] = 1.0;
    g[1] = -1e-9; // 1e-9 of the block absmax; the smallest signed code is 5.5e-7
    g[2] = 1e-9;
    let mut p = vec![0.0f32; n];
    let cfg = AdamWConfig {
        min_8bit_size: 1,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW8bit::new(cfg, &[ParamSpec::new("p", n)]).unwrap();
    opt.step(&mut [&mut p], &[&g], 1e-3).unwrap();
    let (m, _) = opt.states()[0].moments();
    let smallest = 5.5e-7 * 0.1; // smallest code times the block absmax (0.1 * 1.0)
    assert!(
        m[1] < 0.0 && (f64::from(-m[1]) - smallest).abs() < 1e-12,
        "{}",
        m[1]
    );
    assert_eq!(m[2].to_bits(), 0.0f32.to_bits(), "{}", m[2]);
    assert_eq!(m[3], 0.0); // a zero gradient stays an exact zero
}

/// bitsandbytes' update in f64, straight from the formulas: bias-corrected moments,
/// `eps` added to `sqrt(v̂)`, weight decay applied after the Adam step.
fn reference_adamw_f64(
    p: &mut [f64],
    m: &mut [f64],
    v: &mut [f64],
    g: &[f32],
    t: i32,
    lr: f64,
    wd: f64,
) {
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    for i in 0..p.len() {
        let g = f64::from(g[i]);
        m[i] = b1 * m[i] + (1.0 - b1) * g;
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        let mh = m[i] / (1.0 - b1.powi(t));
        let vh = v[i] / (1.0 - b2.powi(t));
        p[i] -= lr * mh / (vh.sqrt() + eps);
        p[i] *= 1.0 - lr * wd;
    }
}

#[test]
fn adamw32_matches_the_textbook_formula_in_f64() {
    let n = 1000;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let p0: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut p = p0.clone();
    let mut p64: Vec<f64> = p0.iter().map(|&x| f64::from(x)).collect();
    let (mut m64, mut v64) = (vec![0.0; n], vec![0.0; n]);
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW32::new(cfg, &[ParamSpec::new("p", n)]).unwrap();
    let mut max_err = 0.0f64;
    for t in 1..=200 {
        // Gradients with a persistent component and noise, some tiny (eps matters).
        let g: Vec<f32> = (0..n)
            .map(|i| {
                let scale = if i % 10 == 0 { 1e-7 } else { 1.0 };
                scale * (0.3 * (i as f32 * 0.01).sin() + rng.random_range(-1.0f32..1.0))
            })
            .collect();
        let lr = 1e-3 * (1.0 + (t % 7) as f32 * 0.1);
        opt.step(&mut [&mut p], &[&g], lr).unwrap();
        reference_adamw_f64(&mut p64, &mut m64, &mut v64, &g, t, f64::from(lr), 0.1);
        for (a, b) in p.iter().zip(&p64) {
            max_err = max_err.max((f64::from(*a) - b).abs());
        }
    }
    // 200 steps of about 1e-3 each move parameters by up to 0.2; f32 rounding of p
    // (ulp ~6e-8 near 1) accumulates to a few 1e-7.
    assert!(max_err < 2e-6, "max abs error vs f64 reference {max_err}");
}

/// Weight decay is applied after the Adam update: `p = (p - lr * u) * (1 - lr*wd)`,
/// not PyTorch's `p * (1 - lr*wd) - lr * u`. With lr = 0.1, wd = 0.5, p = g = 1 the
/// first update `u` is 1, so bitsandbytes gives 0.9 * 0.95 = 0.855 and PyTorch 0.85.
#[test]
fn weight_decay_is_applied_after_the_update_in_both_formats() {
    let cfg = AdamWConfig {
        weight_decay: 0.5,
        min_8bit_size: 1,
        ..AdamWConfig::default()
    };
    let specs = [ParamSpec::new("p", 1)];
    let mut p8 = [1.0f32];
    let mut p32 = [1.0f32];
    let mut o8 = AdamW8bit::new(cfg, &specs).unwrap();
    let mut o32 = AdamW32::new(cfg, &specs).unwrap();
    assert_eq!(o8.states()[0].format(), StateFormat::Blockwise8);
    o8.step(&mut [&mut p8], &[&[1.0]], 0.1).unwrap();
    o32.step(&mut [&mut p32], &[&[1.0]], 0.1).unwrap();
    assert!((p8[0] - 0.855).abs() < 1e-6, "{}", p8[0]);
    assert!((p32[0] - 0.855).abs() < 1e-6, "{}", p32[0]);
}

/// With zero gradients the Adam term is exactly zero, so every step multiplies the
/// parameters by exactly `1 - lr*wd` (in f32), whatever the state format.
#[test]
fn zero_gradient_steps_are_pure_decoupled_decay() {
    let cfg = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let n = 5000; // 8-bit state in AdamW8bit
    let p0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let g = vec![0.0f32; n];
    let lr = 0.05f32;
    let mut expected = p0.clone();
    let mut p8 = p0.clone();
    let mut p32 = p0.clone();
    let mut o8 = AdamW8bit::new(cfg, &[ParamSpec::new("p", n)]).unwrap();
    let mut o32 = AdamW32::new(cfg, &[ParamSpec::new("p", n)]).unwrap();
    for _ in 0..10 {
        let s = o8.step(&mut [&mut p8], &[&g], lr).unwrap();
        o32.step(&mut [&mut p32], &[&g], lr).unwrap();
        assert!(s.update_norm > 0.0);
        for x in &mut expected {
            *x *= 1.0 - lr * 0.01;
        }
    }
    assert!(bits_eq(&p8, &expected));
    assert!(bits_eq(&p32, &expected));
    // Without weight decay nothing moves at all.
    let mut o = AdamW8bit::new(
        AdamWConfig {
            weight_decay: 0.0,
            ..cfg
        },
        &[ParamSpec::new("p", n)],
    )
    .unwrap();
    let mut p = p0.clone();
    let s = o.step(&mut [&mut p], &[&g], lr).unwrap();
    assert!(bits_eq(&p, &p0));
    assert_eq!(s.update_norm, 0.0);
}

/// A NaN or infinite gradient element leaves its parameter alone and resets its
/// moments; the other elements update normally.
#[test]
fn non_finite_gradient_elements_reset_state_and_skip_the_parameter() {
    for min_8bit_size in [1usize, usize::MAX] {
        let cfg = AdamWConfig {
            min_8bit_size,
            ..AdamWConfig::default()
        };
        let n = 300;
        let mut p = vec![0.5f32; n];
        let mut opt = AdamW8bit::new(cfg, &[ParamSpec::new("p", n)]).unwrap();
        let g: Vec<f32> = (0..n).map(|i| 0.1 + i as f32 * 1e-3).collect();
        for _ in 0..3 {
            opt.step(&mut [&mut p], &[&g], 1e-2).unwrap();
        }
        let before = p.clone();
        let mut bad = g.clone();
        bad[5] = f32::NAN;
        bad[260] = f32::NEG_INFINITY;
        let stats = opt.step(&mut [&mut p], &[&bad], 1e-2).unwrap();
        assert_eq!(stats.nonfinite_grads, 2);
        assert!(stats.update_norm.is_finite());
        assert_eq!(p[5], before[5]);
        assert_eq!(p[260], before[260]);
        assert!(p[6] < before[6] && p[259] < before[259]);
        let (m, v) = opt.states()[0].moments();
        assert_eq!((m[5], v[5], m[260], v[260]), (0.0, 0.0, 0.0, 0.0));
        assert!(m[6] > 0.0 && v[6] > 0.0);
        assert!(p.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn invalid_calls_are_rejected_and_change_nothing() {
    let specs = [ParamSpec::new("a", 10), ParamSpec::new("b", 5)];
    let mut opt = AdamW8bit::new(AdamWConfig::default(), &specs).unwrap();
    let (mut a, mut b) = (vec![1.0f32; 10], vec![1.0f32; 5]);
    let (ga, gb) = (vec![0.1f32; 10], vec![0.1f32; 5]);
    opt.step(&mut [&mut a, &mut b], &[&ga, &gb], 1e-3).unwrap();
    let snapshot = opt.clone();
    let (a1, b1) = (a.clone(), b.clone());

    let err = opt.step(&mut [&mut a], &[&ga], 1e-3).unwrap_err();
    assert!(matches!(
        err,
        OptimError::ParamCount {
            expected: 2,
            params: 1,
            grads: 1
        }
    ));
    let short = vec![0.1f32; 4];
    let err = opt
        .step(&mut [&mut a, &mut b], &[&ga, &short], 1e-3)
        .unwrap_err();
    assert!(
        matches!(&err, OptimError::ParamLen { name, what: "gradient", expected: 5, found: 4 } if name == "b"),
        "{err}"
    );
    assert!(err.to_string().contains("'b'"));
    for lr in [-1e-3f32, f32::NAN, f32::INFINITY] {
        let err = opt
            .step(&mut [&mut a, &mut b], &[&ga, &gb], lr)
            .unwrap_err();
        assert!(matches!(err, OptimError::InvalidLr(_)));
    }
    assert_eq!(opt, snapshot);
    assert!(bits_eq(&a, &a1) && bits_eq(&b, &b1));
    assert_eq!(opt.step_count(), 1);

    let dup = [ParamSpec::new("a", 1), ParamSpec::new("a", 2)];
    assert!(matches!(
        AdamW8bit::new(AdamWConfig::default(), &dup),
        Err(OptimError::DuplicateName(n)) if n == "a"
    ));
    assert!(AdamW32::new(AdamWConfig::default(), &[ParamSpec::new("", 1)]).is_err());
    for bad in [
        AdamWConfig {
            betas: (1.0, 0.999),
            ..AdamWConfig::default()
        },
        AdamWConfig {
            eps: 0.0,
            ..AdamWConfig::default()
        },
        AdamWConfig {
            weight_decay: -1.0,
            ..AdamWConfig::default()
        },
    ] {
        assert!(matches!(
            AdamW8bit::new(bad, &specs),
            Err(OptimError::InvalidConfig(_))
        ));
    }
}

#[test]
fn small_tensors_keep_f32_state_and_sizes_are_accounted() {
    let specs = [ParamSpec::new("small", 4095), ParamSpec::new("big", 4096)];
    let o8 = AdamW8bit::new(AdamWConfig::default(), &specs).unwrap();
    assert_eq!(o8.states()[0].format(), StateFormat::F32);
    assert_eq!(o8.states()[1].format(), StateFormat::Blockwise8);
    // f32: 8 bytes per element; 8-bit: 2 bytes per element + two f32 absmax per block.
    assert_eq!(o8.states()[0].bytes(), 4095 * 8);
    assert_eq!(o8.states()[1].bytes(), 4096 * 2 + 16 * 8);
    assert_eq!(o8.state_bytes(), 4095 * 8 + 4096 * 2 + 16 * 8);
    assert_eq!(o8.param_specs(), specs.to_vec());

    let o32 = AdamW32::new(AdamWConfig::default(), &specs).unwrap();
    assert!(o32.states().iter().all(|s| s.format() == StateFormat::F32));
    assert_eq!(o32.state_bytes(), (4095 + 4096) * 8);
}

#[test]
fn placement_follows_the_paging_policy() {
    let specs = [ParamSpec::new("w", 1 << 16)]; // 8-bit: 131072 + 2048 bytes
    let bytes = 2 * (1u64 << 16) + 8 * 256;
    let with = |paging| {
        AdamW8bit::new(
            AdamWConfig {
                paging,
                ..AdamWConfig::default()
            },
            &specs,
        )
        .unwrap()
    };
    assert_eq!(
        with(PagingPolicy::default()).placement(),
        StatePlacement::Resident
    );
    assert_eq!(
        with(PagingPolicy::Auto {
            threshold_bytes: bytes - 1
        })
        .placement(),
        StatePlacement::Paged
    );
    assert_eq!(
        with(PagingPolicy::Auto {
            threshold_bytes: bytes
        })
        .placement(),
        StatePlacement::Resident
    );
    assert_eq!(
        with(PagingPolicy::Always).placement(),
        StatePlacement::Paged
    );
    assert_eq!(
        with(PagingPolicy::Never).placement(),
        StatePlacement::Resident
    );
}

#[test]
fn config_round_trips_through_toml() {
    let text =
        "betas = [0.9, 0.95]\nweight-decay = 0.0\npaging = { auto = { threshold-bytes = 1000 } }\n";
    let cfg: AdamWConfig = toml::from_str(text).unwrap();
    assert_eq!(
        cfg,
        AdamWConfig {
            betas: (0.9, 0.95),
            weight_decay: 0.0,
            paging: PagingPolicy::Auto {
                threshold_bytes: 1000
            },
            ..AdamWConfig::default()
        }
    );
    let back: AdamWConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
    let always: AdamWConfig = toml::from_str("paging = \"always\"\n").unwrap();
    assert_eq!(always.paging, PagingPolicy::Always);
    assert!(toml::from_str::<AdamWConfig>("lr = 1e-3\n").is_err());
}

/// Above 1 M elements in total the step runs parameters on several threads. Each
/// element's arithmetic is independent of the split, so a two-parameter optimizer
/// (threaded) equals two one-parameter optimizers (each below the threshold, so on one
/// thread) bit for bit.
#[test]
fn threaded_step_equals_single_threaded_step() {
    let n = 600_000;
    let cfg = AdamWConfig::default();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut rand_vec =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
    let (a0, b0) = (rand_vec(n), rand_vec(n));
    let specs = [ParamSpec::new("a", n), ParamSpec::new("b", n)];
    let mut both = AdamW8bit::new(cfg, &specs).unwrap();
    let mut only_a = AdamW8bit::new(cfg, &specs[..1]).unwrap();
    let mut only_b = AdamW8bit::new(cfg, &specs[1..]).unwrap();
    let (mut a1, mut b1) = (a0.clone(), b0.clone());
    let (mut a2, mut b2) = (a0.clone(), b0.clone());
    for _ in 0..3 {
        let (ga, gb) = (rand_vec(n), rand_vec(n));
        let s = both
            .step(&mut [&mut a1, &mut b1], &[&ga, &gb], 1e-3)
            .unwrap();
        let sa = only_a.step(&mut [&mut a2], &[&ga], 1e-3).unwrap();
        let sb = only_b.step(&mut [&mut b2], &[&gb], 1e-3).unwrap();
        let norm = (f64::from(sa.update_norm).powi(2) + f64::from(sb.update_norm).powi(2)).sqrt();
        assert!((f64::from(s.update_norm) - norm).abs() <= 1e-6 * norm);
    }
    assert!(bits_eq(&a1, &a2) && bits_eq(&b1, &b2));
    assert_eq!(both.states()[0], only_a.states()[0]);
    assert_eq!(both.states()[1], only_b.states()[0]);
}
