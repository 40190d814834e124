//! The training step's self-tests, for `qtrain doctor`: for each family's tiny
//! random model ([`TINY_FAMILIES`]), its training step on a device against the reference decoder on the CPU in f32 (the
//! fused engine in bf16 and fp16, and the reference decoder itself in f32 and
//! bf16), the fused engine with its gradient checkpoints offloaded to the host
//! against the same engine keeping them (bit-identical: the side stream's copies
//! and events on a GPU), KV-cached decoding against the full forward, and the loader's device
//! quantization against the CPU loader's. The kernels' own self-tests live beside
//! the kernels (`qtrain_device::ops`, `qtrain_optim::device`).
//!
//! Every check returns a [`Check`]; one that fails to run (an error) is a failed
//! check, and the others still run. On the CPU the same checks compare the CPU
//! paths (the engine's bf16/fp16 orchestration, the reference decoder in bf16):
//! how CI keeps this code tested.

use crate::models::write_random;
use candle_core::{DType, Device};
use qtrain_device::selftest::{rel_err, Check};
use qtrain_model::{BaseModel, LoadOptions, Quantization};
use qtrain_reference::forward_backward;
use qtrain_step::{HostTensor, LoraConfig, LoraGrads, LoraWeights, StepOptions, TokenBatch};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

/// Errors of a check that could not run, kept as text in its [`Check`].
type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The largest relative error (`max |got − ref| / max |ref|`, infinite on a
/// non-finite value) over matching gradient tensors.
fn grad_err(reference: &[HostTensor], got: &[HostTensor]) -> f64 {
    reference
        .iter()
        .zip(got)
        .map(|(a, b)| rel_err(&b.1, &a.1))
        .fold(0f64, f64::max)
}

/// The tiny models the checks train one step of, one per family: Mistral, Llama 3
/// (llama3 RoPE, tied embeddings), Qwen 2.5 (q/k/v biases, tied), Qwen 3 (q/k norms).
pub const TINY_FAMILIES: [&str; 4] = ["tiny", "tiny-llama3", "tiny-qwen2", "tiny-qwen3"];

/// A tiny random model of one family in a temporary directory (removed on drop), a
/// batch of random rows, and adapters on every projection with non-zero `B` (so that every
/// gradient is non-trivial): what the steps compare.
struct TinySetup {
    preset: &'static str,
    dir: PathBuf,
    batch: TokenBatch,
    lora: LoraConfig,
    opts: StepOptions,
}

impl Drop for TinySetup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TinySetup {
    fn new(preset: &'static str) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("qtrain-doctor-{}-{preset}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        write_random(preset, &dir, 3, usize::MAX)?;
        let vocab =
            qtrain_model::ModelConfig::from_file(&dir.join("config.json"))?.vocab_size as u32;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let rows: Vec<Vec<u32>> = (0..4)
            .map(|_| {
                (0..64)
                    .map(|_| rng.random_range(3..vocab.min(300)))
                    .collect()
            })
            .collect();
        let setup = TinySetup {
            preset,
            dir,
            batch: TokenBatch::from_rows(&rows)?,
            lora: LoraConfig {
                dropout: 0.0,
                targets: qtrain_model::PROJECTIONS.to_vec(),
                ..LoraConfig::default()
            },
            opts: StepOptions {
                checkpointing: true,
                dropout_seed: 0,
                micro_step: 0,
            },
        };
        Ok(setup)
    }

    fn valid(&self) -> f64 {
        self.batch.valid_targets() as f64
    }

    fn base(&self, device: &Device, dtype: DType) -> Result<BaseModel> {
        Ok(load(&self.dir, device, dtype)?)
    }

    fn model_and_adapters(
        &self,
        device: &Device,
        dtype: DType,
    ) -> Result<(BaseModel, LoraWeights)> {
        let base = self.base(device, dtype)?;
        let mut lora = LoraWeights::init(&self.lora, &base.config, device)?;
        let mut host = lora.to_host()?;
        for (i, (_, v, _)) in host.iter_mut().enumerate() {
            for (j, x) in v.iter_mut().enumerate() {
                if *x == 0.0 {
                    *x = (((i * 31 + j * 17) % 97) as f32 - 48.0) * 1e-3;
                }
            }
        }
        lora.update_from_host(&host)?;
        Ok((base, lora))
    }

    /// The reference decoder's step on `device` in `dtype`: the mean loss and the
    /// LoRA gradients.
    fn reference_step(&self, device: &Device, dtype: DType) -> Result<(f64, Vec<HostTensor>)> {
        let (base, lora) = self.model_and_adapters(device, dtype)?;
        let mut grads = LoraGrads::zeros_like(&lora)?;
        let valid = self.valid();
        let l = forward_backward(&base, &lora, &self.batch, &self.opts, valid, &mut grads)?;
        Ok((l.loss_sum / valid, grads.to_host()?))
    }
}

fn load(dir: &Path, device: &Device, dtype: DType) -> qtrain_model::Result<BaseModel> {
    BaseModel::load(
        dir,
        &LoadOptions {
            device: device.clone(),
            dtype,
            quantization: Quantization::default(),
            threads: 0,
        },
    )
}

/// One fused-engine training pass in compute type `T` over `batch` with `opts`: the
/// summed loss and the LoRA gradients.
fn engine_step<T: qtrain_device::Float + candle_core::WithDType>(
    base: &BaseModel,
    lora: &LoraWeights,
    s: &TinySetup,
    denominator: f64,
    opts: qtrain_engine::EngineOptions,
) -> Result<(f64, Vec<HostTensor>)> {
    let mut engine = qtrain_engine::Engine::<T>::new(base, lora, opts)?;
    let loss = engine
        .forward_backward(&s.batch, &s.opts, denominator)?
        .loss_sum;
    Ok((loss, engine.lora().grads_to_host(engine.device())?))
}

/// The fused engine on `device` in `dtype` (bf16; fp16 as 7.x GPUs train: the loss
/// scaled, the gradients divided back) against the reference `cpu` step; keeping
/// activations from the forward must change no bit.
fn engine_check(
    s: &TinySetup,
    device: &Device,
    dtype: DType,
    cpu: &(f64, Vec<HostTensor>),
) -> Result<Check> {
    let (base, lora) = s.model_and_adapters(device, dtype)?;
    let valid = s.valid();
    let scale = if dtype == DType::F16 { 4096.0 } else { 1.0 };
    let step_with = |opts: qtrain_engine::EngineOptions| match dtype {
        DType::F16 => engine_step::<half::f16>(&base, &lora, s, valid / scale, opts),
        _ => engine_step::<half::bf16>(&base, &lora, s, valid / scale, opts),
    };
    let (loss_sum, mut g) = step_with(Default::default())?;
    let kept = step_with(qtrain_engine::EngineOptions {
        save_attention_residual: true,
        kept_mlp_layers: qtrain_engine::ALL_LAYERS,
        ..Default::default()
    })?;
    let kept_same = kept.0 == loss_sum && kept.1 == g;
    for t in &mut g {
        t.1.iter_mut().for_each(|x| *x = (*x as f64 / scale) as f32);
    }
    let (cpu_loss, cpu_grads) = cpu;
    let l = loss_sum / valid;
    let loss_err = (l - cpu_loss).abs() / cpu_loss.abs();
    let gerr = grad_err(cpu_grads, &g);
    let ok = loss_err <= 2e-2 && gerr <= 6e-2 && kept_same;
    let dt = format!("{dtype:?}").to_lowercase();
    Ok(Check {
        name: format!(
            "{} training step, fused engine ({dt}) vs reference on CPU (f32)",
            s.preset
        ),
        ok,
        detail: format!(
            "loss {l:.5} vs {cpu_loss:.5} (rel {loss_err:.1e}), max rel gradient error \
             {gerr:.1e} over {} tensors{}; kept activations {}",
            g.len(),
            if scale != 1.0 {
                format!(", loss scale {scale}")
            } else {
                String::new()
            },
            if kept_same { "bit-identical" } else { "DIFFER" },
        ),
    })
}

/// The fused engine on `device` in bf16 with its gradient checkpoints offloaded to
/// (pinned) host memory against the same engine keeping them on the device, with
/// nothing else kept and with the attention half kept (which then travels too):
/// the loss and every gradient must be bit-identical. On a GPU this runs the side
/// streams' copies and their events (a missing wait shows as a difference); the
/// checkpoints of all but the last `OFFLOAD_RING` layers travel.
fn offload_check(s: &TinySetup, device: &Device) -> Result<Check> {
    let (base, lora) = s.model_and_adapters(device, DType::BF16)?;
    let valid = s.valid();
    let step_with = |offload_layer_inputs, save_attention_residual| {
        engine_step::<half::bf16>(
            &base,
            &lora,
            s,
            valid,
            qtrain_engine::EngineOptions {
                offload_layer_inputs,
                save_attention_residual,
                ..Default::default()
            },
        )
    };
    let mut verdicts = Vec::new();
    let mut same = true;
    let mut tensors = 0;
    for (half, what) in [(false, "inputs"), (true, "inputs and attention halves")] {
        let (kept, offloaded) = (step_with(false, half)?, step_with(true, half)?);
        let equal = kept == offloaded;
        same &= equal;
        tensors = kept.1.len();
        verdicts.push(format!(
            "{what}: {}",
            if equal { "bit-identical" } else { "DIFFER" }
        ));
    }
    let travel = base
        .config
        .num_hidden_layers
        .saturating_sub(qtrain_engine::OFFLOAD_RING);
    Ok(Check {
        name: format!(
            "{} training step, fused engine (bf16), checkpoints offloaded vs kept on the device",
            s.preset
        ),
        ok: same,
        detail: format!(
            "{travel} of {} layers' checkpoints through the host; loss and {tensors} gradient \
             tensors with {}",
            base.config.num_hidden_layers,
            verdicts.join(", ")
        ),
    })
}

/// The fused engine with FP8 products (`EngineOptions::fp8_base`) on `device` in
/// bf16 against the same engine on the CPU in f32, where the FP8 kernels run their
/// references (the same codes and scales; the inputs differ by bf16 rounding, so
/// some codes differ by one step): the loss within 2% and every LoRA gradient's
/// cosine similarity at least 0.98. `None` where the device has no FP8 tensor cores.
fn fp8_check(s: &TinySetup, device: &Device) -> Result<Option<Check>> {
    let dev = qtrain_device::Dev::from_candle(device)?;
    if qtrain_device::ops::fp8::support(&dev).is_err() {
        return Ok(None);
    }
    let fp8 = qtrain_engine::EngineOptions {
        fp8_base: true,
        ..Default::default()
    };
    let valid = s.valid();
    let (cpu_base, cpu_lora) = s.model_and_adapters(&Device::Cpu, DType::F32)?;
    let (want_loss, want) = engine_step::<f32>(&cpu_base, &cpu_lora, s, valid, fp8)?;
    let (base, lora) = s.model_and_adapters(device, DType::BF16)?;
    let (loss, got) = engine_step::<half::bf16>(&base, &lora, s, valid, fp8)?;
    let loss_err = (loss - want_loss).abs() / want_loss.abs();
    let cos = want
        .iter()
        .zip(&got)
        .map(|(w, g)| {
            let dot: f64 =
                w.1.iter()
                    .zip(&g.1)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
            let n = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            dot / (n(&w.1) * n(&g.1))
        })
        .fold(f64::INFINITY, f64::min);
    Ok(Some(Check {
        name: format!(
            "{} training step, fused engine (bf16) with FP8 products vs the same on CPU (f32)",
            s.preset
        ),
        ok: loss_err <= 2e-2 && cos >= 0.98,
        detail: format!(
            "loss rel {loss_err:.1e} (tol 2e-2), lowest gradient cosine {cos:.5} (tol 0.98) \
             over {} tensors",
            got.len()
        ),
    }))
}

/// The reference decoder on `device` in `dtype` against itself on the CPU in f32.
fn reference_check(
    s: &TinySetup,
    device: &Device,
    dtype: DType,
    (tol_loss, tol_grad): (f64, f64),
    cpu: &(f64, Vec<HostTensor>),
) -> Result<Check> {
    let (l, g) = s.reference_step(device, dtype)?;
    let (cpu_loss, cpu_grads) = cpu;
    let loss_err = (l - cpu_loss).abs() / cpu_loss.abs();
    let gerr = grad_err(cpu_grads, &g);
    Ok(Check {
        name: format!(
            "{} training step, reference ({dtype:?}) vs CPU (f32)",
            s.preset
        ),
        ok: loss_err <= tol_loss && gerr <= tol_grad,
        detail: format!(
            "loss {l:.5} vs {cpu_loss:.5} (rel {loss_err:.1e}), max rel gradient error \
             {gerr:.1e} over {} tensors",
            g.len()
        ),
    })
}

/// KV-cached decoding on `device` (bf16) against the full forward (generation's
/// fast path).
fn decode_check(s: &TinySetup, device: &Device) -> Result<Check> {
    let base = s.base(device, DType::BF16)?;
    let tokens: Vec<u32> = s.batch.input_ids[..48].to_vec();
    let e = qtrain_reference::decode::max_rel_error_vs_full_forward(&base, None, &tokens, 20)?;
    Ok(Check {
        name: format!("{} KV-cached decoding (bf16) vs full forward", s.preset),
        ok: e <= 3e-2,
        detail: format!("max rel logit error {e:.1e} (tol 3e-2)"),
    })
}

/// The loader quantizes on the device: every projection must equal the CPU
/// loader's, byte for byte.
fn loader_check(s: &TinySetup, device: &Device) -> Result<Check> {
    let (cpu_base, dev_base) = (
        s.base(&Device::Cpu, DType::F32)?,
        s.base(device, DType::BF16)?,
    );
    let projs: Vec<_> = cpu_base.layers.iter().flat_map(|l| &l.projs).collect();
    let dev_projs: Vec<_> = dev_base.layers.iter().flat_map(|l| &l.projs).collect();
    let differ = projs
        .iter()
        .zip(&dev_projs)
        .filter(|(c, g)| c.nf4().is_none() || c.nf4() != g.nf4())
        .count();
    Ok(Check {
        name: format!("{} loaded on the device vs the CPU loader", s.preset),
        ok: differ == 0 && projs.len() == dev_projs.len(),
        detail: format!("{differ} of {} NF4 projections differ", projs.len()),
    })
}

/// Every training-step check on `device` (see the module docs), family by family,
/// in the order `qtrain doctor` prints them.
pub fn step_checks(device: &Device) -> Vec<Check> {
    TINY_FAMILIES
        .iter()
        .flat_map(|preset| family_checks(preset, device))
        .collect()
}

/// The checks of one family's tiny model. Where the fused engine does not implement
/// the family (`crate::backend::fused_engine_gap`), that is one passing line saying
/// so: `train.engine = auto` trains it on the reference, which is checked.
fn family_checks(preset: &'static str, device: &Device) -> Vec<Check> {
    let failed = |name: &str, e: Box<dyn std::error::Error + Send + Sync>| Check {
        name: format!("{preset} {name}"),
        ok: false,
        detail: format!("FAILED: {e}"),
    };
    let setup = match TinySetup::new(preset) {
        Ok(s) => s,
        Err(e) => return vec![failed("set-up", e)],
    };
    let cpu = match setup.reference_step(&Device::Cpu, DType::F32) {
        Ok(c) => c,
        Err(e) => return vec![failed("training step, reference on CPU (f32)", e)],
    };
    let mut out =
        vec![decode_check(&setup, device).unwrap_or_else(|e| failed("kv-cache decode", e))];
    let gap = setup
        .base(&Device::Cpu, DType::F32)
        .map(|b| crate::backend::fused_engine_gap(&b.config));
    match gap {
        Ok(None) => {
            for dtype in [DType::BF16, DType::F16] {
                out.push(
                    engine_check(&setup, device, dtype, &cpu)
                        .unwrap_or_else(|e| failed(&format!("fused engine step {dtype:?}"), e)),
                );
            }
            out.push(
                offload_check(&setup, device)
                    .unwrap_or_else(|e| failed("fused engine step, offloaded checkpoints", e)),
            );
            match fp8_check(&setup, device) {
                Ok(Some(c)) => out.push(c),
                Ok(None) => {}
                Err(e) => out.push(failed("fused engine step, FP8 products", e)),
            }
        }
        Ok(Some(gap)) => out.push(Check {
            name: format!("{preset} fused engine"),
            ok: true,
            detail: format!("not run: {gap} (train.engine = auto trains it on the reference)"),
        }),
        Err(e) => out.push(failed("fused engine", e)),
    }
    for (dtype, tols) in [(DType::F32, (1e-4, 1e-3)), (DType::BF16, (2e-2, 6e-2))] {
        out.push(
            reference_check(&setup, device, dtype, tols, &cpu)
                .unwrap_or_else(|e| failed(&format!("training step {dtype:?}"), e)),
        );
    }
    out.push(loader_check(&setup, device).unwrap_or_else(|e| failed("loader quantization", e)));
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn step_checks_pass_on_the_cpu() {
        let checks = super::step_checks(&candle_core::Device::Cpu);
        // Per family: decoding, the engine (two dtypes and offloaded, or one line
        // saying why not), the reference in two dtypes, the loader.
        assert!(checks.len() >= 4 * 5, "{checks:?}");
        // The 4-layer tiny model sends two layers' checkpoints through the host,
        // with and without the kept attention half.
        assert!(
            checks
                .iter()
                .any(|c| c.name.starts_with("tiny training step")
                    && c.name.contains("offloaded")
                    && c.detail.starts_with("2 of 4 layers' checkpoints")
                    && c.detail.contains("inputs: bit-identical")
                    && c.detail
                        .contains("inputs and attention halves: bit-identical")),
            "{checks:?}"
        );
        for family in super::TINY_FAMILIES {
            assert!(
                checks
                    .iter()
                    .any(|c| c.name.starts_with(&format!("{family} "))),
                "{family} missing: {checks:?}"
            );
        }
        for c in &checks {
            assert!(c.ok, "{}: {}", c.name, c.detail);
        }
    }
}
