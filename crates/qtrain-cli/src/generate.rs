//! `qtrain generate`: answer a prompt with base + adapter, to see what training did.

use anyhow::{Context, Result};
use qtrain_data::{DatasetConfig, Encoder, Message};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory, hub id or builtin:tiny.
    #[arg(long)]
    model: String,
    /// PEFT adapter directory.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The user message; rendered with the model's chat template.
    #[arg(long)]
    prompt: String,
    /// An optional system message.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy; otherwise sample with this temperature and --top-p.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0.9)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// The base weights: `nf4` (as in training) or `none` (as stored, e.g. a merged
    /// export, to compare with other runtimes on the same weights).
    #[arg(long, default_value = "nf4", value_parser = ["nf4", "none"])]
    quantization: String,
    /// Also print the prompt and answer token ids as one JSON line.
    #[arg(long)]
    print_ids: bool,
}

pub fn run(a: Args) -> Result<()> {
    let cache = qtrain_model::bnb::default_cache_root();
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
    let enc = Encoder::from_model_dir(&dir, &DatasetConfig::default().chat_template)?;
    let mut msgs = Vec::new();
    if let Some(s) = &a.system {
        msgs.push(Message::system(s.clone()));
    }
    msgs.push(Message::user(a.prompt.clone()));
    let ids = enc.encode_prompt(&msgs)?;
    let sampling = (a.temperature > 0.0).then_some(qtrain_train::generate::Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    });
    let out = qtrain_train::generate::generate(
        &base,
        lora.as_ref(),
        &ids,
        a.max_new_tokens,
        enc.eos_id(),
        sampling,
    )?;
    println!("{}", enc.decode(&out, true)?);
    if a.print_ids {
        // Generation stops before EOS, so fewer tokens than the limit means it was
        // reached.
        let json = serde_json::json!({
            "prompt_ids": ids,
            "ids": out,
            "stopped_at_eos": out.len() < a.max_new_tokens,
        });
        println!("{json}");
    }
    Ok(())
}
