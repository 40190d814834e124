//! One GGUF export: a Hugging Face model directory's config and tokenizer, weights
//! from a [`TensorSource`] (qtrain's merge of base and adapter), out to
//! `DIR/model-TYPE.gguf` and `DIR/Modelfile`.
//!
//! The tensors stream: the plan (names, shapes, types) is made first, the header
//! written, and then each tensor is read, permuted if needed, quantized and written
//! before the next is read.

use crate::arch::{plan_tensors, HfModel, Source};
use crate::error::GgufError;
use crate::mix::tensor_type;
use crate::modelfile::{modelfile, ChatFormat, ChatRenderer, ModelfileSpec};
use crate::quants::quantize;
use crate::tokenizer::{read_tokenizer, GgufTokenizer};
use crate::types::{FileType, GgmlType};
use crate::writer::{GgufWriter, Metadata, TensorInfo};
use std::path::{Path, PathBuf};

/// Where the weights come from: Hugging Face tensor names and shapes, read one at
/// a time as f32 in row-major (PyTorch) order.
pub trait TensorSource {
    fn tensors(&self) -> Vec<(String, Vec<usize>)>;
    fn read(&mut self, name: &str) -> Result<Vec<f32>, Box<dyn std::error::Error + Send + Sync>>;
}

/// What to write besides the weights.
pub struct ExportOptions<'a> {
    pub file_type: FileType,
    /// `general.name`.
    pub name: String,
    /// Renders the Jinja chat template for the Modelfile's translation; `None`
    /// writes the Modelfile without a TEMPLATE and says why.
    pub renderer: Option<&'a dyn ChatRenderer>,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub gguf: PathBuf,
    pub modelfile: PathBuf,
    /// Every tensor: name, type, ggml dims.
    pub tensors: Vec<TensorInfo>,
    pub bytes: u64,
    /// Things the user should know (written to the log by the caller).
    pub notes: Vec<String>,
}

/// The file name of a GGUF of type `ft`.
pub fn gguf_file_name(ft: FileType) -> String {
    format!("model-{}.gguf", ft.name())
}

/// The GGUF metadata of the model in `dir` for file type `ft`.
pub fn metadata(m: &HfModel, tok: &GgufTokenizer, ft: FileType, name: &str) -> Metadata {
    let mut md = Metadata::new();
    md.set_str("general.architecture", m.arch.name());
    md.set_str("general.type", "model");
    md.set_str("general.name", name);
    m.write_metadata(&mut md);
    md.set_u32("general.file_type", ft.id());
    md.set_u32("general.quantization_version", 2);
    tok.write_metadata(&mut md);
    md
}

/// Writes `out_dir/model-TYPE.gguf` and `out_dir/Modelfile` from the config and
/// tokenizer in `model_dir` and the weights of `source`.
pub fn export_gguf(
    model_dir: &Path,
    source: &mut dyn TensorSource,
    out_dir: &Path,
    opts: &ExportOptions,
) -> Result<ExportSummary, GgufError> {
    let m = HfModel::from_dir(model_dir)?;
    let tok = read_tokenizer(model_dir, m.vocab_size)?;
    let plan = plan_tensors(&m, &source.tensors())?;
    let has_output = plan.iter().any(|t| t.name == "output.weight");
    let infos: Vec<TensorInfo> = plan
        .iter()
        .map(|t| {
            let ty = tensor_type(opts.file_type, &m, &t.name, &t.shape, has_output);
            TensorInfo::from_torch_shape(t.name.clone(), &t.shape, ty)
        })
        .collect();
    let mut notes = m.caveats();
    let fell_back: Vec<&TensorInfo> = infos
        .iter()
        .filter(|t| {
            opts.file_type == FileType::Q8_0 && t.ty == GgmlType::F16
                || opts.file_type == FileType::Q4KM
                    && t.dims.len() > 1
                    && matches!(t.ty, GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::F16)
        })
        .collect();
    if let Some(first) = fell_back.first() {
        notes.push(format!(
            "{} of {} tensors (e.g. {}, rows of {}) have rows that are not a multiple of the \
             {} block size and are written as {}, as llama.cpp does",
            fell_back.len(),
            infos.len(),
            first.name,
            first.dims[0],
            opts.file_type.default_type(),
            fell_back
                .iter()
                .map(|t| t.ty.name())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join("/")
        ));
    }
    let md = metadata(&m, &tok, opts.file_type, &opts.name);
    std::fs::create_dir_all(out_dir).map_err(|e| GgufError::io(out_dir, e))?;
    let file = gguf_file_name(opts.file_type);
    let path = out_dir.join(&file);
    let mut w = GgufWriter::create(&path, &md, infos.clone())?;
    let mut buf = Vec::new();
    let mut bytes = 0u64;
    for (t, info) in plan.iter().zip(&infos) {
        let values = match &t.source {
            Source::Generated(v) => v.clone(),
            Source::Hf {
                name,
                permute_heads,
            } => {
                let v = source.read(name).map_err(GgufError::Source)?;
                let n: usize = t.shape.iter().product();
                if v.len() != n {
                    return Err(GgufError::Tensor {
                        name: name.clone(),
                        msg: format!("{} values for shape {:?}", v.len(), t.shape),
                    });
                }
                match permute_heads {
                    Some(h) => crate::arch::permute_rows(&v, t.shape[0], *h),
                    None => v,
                }
            }
        };
        buf.clear();
        quantize(info.ty, &values, info.dims[0] as usize, &mut buf);
        drop(values);
        w.write_tensor(&info.name, &buf)?;
        bytes += buf.len() as u64;
        tracing::debug!("{} {} {:?}", info.name, info.ty, info.dims);
    }
    let gguf = w.finish()?;

    // The Modelfile: the template, and the texts that end the assistant's turn.
    let bos = tok
        .add_special
        .iter()
        .any(|(t, v)| *t == "bos" && *v)
        .then(|| tok.special_id("bos"))
        .flatten()
        .map(|id| tok.tokens[id as usize].as_str());
    let format = match (tok.chat_template(), opts.renderer) {
        (None, _) => Err("the model has no chat template".to_string()),
        (Some(_), None) => Err("no renderer for the chat template was given".to_string()),
        (Some(_), Some(r)) => ChatFormat::derive(r, bos),
    };
    let mut stops: Vec<String> = Vec::new();
    let mut push = |s: &str| {
        if !s.is_empty() && !stops.iter().any(|x| x == s) {
            stops.push(s.to_string());
        }
    };
    if let Ok(f) = &format {
        // The control token that ends an assistant turn (`</s>`, `<|eot_id|>`,
        // `<|im_end|>`), and the one that would open a new user turn.
        for text in [&f.assistant_post, &f.user_pre] {
            if let Some(t) = leading_control(&tok, text.trim_start()) {
                push(t);
            }
        }
    }
    if let Some(eos) = tok.special_id("eos") {
        push(&tok.tokens[eos as usize]);
    }
    let (text, note) = modelfile(&ModelfileSpec {
        gguf_file: &file,
        format,
        stops,
        jinja: tok.chat_template(),
    });
    notes.extend(note);
    let modelfile_path = out_dir.join("Modelfile");
    let tmp = out_dir.join("Modelfile.partial");
    std::fs::write(&tmp, text).map_err(|e| GgufError::io(&tmp, e))?;
    std::fs::rename(&tmp, &modelfile_path).map_err(|e| GgufError::io(&modelfile_path, e))?;
    Ok(ExportSummary {
        gguf,
        modelfile: modelfile_path,
        tensors: infos,
        bytes,
        notes,
    })
}

/// The CONTROL token `text` starts with, if any (the longest match).
fn leading_control<'t>(tok: &'t GgufTokenizer, text: &str) -> Option<&'t str> {
    tok.tokens
        .iter()
        .zip(&tok.token_types)
        .filter(|(t, ty)| {
            **ty == crate::tokenizer::token_type::CONTROL
                && !t.is_empty()
                && text.starts_with(t.as_str())
        })
        .map(|(t, _)| t.as_str())
        .max_by_key(|t| t.len())
}
