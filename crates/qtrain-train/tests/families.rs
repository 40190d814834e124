//! Each family end to end on the CPU: its tiny random model with the family's
//! built-in tokenizer (real chat template and special tokens) trains on the built-in
//! instructions (the loss falls), resumes bit for bit, exports a PEFT adapter with
//! PEFT's module names (biases are no adapter tensors) and a merged model that
//! transformers would load as that architecture and whose logits equal base +
//! adapter.

use qtrain_model::safetensors_io::ShardedTensors;
use qtrain_model::{BaseModel, LoadOptions, ModelConfig, Quantization};
use qtrain_reference::forward_logits;
use qtrain_step::TokenBatch;
use qtrain_train::config::RunConfig;
use qtrain_train::trainer::{run, Resume, RunOptions, RunSummary};
use qtrain_train::SimClock;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

const FAMILIES: [(&str, &str, &str); 4] = [
    ("tiny-llama3", "llama", "LlamaForCausalLM"),
    ("tiny-llama2", "llama", "LlamaForCausalLM"),
    ("tiny-qwen2", "qwen2", "Qwen2ForCausalLM"),
    ("tiny-qwen3", "qwen3", "Qwen3ForCausalLM"),
];

fn config(preset: &str, out: &Path, steps: u64, dropout: f64) -> RunConfig {
    let text = format!(
        r#"
[model]
path = "builtin:{preset}"
device = "cpu"
[lora]
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
dropout = {dropout}
[data]
seq_len = 64
batch_size = 4
eval_samples = 40
[train]
grad_accum = 1
gradient_checkpointing = true
[optimizer]
lr = 3e-3
warmup_steps = 3
[budget]
steps = {steps}
[checkpoint]
output_dir = "{}"
every_steps = 0
every_minutes = 0.0
keep_last = 2
[eval]
every_steps = 0
max_batches = 2
samples = 0
[log]
progress_bar = false
"#,
        out.display()
    );
    RunConfig::from_toml_str(&text, Path::new("families.toml"), &[]).unwrap()
}

fn go(cfg: RunConfig, cache: &Path, resume: Option<Resume>, halt: Option<u64>) -> RunSummary {
    run(RunOptions {
        config: cfg,
        resume,
        clock: Box::new(SimClock::default()),
        stop: Arc::new(AtomicBool::new(false)),
        halt_at_step: halt,
        cache_root: cache.to_path_buf(),
        collective: Arc::new(qtrain_dist::SingleProcess),
        engine_memory_limit: None,
        overwrite: false,
        allow_data_change: false,
        write_quota: None,
    })
    .unwrap()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn every_family_learns_on_the_cpu() {
    for (preset, ..) in FAMILIES {
        let cache = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let s = go(
            config(preset, out.path(), 40, 0.0),
            cache.path(),
            None,
            None,
        );
        let (before, after) = (s.first_eval_loss.unwrap(), s.final_eval_loss.unwrap());
        eprintln!("{preset}: eval loss {before:.3} -> {after:.3}");
        assert!(
            after < before - 0.3,
            "{preset}: eval loss {before} -> {after}"
        );
    }
}

#[test]
fn every_family_resumes_exactly_and_exports_for_transformers() {
    for (preset, model_type, architecture) in FAMILIES {
        let cache = tempfile::tempdir().unwrap();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let full = go(config(preset, a.path(), 6, 0.1), cache.path(), None, None);
        let half = go(
            config(preset, b.path(), 6, 0.1),
            cache.path(),
            None,
            Some(3),
        );
        assert_eq!(half.steps, 3);
        let rest = go(
            config(preset, b.path(), 6, 0.1),
            cache.path(),
            Some(Resume::Latest),
            None,
        );
        assert_eq!(rest.steps, 6);
        let adapter_file = |s: &RunSummary| read(&s.adapter_dir.join("adapter_model.safetensors"));
        assert_eq!(adapter_file(&full), adapter_file(&rest), "{preset}: resume");
        assert_eq!(full.last_train_loss, rest.last_train_loss, "{preset}");

        // PEFT's names: base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight;
        // the frozen biases of Qwen's q/k/v are not adapter tensors.
        let st =
            ShardedTensors::open(&[full.adapter_dir.join("adapter_model.safetensors")]).unwrap();
        let names = st.names();
        assert_eq!(names.len(), 2 * 2 * 7, "{preset}: {names:?}");
        assert!(names.contains(&"base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"));
        assert!(names.contains(&"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"));
        assert!(names.iter().all(|n| !n.contains("bias")), "{names:?}");

        // The merged export: that architecture's config, the family's tensors
        // (biases, q/k norms, no lm_head when tied) and tokenizer files.
        let source = cache.path().join("builtin").join(format!("{preset}-seed0"));
        let adapter = qtrain_train::peft::read_peft_adapter(&full.adapter_dir).unwrap();
        let merged = tempfile::tempdir().unwrap();
        qtrain_train::merge::export_merged(
            &source,
            &adapter,
            merged.path(),
            qtrain_train::merge::MergeBase::Original,
            usize::MAX,
        )
        .unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&read(&merged.path().join("config.json"))).unwrap();
        assert_eq!(json["model_type"], model_type, "{preset}");
        assert_eq!(json["architectures"][0], architecture, "{preset}");
        let src_cfg = ModelConfig::from_file(&source.join("config.json")).unwrap();
        let out_cfg = ModelConfig::from_file(&merged.path().join("config.json")).unwrap();
        assert_eq!(out_cfg.rope().unwrap(), src_cfg.rope().unwrap(), "{preset}");
        assert_eq!(out_cfg.tie_word_embeddings, src_cfg.tie_word_embeddings);
        assert_eq!(out_cfg.sliding_window, src_cfg.sliding_window);
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            assert_eq!(
                read(&source.join(f)),
                read(&merged.path().join(f)),
                "{preset}: {f}"
            );
        }
        let out_st = ShardedTensors::open_model_dir(merged.path()).unwrap();
        let src_st = ShardedTensors::open_model_dir(&source).unwrap();
        let (mut a_names, mut b_names) = (out_st.names(), src_st.names());
        a_names.sort_unstable();
        b_names.sort_unstable();
        assert_eq!(
            a_names, b_names,
            "{preset}: the merged model has the source's tensors"
        );

        // Its logits equal base + adapter (dense f32 on both sides; the merged
        // weights are rounded to bf16 once, hence the tolerance).
        let opts = LoadOptions {
            quantization: Quantization::None,
            ..LoadOptions::cpu_f32()
        };
        let base = BaseModel::load(&source, &opts).unwrap();
        let merged_model = BaseModel::load(merged.path(), &opts).unwrap();
        let lora = qtrain_train::models::lora_from_peft(&adapter, &base).unwrap();
        let rows: Vec<Vec<u32>> = (0..2)
            .map(|r| (0..20).map(|t| (r * 31 + t * 7 + 3) % 200).collect())
            .collect();
        let batch = TokenBatch::from_rows(&rows).unwrap();
        let want = forward_logits(&base, Some(&lora), &batch).unwrap();
        let got = forward_logits(&merged_model, None, &batch).unwrap();
        let plain = forward_logits(&base, None, &batch).unwrap();
        let max = |t: &candle_core::Tensor| {
            t.abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let err = max(&(&got - &want).unwrap()) / max(&want);
        let moved = max(&(&plain - &want).unwrap()) / max(&want);
        eprintln!("{preset}: merged vs base + adapter rel {err:.1e} (the adapter moves logits by {moved:.1e})");
        assert!(
            moved > 1e-3,
            "{preset}: the adapter did not change the model"
        );
        assert!(err < 2e-2 && err < moved / 4.0, "{preset}: {err:e}");
    }
}
