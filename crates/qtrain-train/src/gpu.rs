//! The GPUs qtrain knows: a preset table (memory, compute capability, datasheet
//! throughput), detection of the GPU a run is on, and the precision policy that
//! follows from its compute capability.
//!
//! Policy (what `model.dtype = "auto"` becomes on a GPU):
//!
//! | compute capability | precision | why |
//! |---|---|---|
//! | >= 8.0 (Ampere and later) | bf16, TF32 for f32 products | bf16 has f32's range: no loss scaling |
//! | 7.x (V100, T4) | fp16 with dynamic loss scaling | tensor cores do fp16 but not bf16 |
//! | < 7.0 | refused | no tensor cores: a 7B QLoRA step would take minutes |
//!
//! On 7.x the fused engine computes in fp16 and the trainer scales the loss
//! ([`crate::loss_scale`]); its activations' gradients carry the scale, the LoRA
//! gradients and master weights are f32.

use candle_core::{DType, Device};

/// Problems with a GPU name or a GPU's capabilities.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("--gpu `{name}`: unknown GPU (known: {known})")]
    UnknownPreset { name: String, known: String },
    /// The GPU is too old to train on.
    #[error(
        "{name} (compute capability {major}.{minor}) is not supported: qtrain trains on tensor \
         cores, which need compute capability 7.0 or newer (V100, T4, A10, A100, RTX 30/40, \
         H100, ...); use a newer GPU, or model.device = \"cpu\" for tiny models"
    )]
    TooOld {
        name: String,
        major: u32,
        minor: u32,
    },
    /// A dtype the GPU cannot compute in.
    #[error(
        "model.dtype = \"{dtype}\": {name} (compute capability {major}.{minor}) has no bf16 \
         tensor cores; use model.dtype = \"auto\" (fp16 with dynamic loss scaling) or \"f16\""
    )]
    NoBf16 {
        dtype: String,
        name: String,
        major: u32,
        minor: u32,
    },
    #[error("detecting the GPU: {0}")]
    Detect(String),
}

/// One GPU model's figures. Memory is what the driver reports as total (as
/// nvidia-smi shows it), throughput the datasheet's dense (no sparsity) tensor-core
/// figure in the training precision: bf16 with f32 accumulation, or fp16 with f32
/// accumulation on 7.x GPUs (which have no bf16).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuSpec {
    /// The `--gpu` name.
    pub key: &'static str,
    pub name: &'static str,
    pub memory_bytes: u64,
    pub compute_capability: (u32, u32),
    /// Dense tensor TFLOP/s in the training precision (datasheet).
    pub tensor_tflops: f64,
    /// Memory bandwidth, GB/s (datasheet).
    pub bandwidth_gbs: f64,
    /// The host link's rate for pinned copies each way, GB/s, as the offload
    /// decisions assume it: 50 on PCIe 5.0 x16 (H100 hosts measured 53-55,
    /// docs/perf.md v16), 20 on PCIe 4.0 x16 and 10 on PCIe 3.0 x16 (about 0.6 of
    /// the raw rate: not measured here, kept on the safe side).
    pub host_link_gbs: f64,
    /// Substrings of the driver's device name that identify this model (lowercase).
    matches: &'static [&'static str],
}

const MIB: u64 = 1 << 20;

/// Every GPU `--gpu` accepts. Datasheet figures; memory as the driver reports it.
/// The A10G is AWS's variant (g5 instances): NVIDIA publishes no datasheet, the
/// tensor figure is the one AWS and cloud comparisons quote. H100 is the SXM part
/// (the PCIe card has 756 TFLOP/s and 2.0 TB/s). P100 is listed so that `--gpu
/// p100` shows the refusal rather than an unknown name.
pub const GPUS: &[GpuSpec] = &[
    GpuSpec {
        key: "a10",
        name: "NVIDIA A10",
        memory_bytes: 23028 * MIB,
        compute_capability: (8, 6),
        tensor_tflops: 125.0,
        bandwidth_gbs: 600.0,
        host_link_gbs: 20.0,
        matches: &["a10"],
    },
    GpuSpec {
        key: "a10g",
        name: "NVIDIA A10G",
        memory_bytes: 23028 * MIB,
        compute_capability: (8, 6),
        tensor_tflops: 70.0,
        bandwidth_gbs: 600.0,
        host_link_gbs: 20.0,
        matches: &["a10g"],
    },
    GpuSpec {
        key: "rtx4080",
        name: "NVIDIA GeForce RTX 4080",
        memory_bytes: 16376 * MIB,
        compute_capability: (8, 9),
        tensor_tflops: 97.5,
        bandwidth_gbs: 716.8,
        host_link_gbs: 20.0,
        matches: &["rtx 4080"],
    },
    GpuSpec {
        key: "rtx4090",
        name: "NVIDIA GeForce RTX 4090",
        memory_bytes: 24564 * MIB,
        compute_capability: (8, 9),
        tensor_tflops: 165.2,
        bandwidth_gbs: 1008.0,
        host_link_gbs: 20.0,
        matches: &["rtx 4090"],
    },
    GpuSpec {
        key: "a100-40",
        name: "NVIDIA A100 40GB",
        memory_bytes: 40960 * MIB,
        compute_capability: (8, 0),
        tensor_tflops: 312.0,
        bandwidth_gbs: 1555.0,
        host_link_gbs: 20.0,
        matches: &["a100"],
    },
    GpuSpec {
        key: "a100-80",
        name: "NVIDIA A100 80GB",
        memory_bytes: 81920 * MIB,
        compute_capability: (8, 0),
        tensor_tflops: 312.0,
        bandwidth_gbs: 2039.0,
        host_link_gbs: 20.0,
        matches: &["a100"],
    },
    GpuSpec {
        key: "h100",
        name: "NVIDIA H100 80GB HBM3",
        memory_bytes: 81559 * MIB,
        compute_capability: (9, 0),
        tensor_tflops: 989.4,
        bandwidth_gbs: 3350.0,
        host_link_gbs: 50.0,
        matches: &["h100"],
    },
    GpuSpec {
        key: "h200",
        name: "NVIDIA H200",
        memory_bytes: 143771 * MIB,
        compute_capability: (9, 0),
        tensor_tflops: 989.4,
        bandwidth_gbs: 4800.0,
        host_link_gbs: 50.0,
        matches: &["h200"],
    },
    GpuSpec {
        key: "v100-16",
        name: "Tesla V100 16GB",
        memory_bytes: 16160 * MIB,
        compute_capability: (7, 0),
        tensor_tflops: 125.0,
        bandwidth_gbs: 900.0,
        host_link_gbs: 10.0,
        matches: &["v100"],
    },
    GpuSpec {
        key: "v100-32",
        name: "Tesla V100 32GB",
        memory_bytes: 32768 * MIB,
        compute_capability: (7, 0),
        tensor_tflops: 125.0,
        bandwidth_gbs: 900.0,
        host_link_gbs: 10.0,
        matches: &["v100"],
    },
    GpuSpec {
        key: "t4",
        name: "Tesla T4",
        memory_bytes: 15360 * MIB,
        compute_capability: (7, 5),
        tensor_tflops: 65.0,
        bandwidth_gbs: 320.0,
        host_link_gbs: 10.0,
        matches: &["t4"],
    },
    GpuSpec {
        key: "p100",
        name: "Tesla P100 16GB",
        memory_bytes: 16280 * MIB,
        compute_capability: (6, 0),
        tensor_tflops: 18.7,
        bandwidth_gbs: 732.0,
        host_link_gbs: 10.0,
        matches: &["p100"],
    },
];

/// The preset `--gpu key` names.
pub fn preset(key: &str) -> Result<&'static GpuSpec, GpuError> {
    let k = key.trim().to_ascii_lowercase();
    GPUS.iter()
        .find(|g| g.key == k)
        .ok_or_else(|| GpuError::UnknownPreset {
            name: key.to_string(),
            known: GPUS.iter().map(|g| g.key).collect::<Vec<_>>().join(", "),
        })
}

/// The preset of a detected GPU: by name (`NVIDIA A100-SXM4-40GB` is `a100-40`),
/// telling 40/80 GB and 16/32 GB variants apart by their memory. `None` for GPUs
/// not in the table.
pub fn match_preset(device_name: &str, total_bytes: u64) -> Option<&'static GpuSpec> {
    let name = device_name.to_ascii_lowercase();
    // Longest match first, so `a10g` wins over `a10`.
    let mut candidates: Vec<&GpuSpec> = GPUS
        .iter()
        .filter(|g| g.matches.iter().any(|m| contains_word(&name, m)))
        .collect();
    let longest = candidates
        .iter()
        .map(|g| g.matches.iter().map(|m| m.len()).max().unwrap_or(0))
        .max()?;
    candidates.retain(|g| g.matches.iter().any(|m| m.len() == longest));
    // Among same-name variants, the one whose memory is closest.
    candidates
        .into_iter()
        .min_by_key(|g| g.memory_bytes.abs_diff(total_bytes))
}

/// `needle` in `hay` not followed or preceded by another letter or digit (so `a10`
/// does not match `a100`, nor `t4` match `rtx 4080`).
fn contains_word(hay: &str, needle: &str) -> bool {
    let bytes = hay.as_bytes();
    hay.match_indices(needle).any(|(i, _)| {
        let before = i.checked_sub(1).map(|j| bytes[j]);
        let after = bytes.get(i + needle.len()).copied();
        !before.is_some_and(|b| b.is_ascii_alphanumeric())
            && !after.is_some_and(|b| b.is_ascii_alphanumeric())
    })
}

/// A GPU as detected (or as a preset stands for it).
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    pub name: String,
    pub compute_capability: (u32, u32),
    pub total_bytes: u64,
    /// Free memory when detected (None for a preset).
    pub free_bytes: Option<u64>,
    /// The table's entry for it, when there is one (throughput figures).
    pub spec: Option<&'static GpuSpec>,
}

impl GpuInfo {
    pub fn from_preset(spec: &'static GpuSpec) -> Self {
        Self {
            name: spec.name.to_string(),
            compute_capability: spec.compute_capability,
            total_bytes: spec.memory_bytes,
            free_bytes: None,
            spec: Some(spec),
        }
    }

    /// What this GPU trains in, or why it cannot.
    pub fn precision(&self) -> Result<Precision, GpuError> {
        policy(&self.name, self.compute_capability)
    }
}

/// The precision a GPU trains in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// bf16 storage and tensor cores, TF32 for f32 products (compute capability >= 8.0).
    Bf16,
    /// fp16 with dynamic loss scaling (7.x).
    F16LossScaled,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::Bf16 => DType::BF16,
            Precision::F16LossScaled => DType::F16,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16 + TF32",
            Precision::F16LossScaled => "fp16 with dynamic loss scaling",
        }
    }
}

/// The precision policy for a GPU of compute capability `cc` (see the module docs).
pub fn policy(name: &str, cc: (u32, u32)) -> Result<Precision, GpuError> {
    match cc.0 {
        8.. => Ok(Precision::Bf16),
        7 => Ok(Precision::F16LossScaled),
        _ => Err(GpuError::TooOld {
            name: name.to_string(),
            major: cc.0,
            minor: cc.1,
        }),
    }
}

/// The compute dtype of `model.dtype = spec` on `gpu` (policy applied to `auto`,
/// bf16 refused where the GPU has none; `f32` and `f16` are taken as asked).
pub fn dtype_for(spec: &str, gpu: &GpuInfo) -> Result<DType, GpuError> {
    let precision = gpu.precision()?;
    match spec {
        "auto" => Ok(precision.dtype()),
        "bf16" if gpu.compute_capability.0 < 8 => Err(GpuError::NoBf16 {
            dtype: spec.to_string(),
            name: gpu.name.clone(),
            major: gpu.compute_capability.0,
            minor: gpu.compute_capability.1,
        }),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => Ok(DType::F32),
    }
}

/// The GPU behind `device` (`None` on the CPU): name, compute capability, memory.
pub fn detect(device: &Device) -> Result<Option<GpuInfo>, GpuError> {
    if !device.is_cuda() {
        return Ok(None);
    }
    detect_cuda(device).map(Some)
}

#[cfg(feature = "cuda")]
fn detect_cuda(device: &Device) -> Result<GpuInfo, GpuError> {
    let err = |e: qtrain_device::DeviceError| GpuError::Detect(e.to_string());
    let dev = qtrain_device::Dev::from_candle(device).map_err(err)?;
    let cuda = dev
        .cuda()
        .ok_or_else(|| GpuError::Detect("not a CUDA device".into()))?;
    let name = cuda.name().map_err(err)?;
    let (major, minor) = cuda.compute_capability().map_err(err)?;
    let (free, total) = dev
        .mem_info()
        .map_err(err)?
        .ok_or_else(|| GpuError::Detect("no memory information".into()))?;
    let total = total as u64;
    Ok(GpuInfo {
        spec: match_preset(&name, total),
        name,
        compute_capability: (major.max(0) as u32, minor.max(0) as u32),
        total_bytes: total,
        free_bytes: Some(free as u64),
    })
}

#[cfg(not(feature = "cuda"))]
fn detect_cuda(_device: &Device) -> Result<GpuInfo, GpuError> {
    Err(GpuError::Detect(
        "this qtrain was built without CUDA (cargo build --features cuda)".into(),
    ))
}

/// What `qtrain doctor` says about the GPU behind `device` (nothing on the CPU):
/// its name, compute capability, multiprocessors, driver and memory, and the
/// precision qtrain trains in on it. `false` when qtrain refuses this GPU.
pub fn describe(device: &Device) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    #[cfg(feature = "cuda")]
    if let Ok(dev) = qtrain_device::Dev::from_candle(device) {
        if let Some(c) = dev.cuda() {
            let gib = |b: usize| b as f64 / 1073741824.0;
            let (free, total) = dev.mem_info().ok().flatten().unwrap_or((0, 0));
            let line = (|| -> qtrain_device::Result<String> {
                let (maj, min) = c.compute_capability()?;
                let (dmaj, dmin) = c.driver_version()?;
                Ok(format!(
                    "GPU: {} (compute capability {maj}.{min}, {} multiprocessors), driver for \
                     CUDA {dmaj}.{dmin}, {:.1} GiB, {:.1} GiB free",
                    c.name()?,
                    c.sm_count()?,
                    gib(total),
                    gib(free)
                ))
            })();
            lines.push(line.unwrap_or_else(|e| format!("GPU: {e}")));
        }
    }
    let mut supported = true;
    match detect(device) {
        Ok(Some(info)) => match info.precision() {
            Ok(p) => lines.push(format!(
                "precision policy: {} (fused engine; {})",
                p.describe(),
                info.spec
                    .map_or("not in qtrain's GPU table".to_string(), |s| format!(
                        "`qtrain plan --gpu {}`",
                        s.key
                    ))
            )),
            Err(e) => {
                lines.push(format!("precision policy: {e}"));
                supported = false;
            }
        },
        Ok(None) => {}
        Err(e) => lines.push(format!("GPU detection: {e}")),
    }
    (lines, supported)
}

/// Applies the precision's process-wide switches: TF32 for f32 products (candle's
/// and the kernels') on GPUs that have it, off elsewhere.
pub fn apply_precision(precision: Precision) {
    let tf32 = precision == Precision::Bf16;
    candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
    qtrain_device::gemm::set_tf32(tf32);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_by_key_and_unknown_names_list_the_known_ones() {
        assert_eq!(preset("A100-80").unwrap().memory_bytes, 81920 * MIB);
        let e = preset("rtx3090").unwrap_err().to_string();
        assert!(e.starts_with("--gpu `rtx3090`"), "{e}");
        for k in ["a10", "a10g", "rtx4080", "h200", "v100-32", "t4"] {
            assert!(e.contains(k), "{e}");
        }
    }

    #[test]
    fn driver_names_map_to_presets() {
        let cases = [
            ("NVIDIA A10", 23028, "a10"),
            ("NVIDIA A10G", 22731, "a10g"),
            ("NVIDIA A100-SXM4-40GB", 40536, "a100-40"),
            ("NVIDIA A100 80GB PCIe", 81920, "a100-80"),
            ("NVIDIA H100 80GB HBM3", 81559, "h100"),
            ("NVIDIA H200", 143771, "h200"),
            ("NVIDIA GeForce RTX 4090", 24564, "rtx4090"),
            ("NVIDIA GeForce RTX 4080", 16376, "rtx4080"),
            ("Tesla V100-SXM2-16GB", 16160, "v100-16"),
            ("Tesla V100-SXM2-32GB", 32510, "v100-32"),
            ("Tesla T4", 15109, "t4"),
        ];
        for (name, mib, key) in cases {
            let got = match_preset(name, mib * MIB).map(|g| g.key);
            assert_eq!(got, Some(key), "{name}");
        }
        assert_eq!(match_preset("NVIDIA L4", 23034 * MIB), None);
    }

    #[test]
    fn policy_by_compute_capability() {
        let g = |k| GpuInfo::from_preset(preset(k).unwrap());
        assert_eq!(g("h100").precision().unwrap(), Precision::Bf16);
        assert_eq!(g("a10").precision().unwrap(), Precision::Bf16);
        assert_eq!(g("t4").precision().unwrap(), Precision::F16LossScaled);
        assert_eq!(dtype_for("auto", &g("v100-16")).unwrap(), DType::F16);
        assert_eq!(dtype_for("auto", &g("a100-40")).unwrap(), DType::BF16);
        assert_eq!(dtype_for("f32", &g("a100-40")).unwrap(), DType::F32);
        let e = dtype_for("bf16", &g("t4")).unwrap_err().to_string();
        assert!(
            e.contains("model.dtype") && e.contains("Tesla T4") && e.contains("7.5"),
            "{e}"
        );
        let e = g("p100").precision().unwrap_err().to_string();
        assert!(
            e.contains("Tesla P100") && e.contains("6.0") && e.contains("tensor cores"),
            "{e}"
        );
        // The refusal holds whatever dtype is asked for.
        assert!(dtype_for("f16", &g("p100")).is_err());
    }
}
