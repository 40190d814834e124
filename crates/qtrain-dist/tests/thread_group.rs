//! The in-process backend: results in rank order and bit-identical on all ranks,
//! every collective of the trait, and errors instead of hangs.

use qtrain_dist::{Collective, DistError, ThreadComm, ThreadGroup};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};

/// Values whose f32 sum depends on the order of summation.
fn partials(rank: usize, n: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(rank as u64 + 11);
    (0..n)
        .map(|_| {
            let mag = 10f32.powi(rng.random_range(-4..5));
            rng.random_range(-1.0f32..1.0) * mag
        })
        .collect()
}

#[test]
fn sums_are_in_rank_order_and_identical_on_every_rank() {
    for world in [1, 2, 3, 5] {
        let n = 1000;
        let out = ThreadGroup::run(world, |c| {
            let mut v = partials(c.rank(), n);
            c.all_reduce_sum_f32(&mut v).unwrap();
            let mut d: Vec<f64> = partials(c.rank(), n).iter().map(|&x| x as f64).collect();
            c.all_reduce_sum_f64(&mut d).unwrap();
            let mut u = vec![c.rank() as u64 + 1, u64::MAX / 8];
            c.all_reduce_sum_u64(&mut u).unwrap();
            (v, d, u)
        })
        .unwrap();
        // What one process summing the partial sums in rank order gets.
        let mut expect = partials(0, n);
        let mut expect64: Vec<f64> = expect.iter().map(|&x| x as f64).collect();
        for r in 1..world {
            for (e, p) in expect.iter_mut().zip(partials(r, n)) {
                *e += p;
            }
            for (e, p) in expect64.iter_mut().zip(partials(r, n)) {
                *e += p as f64;
            }
        }
        for (r, (v, d, u)) in out.iter().enumerate() {
            let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(v), bits(&expect), "rank {r} of {world}");
            assert_eq!(d, &expect64, "rank {r} of {world}");
            let w = world as u64;
            assert_eq!(u, &vec![w * (w + 1) / 2, w * (u64::MAX / 8)]);
        }
    }
}

#[test]
fn broadcasts_max_min_and_decisions() {
    let out = ThreadGroup::run(4, |c| {
        let r = c.rank();
        let mut bytes = if r == 0 {
            b"planner: 120 steps".to_vec()
        } else {
            vec![7; r * 3]
        };
        c.broadcast_bytes(&mut bytes).unwrap();
        let mut f = vec![r as f32; 5];
        c.broadcast_f32(&mut f).unwrap();
        let max = c.all_reduce_max_u64(10 + r as u64).unwrap();
        let min = c.all_reduce_min_u64(10 + r as u64).unwrap();
        let any = c.any(r == 2).unwrap();
        let all = c.all(r != 2).unwrap();
        let none = c.any(false).unwrap();
        let bu = c.broadcast_u64(if r == 0 { 99 } else { r as u64 }).unwrap();
        c.barrier().unwrap();
        let same = c.check_same("step", 5).is_ok();
        let differ = c.check_same("data cursor", r as u64 / 2);
        (bytes, f, max, min, any, all, none, bu, same, differ)
    })
    .unwrap();
    for (bytes, f, max, min, any, all, none, bu, same, differ) in out {
        assert_eq!(bytes, b"planner: 120 steps");
        assert_eq!(f, vec![0.0; 5]);
        assert_eq!((max, min), (13, 10));
        assert!(any && !all && !none);
        assert_eq!(bu, 99);
        assert!(same);
        match differ {
            Err(DistError::Disagree { what, min, max }) => {
                assert_eq!((what.as_str(), min, max), ("data cursor", 0, 1))
            }
            other => panic!("expected a disagreement, got {other:?}"),
        }
    }
}

#[test]
fn mismatched_collectives_fail_on_every_rank() {
    let out = ThreadGroup::run(2, |c| {
        let mut v = vec![1.0f32; 3 + c.rank()];
        c.all_reduce_sum_f32(&mut v)
    })
    .unwrap();
    for r in out {
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("rank 0 called all_reduce_sum_f32(3 values)")
                && e.contains("rank 1 called all_reduce_sum_f32(4 values)"),
            "{e}"
        );
    }
    let out = ThreadGroup::run(2, |c| {
        if c.rank() == 0 {
            c.barrier().map(|_| ())
        } else {
            c.broadcast_bytes(&mut Vec::new())
        }
    })
    .unwrap();
    assert!(out
        .iter()
        .all(|r| matches!(r, Err(DistError::Mismatch(m)) if m.contains("broadcast_bytes"))));
    // A broadcast with different lengths is as wrong as a sum with different lengths.
    let out = ThreadGroup::run(2, |c| c.broadcast_f32(&mut vec![0.0; 2 + c.rank()])).unwrap();
    assert!(out.iter().all(|r| matches!(r, Err(DistError::Mismatch(_)))));
}

#[test]
fn a_departed_rank_fails_the_waiters_instead_of_hanging() {
    let t = Instant::now();
    let out = ThreadGroup::run(3, |c: ThreadComm| {
        if c.rank() == 1 {
            // Returns (and drops its handle) without joining the collective.
            return None;
        }
        Some(c.barrier())
    })
    .unwrap();
    for r in [0, 2] {
        match &out[r] {
            Some(Err(DistError::RankLeft { rank: 1, me, op })) => {
                assert_eq!((*me, *op), (r, "barrier"))
            }
            other => panic!("rank {r}: {other:?}"),
        }
    }
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_panicking_rank_is_reraised_after_the_others_fail() {
    let caught = std::panic::catch_unwind(|| {
        ThreadGroup::run(2, |c| {
            if c.rank() == 1 {
                panic!("rank 1 blew up");
            }
            let e = c.barrier().unwrap_err();
            assert!(matches!(e, DistError::RankLeft { rank: 1, .. }), "{e}");
        })
    });
    let payload = caught.expect_err("the panic propagates");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"rank 1 blew up"));
}

#[test]
fn a_stuck_rank_times_out_and_breaks_the_group() {
    let comms = ThreadGroup::ranks_with_timeout(2, Duration::from_millis(100)).unwrap();
    let mut it = comms.into_iter();
    let (c0, c1) = (it.next().unwrap(), it.next().unwrap());
    let t = Instant::now();
    let e = c0.barrier().unwrap_err();
    assert!(
        matches!(
            e,
            DistError::Timeout {
                op: "barrier",
                rank: 0,
                ..
            }
        ),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    // The late rank learns that the group is gone.
    assert!(matches!(
        c1.barrier(),
        Err(DistError::RankLeft { rank: 0, me: 1, .. })
    ));
}

/// Many collectives in a row with rank-dependent pacing: no lost wake-up, no
/// outcome read from the wrong generation.
#[test]
fn long_sequences_of_collectives_stay_in_step() {
    let world = 4;
    let out = ThreadGroup::run(world, |c| {
        let r = c.rank() as u64;
        let mut acc = 0u64;
        for i in 0..300u64 {
            if (i + r).is_multiple_of(7) {
                std::thread::yield_now();
            }
            let mut v = [i * 10 + r];
            c.all_reduce_sum_u64(&mut v).unwrap();
            assert_eq!(v[0], world as u64 * i * 10 + 6);
            acc += c.all_reduce_max_u64(i + r).unwrap();
            let b = c.broadcast_u64(i * 1000 + r).unwrap();
            assert_eq!(b, i * 1000);
        }
        acc
    })
    .unwrap();
    let expect: u64 = (0..300u64).map(|i| i + 3).sum();
    assert!(out.iter().all(|&a| a == expect));
}
