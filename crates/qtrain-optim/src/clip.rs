//! Global-norm gradient clipping over all trainable parameters.

/// Scales all gradients together so that their global L2 norm is at most `max_norm`,
/// and returns the global norm measured *before* clipping.
///
/// * The sum of squares is accumulated in f64, in a fixed order (parameter by parameter,
///   element by element), so the result is deterministic and does not lose the small
///   gradients of a 40 M-element sum to f32 rounding.
/// * As in PyTorch's `clip_grad_norm_`, the scale is `max_norm / (norm + 1e-6)` and is
///   applied only when it is below 1; the epsilon keeps a norm at exactly `max_norm`
///   from being rescaled by rounding noise.
/// * `max_norm <= 0` (or NaN) disables clipping; the norm is still measured and returned,
///   since the trainer logs it.
/// * A non-finite norm (some gradient is NaN or infinite) is returned as is and the
///   gradients are left untouched: scaling by a NaN factor would destroy the finite
///   gradients too. The caller should skip the step when the returned norm is not finite.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> f32 {
    let sum_sq: f64 = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| {
            let x = f64::from(x);
            x * x
        })
        .sum();
    let norm = sum_sq.sqrt();
    if max_norm.is_nan() || max_norm <= 0.0 || !norm.is_finite() {
        return norm as f32;
    }
    let coef = f64::from(max_norm) / (norm + 1e-6);
    if coef < 1.0 {
        let coef = coef as f32;
        for g in grads.iter_mut() {
            for x in g.iter_mut() {
                *x *= coef;
            }
        }
    }
    norm as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm_of(grads: &[Vec<f32>]) -> f64 {
        grads
            .iter()
            .flatten()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn clips_to_max_norm_across_tensors() {
        // 3-4 in one tensor, 12 in the other: global norm 13.
        let mut a = vec![3.0f32, 4.0];
        let mut b = vec![12.0f32];
        let norm = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 1.0);
        assert_eq!(norm, 13.0);
        let after = norm_of(&[a.clone(), b.clone()]);
        assert!((after - 1.0).abs() < 1e-6, "clipped norm {after}");
        // Direction is preserved.
        assert!((a[0] / a[1] - 0.75).abs() < 1e-6);
        assert!((b[0] / a[0] - 4.0).abs() < 1e-5);
    }

    #[test]
    fn below_threshold_is_untouched() {
        let mut a = vec![0.3f32, -0.4];
        let norm = clip_grad_norm(&mut [&mut a[..]], 1.0);
        assert!((norm - 0.5).abs() < 1e-7);
        assert_eq!(a, vec![0.3, -0.4]);
    }

    #[test]
    fn disabled_when_max_norm_not_positive() {
        for max_norm in [0.0f32, -1.0, f32::NAN] {
            let mut a = vec![30.0f32, 40.0];
            let norm = clip_grad_norm(&mut [&mut a[..]], max_norm);
            assert_eq!(norm, 50.0);
            assert_eq!(a, vec![30.0, 40.0]);
        }
    }

    #[test]
    fn non_finite_norm_is_reported_and_grads_untouched() {
        let mut a = [1.0f32, f32::NAN];
        let mut b = [100.0f32];
        let norm = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 1.0);
        assert!(norm.is_nan());
        assert_eq!(a[0], 1.0);
        assert_eq!(b[0], 100.0);

        let mut c = [f32::INFINITY, 1.0];
        assert_eq!(clip_grad_norm(&mut [&mut c[..]], 1.0), f32::INFINITY);
        assert_eq!(c[1], 1.0);
    }

    #[test]
    fn f64_accumulation_keeps_small_terms() {
        // 1 + 2^24 copies of 2^-12 squared: f32 accumulation would stall at 1.0
        // (each term 2^-24 is below half an ulp of 1.0); f64 gets 1 + 1 = 2.
        let mut big = [1.0f32];
        let mut small = vec![2f32.powi(-12); 1 << 24];
        let norm = clip_grad_norm(&mut [&mut big[..], &mut small[..]], 0.0);
        assert!((f64::from(norm) - 2f64.sqrt()).abs() < 1e-6, "{norm}");
    }

    #[test]
    fn empty_gradients_have_zero_norm() {
        assert_eq!(clip_grad_norm(&mut [], 1.0), 0.0);
    }
}
