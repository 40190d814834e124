//! [`WorldEnv`]: where this process sits in a data-parallel run, read from the
//! launcher conventions torchrun uses (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), so `qtrain run` works under
//! torchrun, under its own supervisor ([`crate::launch`]) and on several hosts.
//!
//! GPU choice: a worker computes on `cuda:LOCAL_RANK`, as under torchrun. qtrain's
//! own launcher gives every worker the same `CUDA_VISIBLE_DEVICES` (the chosen
//! devices, in order) and a different `LOCAL_RANK`, so one rule serves both.
//!
//! Rendezvous port: rank 0 serves the NCCL unique id on `MASTER_PORT`, except
//! under torchrun with `TORCHELASTIC_USE_AGENT_STORE=True`, where torchrun's own
//! agent already listens on `MASTER_PORT` (its c10d TCPStore) and qtrain takes
//! `MASTER_PORT + 1`. `QTRAIN_RENDEZVOUS_PORT` overrides both.

use crate::error::{DistError, Result};

/// This process's place in the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldEnv {
    /// Global rank, `0..world_size`; rank 0 owns checkpoints, metrics and the planner.
    pub rank: usize,
    pub world_size: usize,
    /// Rank on this host; the worker computes on `cuda:local_rank`.
    pub local_rank: usize,
    /// Workers on this host, when the launcher says.
    pub local_world_size: Option<usize>,
    /// Host of rank 0.
    pub master_addr: String,
    pub master_port: u16,
    /// Where rank 0 serves the NCCL unique id (see the module docs).
    pub rendezvous_port: u16,
}

/// The variables a launcher sets (and [`WorldEnv::to_env`] writes).
pub const VARS: [&str; 6] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
];

fn parse<T: std::str::FromStr>(var: &'static str, value: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    value.trim().parse().map_err(|e| DistError::Env {
        var,
        msg: format!("`{value}` is not a valid number ({e})"),
    })
}

impl WorldEnv {
    /// Reads the process environment. `Ok(None)` when no launcher set `RANK` (a
    /// plain single-process run); an error names the first variable that is
    /// missing or malformed.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`WorldEnv::from_env`] over any lookup (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let Some(rank) = get("RANK") else {
            if let Some(ws) = get("WORLD_SIZE") {
                if parse::<usize>("WORLD_SIZE", &ws)? > 1 {
                    return Err(DistError::Env {
                        var: "RANK",
                        msg: format!("not set, but WORLD_SIZE={ws}: a launcher must set both"),
                    });
                }
            }
            return Ok(None);
        };
        let rank: usize = parse("RANK", &rank)?;
        let world_size: usize = match get("WORLD_SIZE") {
            Some(v) => parse("WORLD_SIZE", &v)?,
            None => {
                return Err(DistError::Env {
                    var: "WORLD_SIZE",
                    msg: format!("not set, but RANK={rank} is"),
                })
            }
        };
        if world_size == 0 {
            return Err(DistError::Env {
                var: "WORLD_SIZE",
                msg: "must be at least 1".into(),
            });
        }
        if rank >= world_size {
            return Err(DistError::Env {
                var: "RANK",
                msg: format!("{rank} is not below WORLD_SIZE={world_size}"),
            });
        }
        // One host: the local rank is the rank. torchrun and qtrain's launcher set it.
        let local_rank: usize = match get("LOCAL_RANK") {
            Some(v) => parse("LOCAL_RANK", &v)?,
            None => rank,
        };
        let local_world_size: Option<usize> = match get("LOCAL_WORLD_SIZE") {
            Some(v) => Some(parse("LOCAL_WORLD_SIZE", &v)?),
            None => None,
        };
        if let Some(lws) = local_world_size {
            if local_rank >= lws {
                return Err(DistError::Env {
                    var: "LOCAL_RANK",
                    msg: format!("{local_rank} is not below LOCAL_WORLD_SIZE={lws}"),
                });
            }
        }
        let distributed = world_size > 1;
        let master_addr = match get("MASTER_ADDR") {
            Some(a) => a.trim().to_string(),
            None if !distributed => "127.0.0.1".to_string(),
            None => {
                return Err(DistError::Env {
                    var: "MASTER_ADDR",
                    msg: format!(
                        "not set (WORLD_SIZE={world_size}): the host of rank 0 is needed for the rendezvous"
                    ),
                })
            }
        };
        let master_port: u16 = match get("MASTER_PORT") {
            Some(p) => parse("MASTER_PORT", &p)?,
            None if !distributed => 0,
            None => {
                return Err(DistError::Env {
                    var: "MASTER_PORT",
                    msg: format!("not set (WORLD_SIZE={world_size})"),
                })
            }
        };
        if distributed && master_port == 0 {
            return Err(DistError::Env {
                var: "MASTER_PORT",
                msg: "0 is not a port rank 0 can be reached on".into(),
            });
        }
        let rendezvous_port = match get("QTRAIN_RENDEZVOUS_PORT") {
            Some(p) => parse("QTRAIN_RENDEZVOUS_PORT", &p)?,
            None if get("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True") => {
                master_port.checked_add(1).ok_or_else(|| DistError::Env {
                    var: "MASTER_PORT",
                    msg: "65535 leaves no port for qtrain's rendezvous next to torchrun's store; \
                          set QTRAIN_RENDEZVOUS_PORT"
                        .into(),
                })?
            }
            None => master_port,
        };
        Ok(Some(Self {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
            rendezvous_port,
        }))
    }

    /// More than one rank: collectives and the rendezvous are needed.
    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    /// Whether this process writes checkpoints, metrics and the adapter.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// The CUDA device ordinal this worker computes on (see the module docs).
    pub fn cuda_ordinal(&self) -> usize {
        self.local_rank
    }

    /// `host:port` of the unique-id rendezvous, for messages.
    pub fn rendezvous_display(&self) -> String {
        display_addr(&self.master_addr, self.rendezvous_port)
    }

    /// The launcher variables describing this process, as a launcher sets them.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("RANK", self.rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
        ];
        if let Some(l) = self.local_world_size {
            v.push(("LOCAL_WORLD_SIZE", l.to_string()));
        }
        v
    }
}

/// `host:port`, with brackets around an IPv6 literal.
pub fn display_addr(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<WorldEnv>> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        WorldEnv::from_lookup(|k| m.get(k).cloned())
    }

    fn err_var(r: Result<Option<WorldEnv>>) -> (&'static str, String) {
        match r {
            Err(DistError::Env { var, msg }) => (var, msg),
            other => panic!("expected an Env error, got {other:?}"),
        }
    }

    #[test]
    fn no_launcher_means_single_process() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("WORLD_SIZE", "1")]).unwrap(), None);
        assert_eq!(err_var(env(&[("WORLD_SIZE", "2")])).0, "RANK");
    }

    #[test]
    fn torchrun_variables_parse() {
        let w = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0.cluster"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((w.rank, w.world_size, w.local_rank), (3, 8, 1));
        assert_eq!(w.cuda_ordinal(), 1);
        assert_eq!(w.rendezvous_port, 29500);
        assert_eq!(w.rendezvous_display(), "node0.cluster:29500");
        assert!(w.is_distributed() && !w.is_root());
        // Round trip through the launcher's view.
        let m: HashMap<&str, String> = w.to_env().into_iter().collect();
        let back = WorldEnv::from_lookup(|k| m.get(k).cloned())
            .unwrap()
            .unwrap();
        assert_eq!(back, w);
    }

    #[test]
    fn torchrun_agent_store_moves_the_rendezvous_port() {
        let base = [
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "::1"),
            ("MASTER_PORT", "29500"),
        ];
        let mut with_agent = base.to_vec();
        with_agent.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
        let w = env(&with_agent).unwrap().unwrap();
        assert_eq!(w.rendezvous_port, 29501);
        assert_eq!(w.rendezvous_display(), "[::1]:29501");
        let mut explicit = with_agent.clone();
        explicit.push(("QTRAIN_RENDEZVOUS_PORT", "40000"));
        assert_eq!(env(&explicit).unwrap().unwrap().rendezvous_port, 40000);
    }

    #[test]
    fn errors_name_the_variable() {
        assert_eq!(err_var(env(&[("RANK", "0")])).0, "WORLD_SIZE");
        assert_eq!(
            err_var(env(&[("RANK", "x"), ("WORLD_SIZE", "2")])).0,
            "RANK"
        );
        let (var, msg) = err_var(env(&[("RANK", "2"), ("WORLD_SIZE", "2")]));
        assert_eq!(var, "RANK");
        assert!(msg.contains("WORLD_SIZE=2"), "{msg}");
        assert_eq!(
            err_var(env(&[("RANK", "0"), ("WORLD_SIZE", "0")])).0,
            "WORLD_SIZE"
        );
        assert_eq!(
            err_var(env(&[("RANK", "1"), ("WORLD_SIZE", "2")])).0,
            "MASTER_ADDR"
        );
        assert_eq!(
            err_var(env(&[
                ("RANK", "1"),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "h")
            ]))
            .0,
            "MASTER_PORT"
        );
        assert_eq!(
            err_var(env(&[
                ("RANK", "1"),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "99999")
            ]))
            .0,
            "MASTER_PORT"
        );
        assert_eq!(
            err_var(env(&[
                ("RANK", "1"),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", "2"),
                ("LOCAL_WORLD_SIZE", "2"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "1")
            ]))
            .0,
            "LOCAL_RANK"
        );
    }

    #[test]
    fn a_world_of_one_needs_no_master() {
        let w = env(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap().unwrap();
        assert!(!w.is_distributed());
        assert_eq!(w.local_rank, 0);
    }
}
