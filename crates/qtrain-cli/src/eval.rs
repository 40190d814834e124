//! `qtrain eval`: the mean token loss of a model (optionally with an adapter) on a
//! dataset file.

use anyhow::{Context, Result};
use qtrain_data::{DatasetConfig, Encoder, EvalStream};
use qtrain_reference::{forward_logits, forward_loss};
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
    #[arg(long, required_unless_present_any = ["tokens", "render_chat"])]
    data: Option<String>,
    /// Instead of the loss on a dataset: a JSON file of token-id rows of equal
    /// length (`[[1, 5, 9], [1, 7, 2]]`) whose logits are written to `--logits-out`
    /// (for comparisons with other implementations, e.g. scripts/check_hf_compat.py).
    #[arg(long, requires = "logits_out")]
    tokens: Option<PathBuf>,
    /// Where `--tokens` writes the logits: JSON `{"shape": [rows, seq, vocab],
    /// "logits": [...]}` (row-major, f32).
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// Instead of evaluating: a JSON file of conversations (`[[{"role": "user",
    /// "content": "..."}, ...], ...]`); prints, per conversation, the text the model's
    /// chat template renders and the ids qtrain trains on (`[{"text", "input_ids",
    /// "labels"}]`), to compare with transformers' `apply_chat_template`.
    #[arg(long, conflicts_with_all = ["tokens", "adapter"])]
    render_chat: Option<PathBuf>,
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
    if let Some(file) = &a.render_chat {
        return render_chat(&a.model, file, &cache);
    }
    let (base, dir) =
        qtrain_train::models::load_base(&a.model, &a.quantization, &a.device, &a.dtype, &cache)
            .with_context(|| format!("loading --model {}", a.model))?;
    let lora = match &a.adapter {
        Some(d) => Some(
            qtrain_train::peft::read_peft_adapter(d)
                .map_err(anyhow::Error::from)
                .and_then(|adapter| Ok(qtrain_train::models::lora_from_peft(&adapter, &base)?))
                .with_context(|| format!("--adapter {}", d.display()))?,
        ),
        None => None,
    };
    if let (Some(tokens), Some(out)) = (&a.tokens, &a.logits_out) {
        let text = std::fs::read_to_string(tokens)
            .with_context(|| format!("reading --tokens {}", tokens.display()))?;
        let rows: Vec<Vec<u32>> = serde_json::from_str(&text)
            .with_context(|| format!("--tokens {}: expected [[id, ...], ...]", tokens.display()))?;
        anyhow::ensure!(
            !rows.is_empty()
                && rows
                    .iter()
                    .all(|r| !r.is_empty() && r.len() == rows[0].len()),
            "--tokens {}: rows must be non-empty and of equal length",
            tokens.display()
        );
        let batch = TokenBatch::from_rows(&rows)?;
        let logits = forward_logits(&base, lora.as_ref(), &batch)?;
        let shape = logits.dims().to_vec();
        let values: Vec<f32> = logits
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let json = serde_json::json!({ "shape": shape, "logits": values });
        std::fs::write(out, serde_json::to_vec(&json)?)
            .with_context(|| format!("writing --logits-out {}", out.display()))?;
        println!("logits {shape:?} written to {}", out.display());
        return Ok(());
    }
    let data_path = a
        .data
        .clone()
        .expect("clap requires --data without --tokens");
    let data = DatasetConfig {
        path: data_path.clone(),
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
        data_path
    );
    let mean = sum / n as f64;
    println!(
        "mean token loss: {mean:.4} (perplexity {:.2}) over {n} tokens in {batches} batches",
        mean.exp()
    );
    Ok(())
}

/// `--render-chat`: the model's template and tokenizer applied to conversations, as
/// the data pipeline applies them for training (prompt tokens labelled -100).
fn render_chat(model: &str, file: &std::path::Path, cache: &std::path::Path) -> Result<()> {
    let dir = qtrain_train::models::resolve(model, cache)
        .with_context(|| format!("resolving --model {model}"))?;
    let enc = Encoder::from_model_dir(&dir, "auto")?;
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading --render-chat {}", file.display()))?;
    let conversations: Vec<Vec<qtrain_data::Message>> =
        serde_json::from_str(&text).with_context(|| {
            format!(
                "--render-chat {}: expected [[{{role, content}}, ...], ...]",
                file.display()
            )
        })?;
    let mut out = Vec::new();
    for messages in conversations {
        let rendered = enc.template().render(&messages, false)?;
        let encoded = enc.encode(&qtrain_data::Sample::Chat(messages), false)?;
        out.push(serde_json::json!({
            "text": rendered,
            "input_ids": encoded.tokens.input_ids,
            "labels": encoded.tokens.labels,
        }));
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
