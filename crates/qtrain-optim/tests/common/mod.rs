//! Shared test fixtures: a least-squares regression problem small enough for the CPU
//! and large enough that its weight matrix gets 8-bit state.

#![allow(dead_code)] // each test binary uses a different subset

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `min over W, b of 1/(2n) * ||X W + b - Y||²` with `X: n×din`, `W: din×dout`,
/// `b: dout`, `Y = X W* + b* + noise`.
pub struct LeastSquares {
    pub n: usize,
    pub din: usize,
    pub dout: usize,
    x: Vec<f32>,
    y: Vec<f32>,
}

impl LeastSquares {
    pub fn new(seed: u64, n: usize, din: usize, dout: usize, noise: f32) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut uniform = |len: usize, scale: f32| -> Vec<f32> {
            (0..len)
                .map(|_| scale * rng.random_range(-1.0f32..1.0))
                .collect()
        };
        let x = uniform(n * din, 1.0);
        let w_true = uniform(din * dout, 0.5);
        let b_true = uniform(dout, 0.5);
        let eps = uniform(n * dout, noise);
        let mut y = vec![0.0f32; n * dout];
        for i in 0..n {
            let yi = &mut y[i * dout..(i + 1) * dout];
            for (o, v) in yi.iter_mut().enumerate() {
                *v = b_true[o] + eps[i * dout + o];
            }
            for k in 0..din {
                let xik = x[i * din + k];
                for (v, w) in yi.iter_mut().zip(&w_true[k * dout..(k + 1) * dout]) {
                    *v += xik * w;
                }
            }
        }
        LeastSquares { n, din, dout, x, y }
    }

    /// Initial parameters: small deterministic values, as a trainer would start.
    pub fn init(&self, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let w = (0..self.din * self.dout)
            .map(|_| 0.01 * rng.random_range(-1.0f32..1.0))
            .collect();
        (w, vec![0.0; self.dout])
    }

    /// Loss (in f64) and gradients with respect to `w` and `b`.
    pub fn loss_grad(&self, w: &[f32], b: &[f32], gw: &mut [f32], gb: &mut [f32]) -> f64 {
        let (n, din, dout) = (self.n, self.din, self.dout);
        gw.fill(0.0);
        gb.fill(0.0);
        let inv_n = 1.0 / n as f32;
        let mut loss = 0.0f64;
        let mut r = vec![0.0f32; dout];
        for i in 0..n {
            for (o, ro) in r.iter_mut().enumerate() {
                *ro = b[o] - self.y[i * dout + o];
            }
            let xi = &self.x[i * din..(i + 1) * din];
            for (k, &xik) in xi.iter().enumerate() {
                for (ro, wk) in r.iter_mut().zip(&w[k * dout..(k + 1) * dout]) {
                    *ro += xik * wk;
                }
            }
            loss += r.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
            for (g, &ro) in gb.iter_mut().zip(&r) {
                *g += ro * inv_n;
            }
            for (k, &xik) in xi.iter().enumerate() {
                let s = xik * inv_n;
                for (g, &ro) in gw[k * dout..(k + 1) * dout].iter_mut().zip(&r) {
                    *g += s * ro;
                }
            }
        }
        loss / (2.0 * n as f64)
    }
}

/// L2 norm of `a - b` in f64.
pub fn dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Bitwise equality of two f32 slices (so that -0.0 != 0.0 and NaN == NaN).
pub fn bits_eq(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}
