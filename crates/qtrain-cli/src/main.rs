//! `qtrain`: the command line. Each subcommand lives in its own module and only
//! parses, resolves paths and reports; the work is done by the library crates.

mod bench;
mod doctor;
mod eval;
mod export;
mod generate;
mod init_random;
mod plan;
mod run;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "qtrain",
    version,
    about = "QLoRA fine-tuning of 7B chat models (Mistral, Llama) on one GPU",
    long_about = "qtrain loads a Hugging Face model with a frozen 4-bit NF4 base, trains LoRA \
adapters with hand-written backward passes and gradient checkpointing, and exports PEFT \
adapters. Without a GPU it runs the same math on the CPU (tiny models, tests).\n\n\
Logging: set RUST_LOG (e.g. RUST_LOG=debug)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train LoRA adapters on a frozen NF4 base within a time budget, with
    /// checkpoints, exact resume and a PEFT adapter at the end. Without --config it
    /// runs the built-in tiny CPU demo.
    Run(run::Args),
    /// Predict what a run config needs on a GPU: the memory breakdown against the
    /// GPU's memory, the largest micro-batch and sequence length that fit, and the
    /// estimated tokens/s and wall time. Reads only the model's config.json.
    Plan(plan::Args),
    /// Time training steps on a model of real shape (generated if absent) and print
    /// tokens/s, step time and model FLOPs utilization as JSON lines.
    Bench(bench::Args),
    /// Check a GPU install: run every CUDA kernel and a training step against the
    /// CPU reference; exits non-zero on any mismatch.
    Doctor(doctor::Args),
    /// Mean token loss of a model (with an optional PEFT adapter) on a dataset file.
    Eval(eval::Args),
    /// Export a checkpoint as a PEFT adapter, or as a merged full model.
    Export(export::Args),
    /// Answer a prompt with a model and optional adapter (greedy or top-p).
    Generate(generate::Args),
    /// Write a Hugging Face model directory with seeded random weights of a preset's
    /// real shapes, plus a tokenizer built in code (for tests and benchmarks).
    InitRandom(init_random::Args),
}

fn main() {
    // The time budget of `qtrain run` is the whole process: its clock starts here.
    let started = std::time::Instant::now();
    // candle's CPU matmul asks the thread pool size for every product; when
    // RAYON_NUM_THREADS is unset that means re-reading /proc/cpuinfo each time (tens
    // of microseconds per matmul, a large share of a tiny model's step). Fix it once,
    // before any pool starts.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => match run::run(a, started) {
            // A run stopped by a signal exits as shells report one (130, 143).
            Ok(code) if code != 0 => std::process::exit(code),
            r => r.map(|_| ()),
        },
        Command::Plan(a) => plan::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Doctor(a) => doctor::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Export(a) => export::run(a),
        Command::Generate(a) => generate::run(a),
        Command::InitRandom(a) => init_random::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {}", error_line(&e));
        std::process::exit(1);
    }
}

/// The whole context chain on one line ("loading X: file Y: key Z"), without
/// repeating a cause whose text the message before it already holds (library
/// errors print `path: <os error>` and also return the OS error as their source).
fn error_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let t = cause.to_string();
        if out.contains(&t) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&t);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_are_not_repeated() {
        /// As the libraries' `#[error("{path}: {source}")]` errors are.
        #[derive(Debug)]
        struct WithPath {
            path: String,
            source: std::io::Error,
        }
        impl std::fmt::Display for WithPath {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}: {}", self.path, self.source)
            }
        }
        impl std::error::Error for WithPath {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.source)
            }
        }
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = io.to_string();
        let e = anyhow::Error::new(WithPath {
            path: "data.jsonl".into(),
            source: io,
        })
        .context("reading the data");
        let line = error_line(&e);
        assert_eq!(line, format!("reading the data: data.jsonl: {text}"));
        assert_eq!(line.matches(&text).count(), 1, "{line}");
    }
}
