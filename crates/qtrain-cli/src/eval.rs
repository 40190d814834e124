//! `qtrain eval`: the mean token loss of a model (optionally with an adapter) on a
//! dataset file.

use anyhow::{Context, Result};
use qtrain_data::{DatasetConfig, Encoder, EvalStream};
use qtrain_reference::forward_loss;
use qtrain_step::TokenBatch;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory, hub id or builtin:tiny.
    #[arg(long)]
    model: String,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Dataset file (.jsonl/.json/.parquet) or builtin:instructions; every record is used.
    #[arg(long)]
    data: String,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Stop after this many batches (0: the whole file).
    #[arg(long, default_value_t = 0)]
    max_batches: usize,
    /// Also compute the loss on prompt tokens (default: completions only, as trained).
    #[arg(long)]
    train_on_prompt: bool,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// `auto`, `bf16`, `f16` or `f32`.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// `nf4` (the frozen base qtrain trains against) or `none`.
    #[arg(long, default_value = "nf4")]
    quantization: String,
}

pub fn run(a: Args) -> Result<()> {
    let cache = qtrain_model::bnb::default_cache_root();
    let (base, dir) =
        qtrain_train::models::load_base(&a.model, &a.quantization, &a.device, &a.dtype, &cache)
            .with_context(|| format!("loading --model {}", a.model))?;
    let lora = match &a.adapter {
        Some(d) => {
            let adapter = qtrain_train::peft::read_peft_adapter(d)?;
            Some(
                qtrain_train::models::lora_from_peft(&adapter, &base)
                    .with_context(|| format!("--adapter {}", d.display()))?,
            )
        }
        None => None,
    };
    let data = DatasetConfig {
        path: a.data.clone(),
        seq_len: a.seq_len,
        batch_size: a.batch_size,
        train_on_prompt: a.train_on_prompt,
        // Hold out everything: the eval stream then reads every record in order.
        eval_samples: Some(usize::MAX),
        ..DatasetConfig::default()
    };
    let enc = Arc::new(Encoder::from_model_dir(&dir, &data.chat_template)?);
    let (mut sum, mut n, mut batches) = (0.0f64, 0usize, 0usize);
    for b in EvalStream::new(&data, enc)? {
        if a.max_batches > 0 && batches >= a.max_batches {
            break;
        }
        let b = b?;
        let tb = TokenBatch::new(
            b.input_ids,
            b.labels,
            b.position_ids,
            b.segment_ids,
            b.batch_size,
            b.seq_len,
        )?;
        let l = forward_loss(&base, lora.as_ref(), &tb)?;
        sum += l.loss_sum;
        n += l.valid_tokens;
        batches += 1;
    }
    anyhow::ensure!(
        n > 0,
        "{}: no tokens to evaluate (empty, or every label masked)",
        a.data
    );
    let mean = sum / n as f64;
    println!(
        "mean token loss: {mean:.4} (perplexity {:.2}) over {n} tokens in {batches} batches",
        mean.exp()
    );
    Ok(())
}
