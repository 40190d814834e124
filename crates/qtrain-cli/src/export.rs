//! `qtrain export`: a checkpoint as a PEFT adapter, or as a full model with the
//! adapter merged in (Hugging Face safetensors, or GGUF with `--gguf`).

use anyhow::{Context, Result};
use qtrain_train::merge::{export_merged, MergeBase};
use qtrain_train::peft::{self, PeftDtype};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint directory (runs/NAME/checkpoints/step-N) or a PEFT adapter directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
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

pub fn run(a: Args) -> Result<()> {
    let cache = qtrain_model::bnb::default_cache_root();
    // A qtrain checkpoint holds the adapter in qtrain's names plus the run's state;
    // a PEFT directory is read as is.
    let (adapter, model) = if a.checkpoint.join("trainer_state.json").exists() {
        qtrain_train::trainer::adapter_from_checkpoint(&a.checkpoint)?
    } else {
        let adapter = peft::read_peft_adapter(&a.checkpoint)?;
        let model = adapter.settings.base_model.clone();
        (adapter, model)
    };
    let model = a.model.clone().unwrap_or(model);
    let base = match a.merge_base {
        Base::Original => MergeBase::Original,
        Base::Dequantized => MergeBase::Dequantized,
    };
    if let Some(ft) = a.gguf {
        let dir = qtrain_train::models::resolve(&model, &cache)
            .with_context(|| format!("resolving the base model {model}"))?;
        let s = qtrain_train::gguf::export_gguf(
            &dir,
            &adapter,
            &a.out,
            ft,
            &qtrain_train::merge::MergeOptions::new(base, a.max_shard_bytes),
        )?;
        for n in &s.notes {
            tracing::warn!("{n}");
        }
        println!(
            "wrote {} ({:.1} MB)",
            s.gguf.display(),
            s.bytes as f64 / 1e6
        );
        println!(
            "wrote {} (ollama create NAME -f {})",
            s.modelfile.display(),
            s.modelfile.display()
        );
    } else if a.merged {
        let dir = qtrain_train::models::resolve(&model, &cache)
            .with_context(|| format!("resolving the base model {model}"))?;
        export_merged(&dir, &adapter, &a.out, base, a.max_shard_bytes)?;
        println!("wrote the merged model to {}", a.out.display());
    } else {
        let dtype = match a.dtype {
            Dtype::F32 => PeftDtype::F32,
            Dtype::Bf16 => PeftDtype::Bf16,
            Dtype::F16 => PeftDtype::F16,
        };
        let mut settings = adapter.settings.clone();
        settings.base_model = model;
        peft::write_peft_adapter(&a.out, &adapter.tensors, &settings, dtype)?;
        println!("wrote the PEFT adapter to {}", a.out.display());
    }
    Ok(())
}
