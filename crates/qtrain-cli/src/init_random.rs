//! `qtrain init-random`: a seeded random model with a preset's real shapes.

use anyhow::{Context, Result};
use qtrain_model::{ModelConfig, PRESETS};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Architecture preset: tiny, tiny-window, mistral-7b-v0.1, mistral-7b-v0.3,
    /// llama-2-7b, llama-3-8b.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Output directory (created; existing model files are overwritten).
    #[arg(long)]
    out: PathBuf,
    /// RNG seed: the same seed gives the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest shard in bytes (HF's default is 5 GB); a smaller model is one file.
    #[arg(long, default_value_t = 5_000_000_000)]
    max_shard_bytes: usize,
}

pub fn run(a: Args) -> Result<()> {
    let started = Instant::now();
    let cfg = write(&a.preset, &a.out, a.seed, a.max_shard_bytes)?;
    println!(
        "wrote {} ({} preset, {:.2}B parameters, seed {}) in {:.1}s",
        a.out.display(),
        a.preset,
        cfg.num_parameters() as f64 / 1e9,
        a.seed,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn write(preset: &str, out: &Path, seed: u64, max_shard_bytes: usize) -> Result<ModelConfig> {
    qtrain_train::models::write_random(preset, out, seed, max_shard_bytes).with_context(|| {
        format!(
            "--preset {preset} (known: {}) into {}",
            PRESETS.join(", "),
            out.display()
        )
    })
}
