//! `qtrain export`: a checkpoint as a PEFT adapter, or as a full model with the
//! adapter merged in (Hugging Face safetensors, or GGUF with `--gguf`). Writes
//! atomically (a failed or disk-full export leaves no partial files) and refuses to
//! write into a non-empty directory without --force.

use anyhow::{bail, Context, Result};
use qtrain_train::ckpt_io;
use qtrain_train::merge::{export_merged, MergeBase};
use qtrain_train::peft::{self, PeftAdapter, PeftDtype};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint directory (runs/NAME/checkpoints/step-N) or a PEFT adapter directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Write into --out although it holds files (same-named files are replaced,
    /// others left alone).
    #[arg(long)]
    force: bool,
    /// Write the full model with W + scale*B*A merged in (sharded HF safetensors,
    /// config and tokenizer), loadable by transformers and vLLM.
    #[arg(long)]
    merged: bool,
    /// What the adapter is merged onto: the original bf16 weights, or the NF4 base
    /// dequantized (exactly what the adapter was trained against).
    #[arg(long, value_enum, default_value_t = Base::Original)]
    merge_base: Base,
    /// Dtype of the adapter tensors (adapter export).
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// The base model, when exporting merged from a bare PEFT adapter (checkpoints
    /// record their model).
    #[arg(long)]
    model: Option<String>,
    /// Largest shard of a merged export in bytes.
    #[arg(long, default_value_t = 5_000_000_000)]
    max_shard_bytes: usize,
    /// Write the merged model as OUT/model-TYPE.gguf for llama.cpp, Ollama and LM
    /// Studio (f16, bf16, q8_0 or q4_k_m), with an Ollama Modelfile beside it.
    #[arg(long, value_name = "TYPE", conflicts_with = "merged", value_parser = parse_gguf)]
    gguf: Option<qtrain_gguf::FileType>,
}

fn parse_gguf(s: &str) -> Result<qtrain_gguf::FileType, String> {
    qtrain_gguf::FileType::parse(s)
        .ok_or_else(|| format!("`{s}`: expected f16, bf16, q8_0 or q4_k_m"))
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Base {
    Original,
    Dequantized,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Dtype {
    F32,
    Bf16,
    F16,
}

/// The adapter in `dir` (a qtrain checkpoint or a PEFT adapter directory) and the
/// model it was trained on; a directory that is neither is told what it lacks.
fn read_adapter(dir: &Path) -> Result<(PeftAdapter, String)> {
    if dir.join("trainer_state.json").exists() {
        return Ok(qtrain_train::trainer::adapter_from_checkpoint(dir)?);
    }
    if dir.join("adapter_config.json").exists() {
        let adapter = peft::read_peft_adapter(dir)?;
        let model = adapter.settings.base_model.clone();
        return Ok((adapter, model));
    }
    if !dir.is_dir() {
        bail!("--checkpoint {}: no such directory", dir.display());
    }
    let hint = if dir.join("checkpoints").is_dir() {
        format!(
            "; it looks like a run's output directory: export one of its checkpoints \
             (--checkpoint {}) or use its adapter ({})",
            latest_hint(&dir.join("checkpoints")),
            dir.join("adapter").display()
        )
    } else if dir.join("latest").is_file() {
        format!(
            "; it looks like a run's checkpoints directory: --checkpoint {}",
            latest_hint(dir)
        )
    } else {
        String::new()
    };
    bail!(
        "--checkpoint {}: neither a qtrain checkpoint (it has no trainer_state.json) nor a PEFT \
         adapter directory (it has no adapter_config.json){hint}",
        dir.display()
    )
}

fn latest_hint(ckpt_root: &Path) -> String {
    ckpt_io::latest(ckpt_root)
        .map(|d| d.display().to_string())
        .unwrap_or_else(|_| format!("{}/step-NNNNNNNN", ckpt_root.display()))
}

/// Whether `dir` exists and holds anything.
fn non_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

pub fn run(a: Args) -> Result<()> {
    let cache = qtrain_model::bnb::default_cache_root();
    // A qtrain checkpoint holds the adapter in qtrain's names plus the run's state;
    // a PEFT directory is read as is.
    let (adapter, model) = read_adapter(&a.checkpoint)?;
    if a.out.is_file() {
        bail!("--out {}: a file, not a directory", a.out.display());
    }
    if non_empty(&a.out) && !a.force {
        bail!(
            "--out {}: the directory is not empty; choose an empty or new one, or pass --force \
             to replace the files the export writes",
            a.out.display()
        );
    }
    let model = a.model.clone().unwrap_or(model);
    let base = match a.merge_base {
        Base::Original => MergeBase::Original,
        Base::Dequantized => MergeBase::Dequantized,
    };
    if a.merged || a.gguf.is_some() {
        let dir = qtrain_train::models::resolve(&model, &cache)
            .with_context(|| format!("resolving the base model {model}"))?;
        if a.out.canonicalize().ok() == Some(dir.canonicalize()?) {
            bail!(
                "--out {}: the source model directory; choose another output directory",
                a.out.display()
            );
        }
        let cfg = qtrain_model::ModelConfig::from_file(&dir.join("config.json"))?;
        qtrain_train::models::check_adapter_complete(&adapter, &cfg)
            .with_context(|| format!("--checkpoint {}", a.checkpoint.display()))?;
        // bf16 weights: about the source's size when it is bf16.
        let bf16_bytes = qtrain_train::budget::model_bytes(&dir);
        if let Some(ft) = a.gguf {
            // Bits per weight of the file type against bf16's 16.
            let share = match ft {
                qtrain_gguf::FileType::F16 | qtrain_gguf::FileType::BF16 => 1.0,
                qtrain_gguf::FileType::Q8_0 => 8.5 / 16.0,
                qtrain_gguf::FileType::Q4KM => 5.0 / 16.0,
            };
            let expected = (bf16_bytes as f64 * share) as u64;
            let opts = qtrain_train::merge::MergeOptions::new(base, a.max_shard_bytes);
            let mut written = None;
            ckpt_io::write_dir_atomic(&a.out, Some(expected), None, |tmp| {
                written = Some(qtrain_train::gguf::export_gguf(
                    &dir, &adapter, tmp, ft, &opts,
                )?);
                Ok(())
            })?;
            let s = written.expect("the export ran");
            for n in &s.notes {
                tracing::warn!("{n}");
            }
            // The summary names the temporary directory the files were written in.
            let placed = |p: &Path| a.out.join(p.file_name().expect("a file"));
            let (gguf, modelfile) = (placed(&s.gguf), placed(&s.modelfile));
            println!("wrote {} ({:.1} MB)", gguf.display(), s.bytes as f64 / 1e6);
            println!(
                "wrote {} (ollama create NAME -f {})",
                modelfile.display(),
                modelfile.display()
            );
        } else {
            ckpt_io::write_dir_atomic(&a.out, Some(bf16_bytes), None, |tmp| {
                export_merged(&dir, &adapter, tmp, base, a.max_shard_bytes)?;
                Ok(())
            })?;
            println!("wrote the merged model to {}", a.out.display());
        }
    } else {
        let dtype = match a.dtype {
            Dtype::F32 => PeftDtype::F32,
            Dtype::Bf16 => PeftDtype::Bf16,
            Dtype::F16 => PeftDtype::F16,
        };
        let mut settings = adapter.settings.clone();
        settings.base_model = model;
        let elem = if matches!(a.dtype, Dtype::F32) { 4 } else { 2 };
        let expected: u64 = adapter
            .tensors
            .iter()
            .map(|t| t.1.len() as u64 * elem)
            .sum();
        ckpt_io::write_dir_atomic(&a.out, Some(expected), None, |tmp| {
            peft::write_peft_adapter(tmp, &adapter.tensors, &settings, dtype)?;
            Ok(())
        })?;
        println!("wrote the PEFT adapter to {}", a.out.display());
    }
    Ok(())
}
