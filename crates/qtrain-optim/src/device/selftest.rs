//! The device optimizer against the host [`AdamW8bit`] on random data, for
//! `qtrain doctor`: the same parameters, gradients and learning rates go through
//! both for a few steps, then every parameter (f32 bits), every 8-bit code and every
//! absmax (f32 bits) must be equal, and so must the non-finite counts; the update
//! norms are compared to a relative 1e-6 (see the module docs of [`super`]). The
//! gradients include a zero tensor (absmax 0 blocks), a block dominated by one large
//! element (momenta that round to the map's zero, hence the sign fix), and NaN and
//! infinite elements.
//!
//! Takes any [`Dev`]: on the CPU the device side runs the host code through the
//! state arena and the paging schedule, which is how CI tests this harness.

use std::time::Instant;

use qtrain_device::selftest::{random, Check};
use qtrain_device::Dev;

use super::DeviceAdamW8bit;
use crate::adamw::StateStorage;
use crate::error::Result;
use crate::{AdamW8bit, AdamWConfig, PagingPolicy, ParamSpec, StatePlacement};

/// The parameters of a Mistral-7B rank-16 LoRA on q/k/v/o for `layers` layers
/// (A: 16x4096; B: 4096x16 for q and o, 1024x16 for k and v): 425,984 per layer,
/// 13.6M for all 32.
pub fn mistral_lora_specs(layers: usize) -> Vec<ParamSpec> {
    let mut v = Vec::new();
    for l in 0..layers {
        for (p, out) in [("q", 4096), ("k", 1024), ("v", 1024), ("o", 4096)] {
            v.push(ParamSpec::new(
                format!("layers.{l}.self_attn.{p}_proj.lora_A"),
                16 * 4096,
            ));
            v.push(ParamSpec::new(
                format!("layers.{l}.self_attn.{p}_proj.lora_B"),
                out * 16,
            ));
        }
    }
    v
}

/// Tensors of mixed sizes: f32 state (below `min_8bit_size`), exact and ragged
/// 8-bit blocks.
pub fn mixed_specs() -> Vec<ParamSpec> {
    [
        ("one", 1),
        ("bias", 130),
        ("f32-largest", 4095),
        ("exact-16-blocks", 4096),
        ("ragged", 5000),
        ("odd", 257),
        ("big-ragged", 70_001),
        ("aligned", 65_536),
    ]
    .into_iter()
    .map(|(n, k)| ParamSpec::new(n, k))
    .collect()
}

/// The full self-test: the Mistral-7B layout (32 layers) for 3 steps, resident and
/// paged, with the time per step; and the mixed sizes for 5 steps, resident, paged,
/// and paged with one chunk per tensor.
pub fn selftest(dev: &Dev) -> Vec<Check> {
    selftest_layers(dev, 32)
}

/// [`selftest`] with `layers` layers of the Mistral layout (CI uses 1).
pub fn selftest_layers(dev: &Dev, layers: usize) -> Vec<Check> {
    let mut out = Vec::new();
    let big = mistral_lora_specs(layers);
    let n: usize = big.iter().map(|s| s.numel).sum();
    for (paging, what) in [
        (PagingPolicy::Never, "resident"),
        (PagingPolicy::Always, "paged"),
    ] {
        let name = format!(
            "adamw8bit fused update vs CPU, {what}, {:.1}M params (Mistral-7B q/k/v/o r16, {layers} layers), 3 steps",
            n as f64 / 1e6
        );
        out.push(run_check(
            name,
            compare(dev, &big, paging, super::PAGED_CHUNK_BYTES, 3, 5),
        ));
    }
    let mixed = mixed_specs();
    for (paging, chunk, what) in [
        (PagingPolicy::Never, super::PAGED_CHUNK_BYTES, "resident"),
        (PagingPolicy::Always, super::PAGED_CHUNK_BYTES, "paged"),
        (PagingPolicy::Always, 1, "paged, one chunk per tensor"),
    ] {
        let name = format!("adamw8bit fused update vs CPU, mixed sizes, {what}, 5 steps");
        out.push(run_check(name, compare(dev, &mixed, paging, chunk, 5, 0)));
    }
    out
}

fn run_check(name: String, r: Result<Outcome>) -> Check {
    match r {
        Ok(o) => Check {
            name,
            ok: o.ok(),
            detail: o.detail(),
        },
        Err(e) => Check {
            name,
            ok: false,
            detail: format!("error: {e}"),
        },
    }
}

/// What [`compare`] found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub params: usize,
    /// Parameters whose f32 bits differ.
    pub param_mismatches: usize,
    /// 8-bit codes that differ, and f32 moments (of f32 state) whose bits differ.
    pub code_mismatches: usize,
    /// Block absmax values whose bits differ.
    pub absmax_mismatches: usize,
    /// Steps whose non-finite gradient counts differ.
    pub nonfinite_mismatches: usize,
    /// Non-finite gradient elements seen (host count over all steps).
    pub nonfinite: u64,
    /// Largest relative difference of the update norms.
    pub norm_rel: f64,
    /// States that disagree in format, step count or shape (must be 0).
    pub structure_mismatches: usize,
    /// Seconds per device step (0 when not timed).
    pub secs_per_step: f64,
    /// Bytes of device memory the optimizer holds, and its arena.
    pub device_bytes: u64,
    pub arena_bytes: usize,
    pub chunks: usize,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.param_mismatches == 0
            && self.code_mismatches == 0
            && self.absmax_mismatches == 0
            && self.nonfinite_mismatches == 0
            && self.structure_mismatches == 0
            && self.norm_rel <= 1e-6
    }

    fn detail(&self) -> String {
        let mut s = format!(
            "{} of {} params differ, {} codes/moments differ, {} absmax differ, \
             {} non-finite grads (count mismatches: {}), update-norm rel diff {:.1e}, \
             {} chunk(s), {:.1} MiB on device",
            self.param_mismatches,
            self.params,
            self.code_mismatches,
            self.absmax_mismatches,
            self.nonfinite,
            self.nonfinite_mismatches,
            self.norm_rel,
            self.chunks,
            self.device_bytes as f64 / 1048576.0
        );
        if self.structure_mismatches > 0 {
            s.push_str(&format!(
                ", {} STATE STRUCTURE mismatches",
                self.structure_mismatches
            ));
        }
        if self.secs_per_step > 0.0 {
            // Bytes a resident step moves: params read+write, grads read, both codes
            // read+write, absmax read+write.
            let traffic = 12 * self.params + 4 * self.params + 16 * self.params.div_ceil(256);
            s.push_str(&format!(
                ", {:.3} ms/step ({:.0} GB/s effective)",
                self.secs_per_step * 1e3,
                traffic as f64 / self.secs_per_step / 1e9
            ));
        }
        s
    }
}

/// The gradients of step `t`: random, with the special cases of the module docs.
fn grads_for(specs: &[ParamSpec], t: usize) -> Vec<f32> {
    let n: usize = specs.iter().map(|s| s.numel).sum();
    let mut g = random(n, 1e-2, 1000 + t as u64);
    let offs: Vec<usize> = specs
        .iter()
        .scan(0, |o, s| {
            let r = *o;
            *o += s.numel;
            Some(r)
        })
        .collect();
    let last = specs.len() - 1;
    match t % 3 {
        0 => {
            // The first tensor's gradient is zero (as dA is when B starts at zero).
            g[..specs[0].numel].fill(0.0);
            // One block dominated by a single element.
            let o = offs[last.min(3)];
            let len = specs[last.min(3)].numel.min(256);
            for x in &mut g[o..o + len] {
                *x *= 1e-7;
            }
            g[o] = 1.0;
            // And one whole block of the last tensor.
            let o = offs[last];
            g[o..o + specs[last].numel.min(256)].fill(0.0);
        }
        1 => {
            g[n / 2] = f32::NAN;
            g[n - 1] = f32::INFINITY;
            g[offs[last] + specs[last].numel / 3] = f32::NEG_INFINITY;
        }
        _ => {}
    }
    g
}

/// Runs `steps` steps of the host optimizer and of the device optimizer (paging
/// policy `paging`, chunks of `chunk_bytes`) from the same random start and
/// compares them; then times `time_iters` more device steps.
pub fn compare(
    dev: &Dev,
    specs: &[ParamSpec],
    paging: PagingPolicy,
    chunk_bytes: usize,
    steps: usize,
    time_iters: usize,
) -> Result<Outcome> {
    let config = AdamWConfig {
        paging,
        ..AdamWConfig::default()
    };
    let n: usize = specs.iter().map(|s| s.numel).sum();
    let mut host = AdamW8bit::new(config, specs)?;
    let mut dopt = DeviceAdamW8bit::from_host_chunked(&host, dev, chunk_bytes)?;
    let want = match paging {
        PagingPolicy::Always => StatePlacement::Paged,
        _ => StatePlacement::Resident,
    };
    let mut o = Outcome {
        params: n,
        device_bytes: dopt.device_bytes(),
        arena_bytes: dopt.arena_bytes(),
        chunks: dopt.chunks(),
        ..Outcome::default()
    };
    if dopt.placement() != want {
        o.structure_mismatches += 1;
    }
    let p0 = random(n, 0.05, 7);
    let mut hp = p0.clone();
    let pbuf = dev.upload(&p0, "self-test parameters")?;
    let gbuf = dev.zeros::<f32>(n, "self-test gradients")?;
    let lrs = [1e-3f32, 2e-3, 5e-4, 1e-3, 3e-3];
    for t in 0..steps {
        let g = grads_for(specs, t);
        let lr = lrs[t % lrs.len()];
        let hs = {
            let mut ps: Vec<&mut [f32]> = Vec::new();
            let mut gs: Vec<&[f32]> = Vec::new();
            let (mut pr, mut gr) = (&mut hp[..], &g[..]);
            for s in specs {
                let (a, b) = pr.split_at_mut(s.numel);
                let (c, d) = gr.split_at(s.numel);
                ps.push(a);
                gs.push(c);
                pr = b;
                gr = d;
            }
            host.step(&mut ps, &gs, lr)?
        };
        dev.write(gbuf.all(), &g)?;
        let ds = dopt.step(pbuf.all(), gbuf.all(), lr)?;
        o.nonfinite += hs.nonfinite_grads;
        if hs.nonfinite_grads != ds.nonfinite_grads || hs.step != ds.step {
            o.nonfinite_mismatches += 1;
        }
        let rel = (f64::from(hs.update_norm) - f64::from(ds.update_norm)).abs()
            / f64::from(hs.update_norm).max(1e-30);
        o.norm_rel = o.norm_rel.max(rel);
    }
    let dp = dev.download(pbuf.all())?;
    o.param_mismatches = dp
        .iter()
        .zip(&hp)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    let back = dopt.to_host()?;
    if back.step_count() != host.step_count() || back.states().len() != host.states().len() {
        o.structure_mismatches += 1;
    }
    let bits = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count()
            + a.len().abs_diff(b.len())
    };
    let bytes = |a: &[u8], b: &[u8]| {
        a.iter().zip(b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len())
    };
    for (d, h) in back.states().iter().zip(host.states()) {
        if d.name() != h.name() || d.numel() != h.numel() {
            o.structure_mismatches += 1;
        }
        match (d.storage(), h.storage()) {
            (StateStorage::F32 { m, v }, StateStorage::F32 { m: hm, v: hv }) => {
                o.code_mismatches += bits(m, hm) + bits(v, hv);
            }
            (
                StateStorage::Blockwise8 {
                    m_q,
                    m_absmax,
                    v_q,
                    v_absmax,
                },
                StateStorage::Blockwise8 {
                    m_q: hmq,
                    m_absmax: hma,
                    v_q: hvq,
                    v_absmax: hva,
                },
            ) => {
                o.code_mismatches += bytes(m_q, hmq) + bytes(v_q, hvq);
                o.absmax_mismatches += bits(m_absmax, hma) + bits(v_absmax, hva);
            }
            _ => o.structure_mismatches += 1,
        }
    }
    if time_iters > 0 {
        dev.write(gbuf.all(), &grads_for(specs, 2))?;
        dopt.step(pbuf.all(), gbuf.all(), 1e-4)?;
        let t0 = Instant::now();
        for _ in 0..time_iters {
            dopt.step(pbuf.all(), gbuf.all(), 1e-4)?;
        }
        o.secs_per_step = t0.elapsed().as_secs_f64() / time_iters as f64;
    }
    Ok(o)
}
