//! GGUF export of a trained adapter: the merged weights of [`MergedModel`] (the
//! adapter merged into the base exactly as the merged safetensors export does,
//! rounded to bf16 as it stores them), written by `qtrain-gguf` as
//! `DIR/model-TYPE.gguf` with an Ollama `DIR/Modelfile`.
//!
//! The GGUF therefore holds the merged export's values: a bf16 GGUF has its exact
//! bytes, an f16 GGUF the same numbers (bf16 values are f16 values within f16's
//! range), and the quantized types quantize them as `llama-quantize` would
//! quantize a bf16 GGUF of the merged model.

use crate::merge::{MergeError, MergeOptions, MergedModel};
use crate::peft::PeftAdapter;
use qtrain_data::{ChatTemplate, Message, SpecialTokens};
use qtrain_gguf::{ChatRenderer, ExportOptions, ExportSummary, FileType, GgufError, TensorSource};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum GgufExportError {
    #[error(transparent)]
    Merge(#[from] MergeError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

/// [`MergedModel`] as the GGUF writer's tensor source.
struct MergedSource<'a> {
    model: MergedModel<'a>,
    index: HashMap<String, usize>,
    shapes: Vec<Vec<usize>>,
    buf: Vec<u8>,
}

impl TensorSource for MergedSource<'_> {
    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.model
            .names()
            .iter()
            .cloned()
            .zip(self.shapes.iter().cloned())
            .collect()
    }

    fn read(&mut self, name: &str) -> Result<Vec<f32>, Box<dyn std::error::Error + Send + Sync>> {
        let i = *self
            .index
            .get(name)
            .ok_or_else(|| format!("tensor {name} is not in the merged model"))?;
        self.model.bf16_bytes(i, &mut self.buf)?;
        Ok(self
            .buf
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect())
    }
}

/// The model's Jinja chat template rendered as in training, for the Modelfile.
struct Renderer(ChatTemplate);

impl ChatRenderer for Renderer {
    fn render(&self, messages: &[(&str, &str)], gen: bool) -> Result<String, String> {
        let msgs: Vec<Message> = messages.iter().map(|(r, c)| Message::new(*r, *c)).collect();
        self.0.render(&msgs, gen).map_err(|e| e.to_string())
    }
}

/// The chat template of `dir` (tokenizer_config.json), compiled as training
/// compiles it; `None` when the model has none or it does not compile (the
/// Modelfile then says so).
fn renderer(dir: &Path) -> Option<Renderer> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let cfg: serde_json::Value = serde_json::from_str(&text).ok()?;
    let template = cfg.get("chat_template")?.as_str()?;
    let tok = |k: &str| -> Option<String> {
        match cfg.get(k)? {
            serde_json::Value::String(s) => Some(s.clone()),
            v => v.get("content")?.as_str().map(str::to_string),
        }
    };
    let tokens = SpecialTokens {
        bos: tok("bos_token").unwrap_or_default(),
        eos: tok("eos_token").unwrap_or_default(),
        unk: tok("unk_token"),
        pad: tok("pad_token"),
    };
    match ChatTemplate::new(template, tokens) {
        Ok(t) => Some(Renderer(t)),
        Err(e) => {
            tracing::warn!("{}: the chat template does not compile: {e}", dir.display());
            None
        }
    }
}

/// Merges `adapter` into the model in `source_dir` and writes
/// `out_dir/model-TYPE.gguf` and `out_dir/Modelfile`, one tensor at a time.
pub fn export_gguf(
    source_dir: &Path,
    adapter: &PeftAdapter,
    out_dir: &Path,
    file_type: FileType,
    merge: &MergeOptions,
) -> Result<ExportSummary, GgufExportError> {
    let model = MergedModel::open(source_dir, adapter, merge)?;
    let shapes = (0..model.names().len())
        .map(|i| model.shape(i))
        .collect::<Result<Vec<_>, _>>()?;
    let index = model
        .names()
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), i))
        .collect();
    let mut source = MergedSource {
        model,
        index,
        shapes,
        buf: Vec::new(),
    };
    let base = adapter.settings.base_model.trim_end_matches('/');
    let base = base
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("model");
    let render = renderer(source_dir);
    let opts = ExportOptions {
        file_type,
        name: format!("{base} (qtrain fine-tune)"),
        renderer: render.as_ref().map(|r| r as &dyn ChatRenderer),
    };
    let summary = qtrain_gguf::export_gguf(source_dir, &mut source, out_dir, &opts)?;
    tracing::info!(
        "GGUF: {} tensors, {} adapted projections merged",
        summary.tensors.len(),
        source.model.merged()
    );
    Ok(summary)
}
