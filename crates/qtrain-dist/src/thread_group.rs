//! [`ThreadGroup`]: N ranks as threads of one process, std only (a mutex and a
//! condition variable). It is how CI exercises the data-parallel logic without a
//! GPU, and the oracle the NCCL path is held to.
//!
//! Every collective is a rendezvous of all ranks: each deposits its contribution
//! in its slot, and the last to arrive combines them and publishes the outcome
//! for that generation. Sums run in rank order (`((p0 + p1) + p2) + ...`, element
//! by element), so the result is bit-identical to a single process summing the
//! same partial sums in rank order, and identical on every rank.
//!
//! What NCCL would turn into a hang becomes an error here: ranks calling
//! different collectives (or different lengths) get [`DistError::Mismatch`]; a
//! rank whose handle is dropped (its thread returned early or panicked) makes the
//! others' waits fail with [`DistError::RankLeft`]; and a wait longer than the
//! group's timeout fails with [`DistError::Timeout`] and breaks the group.

use crate::collective::Collective;
use crate::error::{DistError, Result};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a rank waits for the others by default: generous, because on a
/// loaded CI machine one rank's forward/backward can take a while, yet finite so a
/// logic error fails a test instead of hanging it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    SumF32(usize),
    SumF64(usize),
    SumU64(usize),
    MaxU64,
    MinU64,
    BroadcastBytes,
    BroadcastF32(usize),
    Barrier,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::SumF32(_) => "all_reduce_sum_f32",
            Op::SumF64(_) => "all_reduce_sum_f64",
            Op::SumU64(_) => "all_reduce_sum_u64",
            Op::MaxU64 => "all_reduce_max_u64",
            Op::MinU64 => "all_reduce_min_u64",
            Op::BroadcastBytes => "broadcast_bytes",
            Op::BroadcastF32(_) => "broadcast_f32",
            Op::Barrier => "barrier",
        }
    }

    fn describe(self) -> String {
        match self {
            Op::SumF32(n) | Op::SumF64(n) | Op::SumU64(n) | Op::BroadcastF32(n) => {
                format!("{}({n} values)", self.name())
            }
            _ => self.name().to_string(),
        }
    }
}

#[derive(Debug)]
enum Payload {
    None,
    F32(Vec<f32>),
    F64(Vec<f64>),
    U64(Vec<u64>),
    Bytes(Vec<u8>),
}

type Outcome = std::result::Result<Payload, String>;

struct State {
    /// Counts completed collectives; a waiter is done when it changes.
    generation: u64,
    arrived: usize,
    slots: Vec<Option<(Op, Payload)>>,
    /// The outcome of the last completed generation. It cannot be replaced before
    /// every rank has read it: the next collective needs all ranks to arrive.
    done: Option<Arc<Outcome>>,
    /// The first rank that left (dropped its handle or timed out).
    left: Option<usize>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; recover the data if a bug ever did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Constructors of an in-process group of ranks.
pub struct ThreadGroup;

impl ThreadGroup {
    /// One handle per rank (`world` of them), with [`DEFAULT_TIMEOUT`].
    pub fn ranks(world: usize) -> Result<Vec<ThreadComm>> {
        Self::ranks_with_timeout(world, DEFAULT_TIMEOUT)
    }

    /// One handle per rank; a rank that waits longer than `timeout` in a
    /// collective fails with [`DistError::Timeout`].
    pub fn ranks_with_timeout(world: usize, timeout: Duration) -> Result<Vec<ThreadComm>> {
        if world == 0 {
            return Err(DistError::Invalid(
                "a thread group needs at least one rank".into(),
            ));
        }
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State {
                generation: 0,
                arrived: 0,
                slots: (0..world).map(|_| None).collect(),
                done: None,
                left: None,
            }),
            cv: Condvar::new(),
        });
        Ok((0..world)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
            })
            .collect())
    }

    /// Runs `f` once per rank, each on its own thread with its handle, and returns
    /// the results in rank order. A panic in any rank is re-raised here after all
    /// threads have finished (the other ranks see [`DistError::RankLeft`]).
    pub fn run<T, F>(world: usize, f: F) -> Result<Vec<T>>
    where
        T: Send,
        F: Fn(ThreadComm) -> T + Sync,
    {
        let comms = Self::ranks(world)?;
        let f = &f;
        let joined: Vec<std::thread::Result<T>> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    std::thread::Builder::new()
                        .name(format!("rank-{}", c.rank))
                        .spawn_scoped(s, move || f(c))
                        .expect("spawning a rank thread")
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        let mut out = Vec::with_capacity(world);
        for r in joined {
            match r {
                Ok(v) => out.push(v),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(out)
    }
}

/// One rank's handle on a [`ThreadGroup`]. Dropping it tells the other ranks
/// that this one is gone.
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ThreadComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadComm")
            .field("rank", &self.rank)
            .field("world", &self.shared.world)
            .finish()
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if st.left.is_none() {
            st.left = Some(self.rank);
        }
        self.shared.cv.notify_all();
    }
}

impl ThreadComm {
    /// Deposits this rank's contribution and waits for the combined outcome.
    fn exchange(&self, op: Op, payload: Payload) -> Result<Arc<Outcome>> {
        let sh = &*self.shared;
        let mut st = sh.lock();
        if let Some(rank) = st.left {
            return Err(DistError::RankLeft {
                rank,
                me: self.rank,
                op: op.name(),
            });
        }
        let generation = st.generation;
        st.slots[self.rank] = Some((op, payload));
        st.arrived += 1;
        if st.arrived == sh.world {
            let slots: Vec<(Op, Payload)> = st
                .slots
                .iter_mut()
                .map(|s| s.take().expect("every rank has arrived"))
                .collect();
            let outcome = Arc::new(combine(slots));
            st.done = Some(outcome.clone());
            st.arrived = 0;
            st.generation += 1;
            sh.cv.notify_all();
            return Ok(outcome);
        }
        let deadline = Instant::now() + sh.timeout;
        loop {
            // Completion first: a rank that finished its last collective and then
            // dropped its handle must not fail the others' read of that outcome.
            if st.generation != generation {
                return Ok(st.done.clone().expect("a completed generation"));
            }
            if let Some(rank) = st.left {
                return Err(DistError::RankLeft {
                    rank,
                    me: self.rank,
                    op: op.name(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                // The group cannot recover from a rank that gave up mid-collective.
                st.left = Some(self.rank);
                sh.cv.notify_all();
                return Err(DistError::Timeout {
                    op: op.name(),
                    rank: self.rank,
                    after: sh.timeout,
                });
            }
            st = sh
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn outcome(&self, op: Op, payload: Payload) -> Result<Arc<Outcome>> {
        let out = self.exchange(op, payload)?;
        if let Err(msg) = &*out {
            return Err(DistError::Mismatch(msg.clone()));
        }
        Ok(out)
    }
}

/// Combines the contributions of all ranks (in rank order) into the outcome.
fn combine(slots: Vec<(Op, Payload)>) -> Outcome {
    let op0 = slots[0].0;
    let agree = slots.iter().all(|(op, _)| match (op0, *op) {
        // Only rank 0's length matters in a byte broadcast.
        (Op::BroadcastBytes, Op::BroadcastBytes) => true,
        (a, b) => a == b,
    });
    if !agree {
        let calls: Vec<String> = slots
            .iter()
            .enumerate()
            .map(|(r, (op, _))| format!("rank {r} called {}", op.describe()))
            .collect();
        return Err(calls.join(", "));
    }
    let mut it = slots.into_iter().map(|(_, p)| p);
    let first = it.next().expect("at least one rank");
    Ok(match (op0, first) {
        (Op::SumF32(_), Payload::F32(mut acc)) => {
            for p in it {
                let Payload::F32(v) = p else { unreachable!() };
                acc.iter_mut().zip(&v).for_each(|(a, b)| *a += *b);
            }
            Payload::F32(acc)
        }
        (Op::SumF64(_), Payload::F64(mut acc)) => {
            for p in it {
                let Payload::F64(v) = p else { unreachable!() };
                acc.iter_mut().zip(&v).for_each(|(a, b)| *a += *b);
            }
            Payload::F64(acc)
        }
        (Op::SumU64(_), Payload::U64(mut acc)) => {
            for p in it {
                let Payload::U64(v) = p else { unreachable!() };
                for (a, b) in acc.iter_mut().zip(&v) {
                    *a = match a.checked_add(*b) {
                        Some(s) => s,
                        None => return Err("all_reduce_sum_u64 overflowed u64".into()),
                    };
                }
            }
            Payload::U64(acc)
        }
        (Op::MaxU64, Payload::U64(mut acc)) => {
            for p in it {
                let Payload::U64(v) = p else { unreachable!() };
                acc[0] = acc[0].max(v[0]);
            }
            Payload::U64(acc)
        }
        (Op::MinU64, Payload::U64(mut acc)) => {
            for p in it {
                let Payload::U64(v) = p else { unreachable!() };
                acc[0] = acc[0].min(v[0]);
            }
            Payload::U64(acc)
        }
        // Broadcasts: rank 0's contribution is the outcome.
        (Op::BroadcastBytes | Op::BroadcastF32(_), p) => p,
        (Op::Barrier, _) => Payload::None,
        (op, p) => unreachable!("{} with payload {p:?}", op.name()),
    })
}

impl Collective for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let out = self.outcome(Op::SumF32(buf.len()), Payload::F32(buf.to_vec()))?;
        let Ok(Payload::F32(v)) = &*out else {
            unreachable!()
        };
        buf.copy_from_slice(v);
        Ok(())
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let out = self.outcome(Op::SumF64(buf.len()), Payload::F64(buf.to_vec()))?;
        let Ok(Payload::F64(v)) = &*out else {
            unreachable!()
        };
        buf.copy_from_slice(v);
        Ok(())
    }

    fn all_reduce_sum_u64(&self, buf: &mut [u64]) -> Result<()> {
        let out = self.outcome(Op::SumU64(buf.len()), Payload::U64(buf.to_vec()))?;
        let Ok(Payload::U64(v)) = &*out else {
            unreachable!()
        };
        buf.copy_from_slice(v);
        Ok(())
    }

    fn all_reduce_max_u64(&self, value: u64) -> Result<u64> {
        let out = self.outcome(Op::MaxU64, Payload::U64(vec![value]))?;
        let Ok(Payload::U64(v)) = &*out else {
            unreachable!()
        };
        Ok(v[0])
    }

    fn all_reduce_min_u64(&self, value: u64) -> Result<u64> {
        let out = self.outcome(Op::MinU64, Payload::U64(vec![value]))?;
        let Ok(Payload::U64(v)) = &*out else {
            unreachable!()
        };
        Ok(v[0])
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>) -> Result<()> {
        // Only the root's bytes travel; the others contribute nothing.
        let mine = if self.rank == 0 {
            buf.clone()
        } else {
            Vec::new()
        };
        let out = self.outcome(Op::BroadcastBytes, Payload::Bytes(mine))?;
        if self.rank != 0 {
            let Ok(Payload::Bytes(v)) = &*out else {
                unreachable!()
            };
            buf.clear();
            buf.extend_from_slice(v);
        }
        Ok(())
    }

    fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()> {
        let mine = if self.rank == 0 {
            buf.to_vec()
        } else {
            Vec::new()
        };
        let out = self.outcome(Op::BroadcastF32(buf.len()), Payload::F32(mine))?;
        if self.rank != 0 {
            let Ok(Payload::F32(v)) = &*out else {
                unreachable!()
            };
            buf.copy_from_slice(v);
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.outcome(Op::Barrier, Payload::None)?;
        Ok(())
    }
}
