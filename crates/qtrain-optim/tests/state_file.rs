//! The state file: its layout, and the errors for files that do not fit.

use std::path::{Path, PathBuf};

use qtrain_optim::{AdamW32, AdamW8bit, AdamWConfig, OptimError, PagingPolicy, ParamSpec};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

fn specs() -> Vec<ParamSpec> {
    vec![
        ParamSpec::new("blocks.0.q.lora_a", 4096 + 100),
        ParamSpec::new("blocks.0.q.lora_b", 64),
    ]
}

/// An 8-bit optimizer after two steps, saved to `dir/optim.safetensors`.
fn saved(dir: &Path) -> (AdamW8bit, PathBuf) {
    let cfg = AdamWConfig {
        betas: (0.9, 0.95),
        eps: 1e-7,
        weight_decay: 0.1,
        paging: PagingPolicy::Auto {
            threshold_bytes: 12345,
        },
        ..AdamWConfig::default()
    };
    let mut opt = AdamW8bit::new(cfg, &specs()).unwrap();
    let mut a: Vec<f32> = (0..4196).map(|i| (i as f32 * 0.1).sin()).collect();
    let mut b = vec![0.0f32; 64];
    let ga: Vec<f32> = (0..4196).map(|i| (i as f32 * 0.3).cos()).collect();
    let gb = vec![0.5f32; 64];
    for _ in 0..2 {
        opt.step(&mut [&mut a, &mut b], &[&ga, &gb], 1e-3).unwrap();
    }
    let path = dir.join("optim.safetensors");
    opt.save_state(&path).unwrap();
    (opt, path)
}

/// Rewrites `path` with the tensors transformed by `edit` (metadata kept).
fn rewrite(
    path: &Path,
    edit: impl Fn(
        Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    ) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(k, t)| (k, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    let edited = edit(tensors);
    let views: Vec<(String, TensorView<'_>)> = edited
        .iter()
        .map(|(k, d, s, data)| (k.clone(), TensorView::new(*d, s.clone(), data).unwrap()))
        .collect();
    let out = safetensors::serialize(views, header.metadata().clone()).unwrap();
    std::fs::write(path, out).unwrap();
}

#[test]
fn layout_keys_dtypes_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let (opt, path) = saved(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort_unstable();
    assert_eq!(
        names,
        vec![
            "state.blocks.0.q.lora_a.m_absmax",
            "state.blocks.0.q.lora_a.m_q",
            "state.blocks.0.q.lora_a.v_absmax",
            "state.blocks.0.q.lora_a.v_q",
            "state.blocks.0.q.lora_b.m",
            "state.blocks.0.q.lora_b.v",
        ]
    );
    let q = st.tensor("state.blocks.0.q.lora_a.m_q").unwrap();
    assert_eq!((q.dtype(), q.shape()), (Dtype::U8, &[4196][..]));
    let a = st.tensor("state.blocks.0.q.lora_a.v_absmax").unwrap();
    assert_eq!((a.dtype(), a.shape()), (Dtype::F32, &[17][..]));
    let m = st.tensor("state.blocks.0.q.lora_b.m").unwrap();
    assert_eq!((m.dtype(), m.shape()), (Dtype::F32, &[64][..]));

    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().as_ref().unwrap();
    assert_eq!(meta["optimizer"], "adamw8bit");
    assert_eq!(meta["step"], "2");
    assert_eq!(meta["beta2"], "0.95");
    assert_eq!(meta["eps"], "0.0000001");
    assert_eq!(meta["blocksize"], "256");

    // Config, order and step come back exactly.
    let loaded = AdamW8bit::load_state(&path).unwrap();
    assert_eq!(loaded.config(), opt.config());
    assert_eq!(loaded.param_specs(), specs());
    assert_eq!(loaded.step_count(), 2);
    assert_eq!(loaded, opt);
}

#[test]
fn saving_replaces_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let (mut opt, path) = saved(dir.path());
    let mut a = vec![0.0f32; 4196];
    let mut b = vec![0.0f32; 64];
    opt.step(
        &mut [&mut a, &mut b],
        &[&vec![1.0; 4196], &vec![1.0; 64]],
        1e-3,
    )
    .unwrap();
    opt.save_state(&path).unwrap();
    assert_eq!(AdamW8bit::load_state(&path).unwrap().step_count(), 3);
}

#[test]
fn load_for_checks_names_and_shapes_against_the_params() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = saved(dir.path());

    // Order follows the caller.
    let rev: Vec<ParamSpec> = specs().into_iter().rev().collect();
    let loaded = AdamW8bit::load_state_for(&path, &rev).unwrap();
    assert_eq!(loaded.param_specs(), rev);

    // A parameter the file lacks.
    let mut more = specs();
    more.push(ParamSpec::new("blocks.0.v.lora_b", 64));
    let err = AdamW8bit::load_state_for(&path, &more).unwrap_err();
    assert!(
        matches!(&err, OptimError::MissingTensor { key, .. } if key == "state.blocks.0.v.lora_b.m"),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("optim.safetensors") && msg.contains("state.blocks.0.v.lora_b.m"),
        "{msg}"
    );

    // A parameter whose size changed (still 8-bit).
    let mut resized = specs();
    resized[0].numel = 5000;
    let err = AdamW8bit::load_state_for(&path, &resized).unwrap_err();
    assert!(
        matches!(&err, OptimError::TensorMismatch { key, expected, found, .. }
            if key == "state.blocks.0.q.lora_a.m_q" && expected == "U8 [5000]" && found == "U8 [4196]"),
        "{err}"
    );

    // A parameter that became small enough for f32 state: its f32 keys are missing.
    let mut shrunk = specs();
    shrunk[0].numel = 100;
    let err = AdamW8bit::load_state_for(&path, &shrunk).unwrap_err();
    assert!(
        matches!(&err, OptimError::MissingTensor { key, .. } if key == "state.blocks.0.q.lora_a.m"),
        "{err}"
    );

    // The file has state for a parameter the caller no longer trains.
    let err = AdamW8bit::load_state_for(&path, &specs()[..1]).unwrap_err();
    assert!(
        matches!(&err, OptimError::UnexpectedTensor { key, .. } if key == "state.blocks.0.q.lora_b.m"),
        "{err}"
    );
}

#[test]
fn tensor_level_damage_is_named() {
    let dir = tempfile::tempdir().unwrap();

    // A tensor removed.
    let (_, path) = saved(dir.path());
    rewrite(&path, |mut t| {
        t.retain(|(k, ..)| k != "state.blocks.0.q.lora_a.v_absmax");
        t
    });
    let err = AdamW8bit::load_state(&path).unwrap_err();
    assert!(
        matches!(&err, OptimError::MissingTensor { key, .. } if key == "state.blocks.0.q.lora_a.v_absmax"),
        "{err}"
    );

    // A tensor with the wrong dtype.
    let (_, path) = saved(dir.path());
    rewrite(&path, |t| {
        t.into_iter()
            .map(|(k, d, s, data)| {
                if k == "state.blocks.0.q.lora_b.v" {
                    (k, Dtype::U8, vec![256], data)
                } else {
                    (k, d, s, data)
                }
            })
            .collect()
    });
    let err = AdamW8bit::load_state(&path).unwrap_err();
    assert!(
        matches!(&err, OptimError::TensorMismatch { key, found, .. }
            if key == "state.blocks.0.q.lora_b.v" && found == "U8 [256]"),
        "{err}"
    );
}

#[test]
fn unreadable_files_are_reported_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = saved(dir.path());

    // Truncated.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = AdamW8bit::load_state(&path).unwrap_err();
    assert!(matches!(err, OptimError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("optim.safetensors"));

    // Garbage.
    std::fs::write(&path, b"not a safetensors file at all").unwrap();
    assert!(matches!(
        AdamW8bit::load_state(&path),
        Err(OptimError::Corrupt { .. })
    ));

    // Missing.
    let missing = dir.path().join("nope.safetensors");
    let err = AdamW8bit::load_state(&missing).unwrap_err();
    assert!(
        matches!(&err, OptimError::Io { path, .. } if path == &missing),
        "{err}"
    );

    // A safetensors file without our metadata (e.g. an adapter file passed by mistake).
    let plain = dir.path().join("adapter.safetensors");
    let data = [0u8; 16];
    let views = vec![("w", TensorView::new(Dtype::F32, vec![4], &data).unwrap())];
    std::fs::write(&plain, safetensors::serialize(views, None).unwrap()).unwrap();
    let err = AdamW8bit::load_state(&plain).unwrap_err();
    assert!(matches!(err, OptimError::Corrupt { .. }), "{err}");
}

#[test]
fn optimizer_kinds_do_not_mix() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = saved(dir.path());
    let err = AdamW32::load_state(&path).unwrap_err();
    assert!(
        matches!(&err, OptimError::WrongOptimizer { expected, found, .. }
            if expected == "adamw32" && found == "adamw8bit"),
        "{err}"
    );
}

#[test]
fn save_into_a_missing_directory_fails_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let (opt, _) = saved(dir.path());
    let target = dir.path().join("no/such/dir/optim.safetensors");
    let err = opt.save_state(&target).unwrap_err();
    assert!(
        matches!(&err, OptimError::Io { path, .. } if path == &target),
        "{err}"
    );
}
