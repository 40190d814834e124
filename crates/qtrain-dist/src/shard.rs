//! Deterministic, disjoint data sharding of an optimizer step, and the step's
//! global loss denominator.
//!
//! **The global step.** One optimizer step trains on `G` micro-batches taken in
//! order from the one global data stream (`G` = global micro-batches per step;
//! each micro-batch is `data.batch_size` packed rows). With `W` ranks,
//! [`StepSharding`] gives rank `r` a contiguous block of them (the first `G % W`
//! ranks one more than the others), so the union over ranks is exactly the `G`
//! micro-batches a single process would train on, each exactly once.
//!
//! **How ranks get their share.** Every rank runs the same data stream from the
//! same cursor and reads all `G` micro-batches of the step, keeping only its own
//! ([`StepSharding::take_step`]). Tokenizing `W` times the data costs little next
//! to a training step, and it buys two things: no data has to be scattered, and
//! after every step all ranks hold the *same* stream cursor, which is therefore the
//! global cursor; rank 0 saves it in its checkpoint.
//!
//! **Resume with another world size.** The cursor marks a position in the global
//! stream, at a step boundary, independent of `W`. A run resumed on `W'` GPUs
//! starts every rank's stream at that cursor and keeps `G` (so the trainer should
//! treat its accumulation setting as the *global* `G`, split over the ranks): step
//! `s` then trains on exactly the micro-batches it would have trained on with `W`
//! GPUs, only partitioned differently. The dropout masks follow, because they are
//! keyed by the micro-batch's global index ([`StepSharding::micro_step`]), never by
//! a rank-local counter.
//!
//! **Loss normalization.** The loss of a step is the mean over all valid target
//! tokens of the global step, so every rank calls `forward_backward` with the same
//! denominator: the sum over ranks of their valid-token counts
//! ([`loss_denominator`]), and the summed gradients are then the gradient of that
//! mean. Every rank also saw every micro-batch, so [`agreed_loss_denominator`]
//! checks the all-reduced sum against the count each rank saw: ranks reading
//! different data fail loudly instead of training on inconsistent batches.

use crate::collective::Collective;
use crate::error::{DistError, Result};
use std::ops::Range;

/// How the `G` micro-batches of an optimizer step are split over `W` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepSharding {
    global: usize,
    world: usize,
}

impl StepSharding {
    /// `global_micro_batches` (`G`) split over `world_size` ranks. Every rank needs
    /// at least one micro-batch, so `G >= W`.
    pub fn new(global_micro_batches: usize, world_size: usize) -> Result<Self> {
        if world_size == 0 {
            return Err(DistError::Invalid("world size 0".into()));
        }
        if global_micro_batches < world_size {
            return Err(DistError::Invalid(format!(
                "an optimizer step of {global_micro_batches} micro-batches cannot feed \
                 {world_size} ranks (each needs at least one): raise the gradient \
                 accumulation to a multiple of {world_size} or use fewer GPUs"
            )));
        }
        Ok(Self {
            global: global_micro_batches,
            world: world_size,
        })
    }

    /// `per_rank` micro-batches on each of `world_size` ranks.
    pub fn per_rank(per_rank: usize, world_size: usize) -> Result<Self> {
        let global = per_rank.checked_mul(world_size).ok_or_else(|| {
            DistError::Invalid(format!("{per_rank} x {world_size} micro-batches overflow"))
        })?;
        Self::new(global, world_size)
    }

    /// `G`.
    pub fn global_micro_batches(&self) -> usize {
        self.global
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Whether every rank gets the same number of micro-batches (otherwise the
    /// ranks with one more set the pace of each step).
    pub fn is_balanced(&self) -> bool {
        self.global.is_multiple_of(self.world)
    }

    /// The global indices (`0..G`) of rank `rank`'s micro-batches.
    pub fn range(&self, rank: usize) -> Range<usize> {
        assert!(rank < self.world, "rank {rank} of {}", self.world);
        let (q, rem) = (self.global / self.world, self.global % self.world);
        let start = rank * q + rank.min(rem);
        start..start + q + usize::from(rank < rem)
    }

    /// The rank that trains global micro-batch `index`.
    pub fn owner(&self, index: usize) -> usize {
        assert!(
            index < self.global,
            "micro-batch {index} of {}",
            self.global
        );
        (0..self.world)
            .find(|&r| self.range(r).contains(&index))
            .expect("the ranges cover 0..G")
    }

    /// The run-wide counter of global micro-batch `index` of optimizer step
    /// `step` (`step * G + index`): the `micro_step` of its dropout masks, the same
    /// whichever rank trains it and however many ranks there are.
    pub fn micro_step(&self, step: u64, index: usize) -> u64 {
        step * self.global as u64 + index as u64
    }

    /// Reads the `G` micro-batches of one step from `next` (in global order) and
    /// keeps rank `rank`'s; `valid_tokens` counts a micro-batch's loss targets.
    /// Every rank must call it on an identical stream.
    pub fn take_step<T, E>(
        &self,
        rank: usize,
        mut next: impl FnMut() -> std::result::Result<T, E>,
        valid_tokens: impl Fn(&T) -> u64,
    ) -> std::result::Result<StepShare<T>, E> {
        let mine = self.range(rank);
        let mut share = StepShare {
            start: mine.start,
            items: Vec::with_capacity(mine.len()),
            local_valid_tokens: 0,
            step_valid_tokens: 0,
        };
        for i in 0..self.global {
            let item = next()?;
            let v = valid_tokens(&item);
            share.step_valid_tokens += v;
            if mine.contains(&i) {
                share.local_valid_tokens += v;
                share.items.push(item);
            }
        }
        Ok(share)
    }
}

/// One rank's part of an optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepShare<T> {
    /// Global index (`0..G`) of `items[0]`.
    pub start: usize,
    /// This rank's micro-batches, in global order.
    pub items: Vec<T>,
    /// Valid target tokens in `items`.
    pub local_valid_tokens: u64,
    /// Valid target tokens of the whole step, as this rank read it.
    pub step_valid_tokens: u64,
}

impl<T> StepShare<T> {
    /// `(global index, micro-batch)` of this rank's micro-batches.
    pub fn indexed(&self) -> impl Iterator<Item = (usize, &T)> {
        self.items
            .iter()
            .enumerate()
            .map(|(i, t)| (self.start + i, t))
    }
}

/// The valid target tokens of the global step: the sum over ranks of `local`.
pub fn loss_denominator(coll: &dyn Collective, local: u64) -> Result<u64> {
    let mut v = [local];
    coll.all_reduce_sum_u64(&mut v)?;
    Ok(v[0])
}

/// [`loss_denominator`] of `share`, checked against the step's count every rank
/// read: fails on every rank (never on some only, which would leave the others
/// waiting in the next collective) when any rank's data differs.
pub fn agreed_loss_denominator<T>(coll: &dyn Collective, share: &StepShare<T>) -> Result<u64> {
    let global = loss_denominator(coll, share.local_valid_tokens)?;
    let min = coll.all_reduce_min_u64(share.step_valid_tokens)?;
    let max = coll.all_reduce_max_u64(share.step_valid_tokens)?;
    if min != max || global != min {
        return Err(DistError::Disagree {
            what: format!(
                "the valid target tokens of this step (the ranks' shares sum to {global}); \
                 the ranks read different data: are they on the same data cursor and config?"
            ),
            min,
            max,
        });
    }
    Ok(global)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_disjoint_contiguous_and_cover_the_step() {
        for world in 1..=6 {
            for global in world..=20 {
                let s = StepSharding::new(global, world).unwrap();
                let mut seen = Vec::new();
                let mut prev_end = 0;
                for r in 0..world {
                    let range = s.range(r);
                    assert_eq!(range.start, prev_end, "contiguous in rank order");
                    assert!(!range.is_empty(), "every rank gets work");
                    // Balanced to within one micro-batch.
                    assert!(range.len() == global / world || range.len() == global / world + 1);
                    prev_end = range.end;
                    for i in range {
                        assert_eq!(s.owner(i), r);
                        seen.push(i);
                    }
                }
                assert_eq!(
                    seen,
                    (0..global).collect::<Vec<_>>(),
                    "G={global} W={world}"
                );
                assert_eq!(s.is_balanced(), global % world == 0);
            }
        }
    }

    #[test]
    fn too_few_micro_batches_is_an_error() {
        let e = StepSharding::new(3, 4).unwrap_err().to_string();
        assert!(
            e.contains("3 micro-batches") && e.contains("4 ranks"),
            "{e}"
        );
        assert!(StepSharding::new(1, 0).is_err());
        assert_eq!(
            StepSharding::per_rank(2, 3).unwrap().global_micro_batches(),
            6
        );
    }

    #[test]
    fn micro_steps_are_global_and_world_independent() {
        let one = StepSharding::new(8, 1).unwrap();
        let four = StepSharding::new(8, 4).unwrap();
        for step in [0u64, 1, 17] {
            for i in 0..8 {
                assert_eq!(one.micro_step(step, i), four.micro_step(step, i));
            }
        }
        // Consecutive steps never reuse a counter.
        assert_eq!(four.micro_step(1, 0), four.micro_step(0, 7) + 1);
    }

    /// The stream is consumed identically on every rank (the global cursor), the
    /// shares partition it, and a resume on a different world size continues the
    /// same global sequence of steps.
    #[test]
    fn take_step_partitions_the_stream_and_resumes_across_world_sizes() {
        let global = 6;
        // The "stream": micro-batch k has k % 5 valid tokens.
        let run = |world: usize, from: usize, steps: usize| -> Vec<Vec<usize>> {
            let s = StepSharding::new(global, world).unwrap();
            let mut per_step = Vec::new();
            for step in 0..steps {
                let mut union = Vec::new();
                let mut positions = Vec::new();
                let mut total = 0;
                for r in 0..world {
                    let mut pos = from + step * global;
                    let share = s
                        .take_step(
                            r,
                            || -> std::result::Result<usize, ()> {
                                pos += 1;
                                Ok(pos - 1)
                            },
                            |&k| (k % 5) as u64,
                        )
                        .unwrap();
                    positions.push(pos);
                    for (gi, &k) in share.indexed() {
                        assert_eq!(k, from + step * global + gi);
                    }
                    assert_eq!(
                        share.step_valid_tokens,
                        (0..global)
                            .map(|i| ((from + step * global + i) % 5) as u64)
                            .sum::<u64>()
                    );
                    total += share.local_valid_tokens;
                    union.extend(share.items);
                }
                // Every rank stopped at the same place: one global cursor.
                assert!(positions.windows(2).all(|w| w[0] == w[1]));
                assert_eq!(total, union.iter().map(|&k| (k % 5) as u64).sum::<u64>());
                per_step.push(union);
            }
            per_step
        };
        let single = run(1, 0, 4);
        assert_eq!(run(2, 0, 4), single);
        assert_eq!(run(3, 0, 4), single);
        // Two steps on 2 ranks, then resume from the cursor (position 12) on 3.
        let mut resumed = run(2, 0, 2);
        resumed.extend(run(3, 2 * global, 2));
        assert_eq!(resumed, single);
    }

    #[test]
    fn source_errors_propagate() {
        let s = StepSharding::new(4, 2).unwrap();
        let mut n = 0;
        let r = s.take_step(
            1,
            || {
                n += 1;
                if n == 3 {
                    Err("the dataset ran dry")
                } else {
                    Ok(n)
                }
            },
            |_| 1,
        );
        assert_eq!(r.unwrap_err(), "the dataset ran dry");
    }
}
