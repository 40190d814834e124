//! Each op's hand-written backward against candle autograd of its forward (f64),
//! one op at a time, so a fused kernel that replaces an op can be checked alone.
//! The ops' forwards are built from primitive candle ops, so autograd through them
//! is a valid reference: `L = Σ forward(inputs) ∘ R` for a random `R`.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{max_abs, max_abs_diff};
use qtrain_reference::ops::{attention, cross_entropy, linear, rmsnorm, rope, swiglu};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic pseudo-random values from a splitmix sequence.
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn check(name: &str, ours: &Tensor, reference: &Tensor) {
    let scale = max_abs(reference);
    assert!(scale > 0.0, "{name}: zero reference");
    let rel = max_abs_diff(ours, reference) / scale;
    eprintln!("{name}: rel {rel:.1e}");
    assert!(rel < 1e-12, "{name}: relative error {rel:e}");
}

#[test]
fn rmsnorm_backward_matches_autograd() {
    let x = Var::from_tensor(&randn(&[5, 8], 1)).unwrap();
    let w = randn(&[8], 2);
    let r = randn(&[5, 8], 3);
    let (y, inv) = rmsnorm::forward(x.as_tensor(), &w, 1e-5).unwrap();
    let store = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = rmsnorm::backward(x.as_tensor(), &inv, &w, &r).unwrap();
    check("rmsnorm dx", &dx, store.get(x.as_tensor()).unwrap());
}

#[test]
fn rope_backward_matches_autograd() {
    let pos: Vec<u32> = vec![0, 1, 2, 0, 1, 5, 9, 3];
    let (cos, sin) = rope::tables(&pos, 2, 4, 8, 10_000.0, DType::F64, &Device::Cpu).unwrap();
    let x = Var::from_tensor(&randn(&[2, 3, 4, 8], 4)).unwrap();
    let r = randn(&[2, 3, 4, 8], 5);
    let y = rope::forward(x.as_tensor(), &cos, &sin).unwrap();
    // Position 0 is the identity.
    check(
        "rope at position 0",
        &y.narrow(2, 0, 1).unwrap().narrow(0, 0, 1).unwrap(),
        &x.as_tensor()
            .narrow(2, 0, 1)
            .unwrap()
            .narrow(0, 0, 1)
            .unwrap(),
    );
    let store = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = rope::backward(&r, &cos, &sin).unwrap();
    check("rope dx", &dx, store.get(x.as_tensor()).unwrap());
}

#[test]
fn swiglu_backward_matches_autograd() {
    let g = Var::from_tensor(&(randn(&[4, 6], 6) * 4.0).unwrap()).unwrap();
    let u = Var::from_tensor(&randn(&[4, 6], 7)).unwrap();
    let r = randn(&[4, 6], 8);
    let m = swiglu::forward(g.as_tensor(), u.as_tensor()).unwrap();
    let store = (m * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let (dg, du) = swiglu::backward(g.as_tensor(), u.as_tensor(), &r).unwrap();
    check("swiglu dg", &dg, store.get(g.as_tensor()).unwrap());
    check("swiglu du", &du, store.get(u.as_tensor()).unwrap());
}

#[test]
fn attention_backward_matches_autograd_with_gqa_window_and_segments() {
    let (b, h, kv, t, d) = (2, 4, 2, 7, 4);
    let seg = [0, 0, 0, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3];
    let mask = attention::build_mask(&seg, b, t, Some(3), DType::F64, &Device::Cpu).unwrap();
    let q = Var::from_tensor(&randn(&[b, h, t, d], 9)).unwrap();
    let k = Var::from_tensor(&randn(&[b, kv, t, d], 10)).unwrap();
    let v = Var::from_tensor(&randn(&[b, kv, t, d], 11)).unwrap();
    let r = randn(&[b, h, t, d], 12);
    let (o, stats) =
        attention::forward(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, 0.5).unwrap();
    let store = (&o * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let (dq, dk, dv) = attention::backward(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        &o,
        &stats,
        &r,
        &mask,
        0.5,
    )
    .unwrap();
    check("attention dq", &dq, store.get(q.as_tensor()).unwrap());
    check("attention dk", &dk, store.get(k.as_tensor()).unwrap());
    check("attention dv", &dv, store.get(v.as_tensor()).unwrap());
    // The first token of a segment sees only itself: its output is its own value.
    let o_first = o
        .narrow(0, 0, 1)
        .unwrap()
        .narrow(2, 3, 1)
        .unwrap()
        .narrow(1, 0, 1)
        .unwrap();
    let v_first = v
        .as_tensor()
        .narrow(0, 0, 1)
        .unwrap()
        .narrow(2, 3, 1)
        .unwrap()
        .narrow(1, 0, 1)
        .unwrap();
    check("segment start attends to itself", &o_first, &v_first);
    assert!(attention::visible(5, 2, Some(4), 0, 0) && !attention::visible(5, 1, Some(4), 0, 0));
}

#[test]
fn lora_linear_backward_matches_autograd() {
    let x = Var::from_tensor(&randn(&[5, 6], 13)).unwrap();
    let w = randn(&[7, 6], 14);
    let a = Var::from_tensor(&randn(&[3, 6], 15)).unwrap();
    let bm = Var::from_tensor(&randn(&[7, 3], 16)).unwrap();
    let mask = randn(&[5, 6], 17)
        .ge(0.0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let branch = linear::LoraBranch {
        a: a.as_tensor(),
        b: bm.as_tensor(),
        scale: 1.5,
        dropout_mask: Some((mask * 2.0).unwrap()),
    };
    let r = randn(&[5, 7], 18);
    let (y, z) = linear::forward(x.as_tensor(), &w, Some(&branch)).unwrap();
    let store = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = linear::backward(x.as_tensor(), Some(&w), Some(&branch), z.as_ref(), &r).unwrap();
    let (da, db) = g.lora.unwrap();
    check(
        "linear dx",
        &g.dx.unwrap(),
        store.get(x.as_tensor()).unwrap(),
    );
    check("lora dA", &da, store.get(a.as_tensor()).unwrap());
    check("lora dB", &db, store.get(bm.as_tensor()).unwrap());
    // Without the frozen weight no dx is computed.
    let g = linear::backward(x.as_tensor(), None, Some(&branch), z.as_ref(), &r).unwrap();
    assert!(g.dx.is_none() && g.lora.is_some());
}

#[test]
fn cross_entropy_is_chunk_invariant_and_matches_autograd() {
    let (n, h, vocab) = (9, 5, 11);
    let hidden = Var::from_tensor(&randn(&[n, h], 19)).unwrap();
    let lm_head = (randn(&[vocab, h], 20) * 2.0).unwrap();
    let targets: Vec<i64> = vec![3, -100, 0, 10, 7, -100, 7, 1, 2];
    let scale = 1.0 / 7.0;
    let (whole, dh_whole) =
        cross_entropy::forward_backward(hidden.as_tensor(), &lm_head, &targets, scale, 1024)
            .unwrap();
    assert_eq!(whole.valid, 7);
    for chunk in [1, 2, 4] {
        let (c, dh) =
            cross_entropy::forward_backward(hidden.as_tensor(), &lm_head, &targets, scale, chunk)
                .unwrap();
        assert_eq!(c.valid, 7);
        assert!((c.loss_sum - whole.loss_sum).abs() < 1e-12 * whole.loss_sum);
        check(
            &format!("cross-entropy chunk {chunk} vs whole"),
            &dh,
            &dh_whole,
        );
        let f = cross_entropy::forward(hidden.as_tensor(), &lm_head, &targets, chunk).unwrap();
        assert!((f.loss_sum - whole.loss_sum).abs() < 1e-12 * whole.loss_sum);
    }
    // Autograd over plain whole-matrix ops.
    let logits = hidden.as_tensor().matmul(&lm_head.t().unwrap()).unwrap();
    let lse = logits.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap();
    let rows: Vec<u32> = (0..n as u32)
        .filter(|&i| targets[i as usize] != -100)
        .collect();
    let tg: Vec<u32> = rows.iter().map(|&i| targets[i as usize] as u32).collect();
    let idx = Tensor::from_vec(rows, 7, &Device::Cpu).unwrap();
    let picked = logits
        .index_select(&idx, 0)
        .unwrap()
        .gather(&Tensor::from_vec(tg, (7, 1), &Device::Cpu).unwrap(), 1)
        .unwrap();
    let loss = (lse.index_select(&idx, 0).unwrap() - picked)
        .unwrap()
        .sum_all()
        .unwrap();
    assert!((loss.to_scalar::<f64>().unwrap() - whole.loss_sum).abs() < 1e-12 * whole.loss_sum);
    let store = (loss * scale).unwrap().backward().unwrap();
    check(
        "cross-entropy dhidden",
        &dh_whole,
        store.get(hidden.as_tensor()).unwrap(),
    );
    // Ignored rows get exactly zero gradient.
    assert_eq!(max_abs(&dh_whole.narrow(0, 1, 1).unwrap()), 0.0);
}
