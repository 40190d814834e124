//! Times NF4 quantization and dequantization of one 4096x14336 matrix (a 7B MLP
//! projection) on one core: `cargo run -p qtrain-quant --release --example quant_bench`.

use qtrain_quant::Nf4Tensor;
use std::time::Instant;

fn main() {
    let (rows, cols) = (4096usize, 14336usize);
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| {
            // xorshift: cheap deterministic data with a realistic spread.
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
        })
        .collect();
    for dq in [false, true] {
        let t = Instant::now();
        let q = Nf4Tensor::quantize(&w, &[rows, cols], 64, dq).unwrap();
        let tq = t.elapsed();
        // Filled with non-zero values so page faults are not timed as dequantization.
        let mut out = vec![1f32; w.len()];
        let t = Instant::now();
        q.dequantize_into(&mut out);
        let td = t.elapsed();
        let t = Instant::now();
        q.dequantize_reference_into(&mut out);
        let tr = t.elapsed();
        let mut bf = vec![half::bf16::ONE; w.len()];
        let t = Instant::now();
        q.dequantize_bf16_into(&mut bf);
        let tb = t.elapsed();
        println!(
            "double_quant={dq}: quantize {:.3} s, dequantize f32 {:.3} s (reference {:.3} s), bf16 {:.3} s",
            tq.as_secs_f64(),
            td.as_secs_f64(),
            tr.as_secs_f64(),
            tb.as_secs_f64()
        );
    }
}
