//! The unique-id rendezvous: before an NCCL communicator can form, every rank
//! needs the same 128-byte `ncclUniqueId`, which rank 0 creates. Rank 0 serves it
//! over a small TCP protocol at `MASTER_ADDR:port` (std::net only); the other
//! ranks connect, retrying while rank 0 is not listening yet, and read it.
//!
//! Protocol (version 1, all integers little-endian u32):
//! - rank → rank 0: `"QTRV"`, version, rank, world size (16 bytes);
//! - rank 0 → rank: `"QTRV"`, status 0, the 128-byte id; or `"QTRV"`, status 1,
//!   a message length and the message (UTF-8), when the rank's world size or rank
//!   does not fit this run.
//!
//! A rank asking twice (it reconnected after a timeout) gets the id again; other
//! strangers on the port (a port scanner, a stale worker of another run) are
//! answered or ignored without ending the rendezvous, unless they claim to belong
//! to a run of a different size, which is a misconfiguration and fails it.
//! Every wait is bounded by the caller's timeout and every error names the address.

use crate::env::display_addr;
use crate::error::{DistError, Result};
use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Size of an NCCL unique id.
pub const ID_BYTES: usize = 128;
/// An NCCL unique id as plain bytes.
pub type UniqueId = [u8; ID_BYTES];

const MAGIC: &[u8; 4] = b"QTRV";
const VERSION: u32 = 1;
/// The longest a single connection may stall the server.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn err(addr: &str, msg: impl Into<String>) -> DistError {
    DistError::Rendezvous {
        addr: addr.to_string(),
        msg: msg.into(),
    }
}

/// Rank 0's listening socket.
#[derive(Debug)]
pub struct IdServer {
    listener: TcpListener,
    display: String,
}

impl IdServer {
    /// Listens on `host:port` (port 0 picks a free one, for tests). When `host`
    /// resolves to an address this machine does not own (a name that maps to a
    /// NAT'd address), it listens on all interfaces on that port instead.
    pub fn bind(host: &str, port: u16) -> Result<Self> {
        let display = display_addr(host, port);
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| {
                err(
                    &display,
                    format!("cannot resolve MASTER_ADDR `{host}`: {e}"),
                )
            })?
            .collect();
        let mut last = None;
        for a in &addrs {
            match TcpListener::bind(a) {
                Ok(listener) => return Self::ready(listener, host),
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = &last {
            if e.kind() == ErrorKind::AddrNotAvailable {
                let any: SocketAddr = match addrs.first() {
                    Some(SocketAddr::V6(_)) => (Ipv6Addr::UNSPECIFIED, port).into(),
                    _ => (Ipv4Addr::UNSPECIFIED, port).into(),
                };
                if let Ok(listener) = TcpListener::bind(any) {
                    return Self::ready(listener, host);
                }
            }
        }
        Err(err(
            &display,
            match last {
                Some(e) if e.kind() == ErrorKind::AddrInUse => format!(
                    "rank 0 cannot listen: the port is in use ({e}); another run on this port? \
                     choose another MASTER_PORT"
                ),
                Some(e) => format!("rank 0 cannot listen: {e}"),
                None => format!("MASTER_ADDR `{host}` resolves to no address"),
            },
        ))
    }

    fn ready(listener: TcpListener, host: &str) -> Result<Self> {
        // The port actually bound (port 0 picks one).
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let display = display_addr(host, port);
        listener
            .set_nonblocking(true)
            .map_err(|e| err(&display, format!("setting the listener non-blocking: {e}")))?;
        Ok(Self { listener, display })
    }

    /// The port actually listened on.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Hands `id` to ranks `1..world` and returns once each has it, or fails after
    /// `timeout` naming the ranks that never came.
    pub fn serve(self, id: &UniqueId, world: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut served = BTreeSet::new();
        while served.len() + 1 < world {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    if let Some(rank) = self.answer(stream, peer, id, world)? {
                        served.insert(rank);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> =
                            (1..world).filter(|r| !served.contains(r)).collect();
                        return Err(err(
                            &self.display,
                            format!(
                                "rank 0 waited {timeout:?} for the other ranks; ranks {missing:?} of \
                                 {world} never connected (did they start? do they use the same \
                                 MASTER_ADDR/MASTER_PORT?)"
                            ),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(err(&self.display, format!("accept: {e}"))),
            }
        }
        Ok(())
    }

    /// One connection: `Ok(Some(rank))` once that rank got the id; `Ok(None)` for
    /// a connection that is not a rank of this run; an error for a rank of a run
    /// configured differently.
    fn answer(
        &self,
        mut s: TcpStream,
        peer: SocketAddr,
        id: &UniqueId,
        world: usize,
    ) -> Result<Option<usize>> {
        let setup = s
            .set_nonblocking(false)
            .and_then(|_| s.set_read_timeout(Some(IO_TIMEOUT)))
            .and_then(|_| s.set_write_timeout(Some(IO_TIMEOUT)))
            .and_then(|_| s.set_nodelay(true));
        if setup.is_err() {
            return Ok(None);
        }
        let mut hello = [0u8; 16];
        if s.read_exact(&mut hello).is_err() || &hello[0..4] != MAGIC {
            tracing::warn!(
                "rendezvous {}: ignoring a stranger from {peer}",
                self.display
            );
            return Ok(None);
        }
        let word = |i: usize| u32::from_le_bytes(hello[i..i + 4].try_into().expect("4 bytes"));
        let (version, rank, their_world) = (word(4), word(8) as usize, word(12) as usize);
        let refusal = if version != VERSION {
            Some(format!(
                "protocol version {version} from {peer}, rank 0 speaks {VERSION} (mixed qtrain builds?)"
            ))
        } else if their_world != world {
            Some(format!(
                "rank {rank} at {peer} says WORLD_SIZE={their_world}, rank 0 has WORLD_SIZE={world}"
            ))
        } else if rank == 0 || rank >= world {
            Some(format!(
                "a process at {peer} claims RANK={rank}, which does not fit WORLD_SIZE={world}"
            ))
        } else {
            None
        };
        match refusal {
            None => {
                let mut reply = Vec::with_capacity(8 + ID_BYTES);
                reply.extend_from_slice(MAGIC);
                reply.extend_from_slice(&0u32.to_le_bytes());
                reply.extend_from_slice(id);
                // A rank that misses the reply reconnects and asks again.
                Ok(s.write_all(&reply)
                    .and_then(|_| s.flush())
                    .ok()
                    .map(|_| rank))
            }
            Some(msg) => {
                let mut reply = Vec::new();
                reply.extend_from_slice(MAGIC);
                reply.extend_from_slice(&1u32.to_le_bytes());
                reply.extend_from_slice(&(msg.len() as u32).to_le_bytes());
                reply.extend_from_slice(msg.as_bytes());
                let _ = s.write_all(&reply);
                Err(err(&self.display, msg))
            }
        }
    }
}

/// A rank other than 0: connects to rank 0 at `host:port` (retrying until
/// `timeout` while nobody listens) and returns the id it serves.
pub fn fetch_id(
    host: &str,
    port: u16,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<UniqueId> {
    let display = display_addr(host, port);
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(20);
    let mut last_error: String;
    loop {
        match try_fetch(host, port, rank, world, deadline) {
            Ok(id) => return Ok(id),
            Err(Attempt::Fatal(msg)) => return Err(err(&display, msg)),
            Err(Attempt::Retry(msg)) => last_error = msg,
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(err(
                &display,
                format!(
                    "rank {rank} could not get the NCCL id from rank 0 within {timeout:?} \
                     (last error: {last_error}); is rank 0 running, and are MASTER_ADDR/MASTER_PORT \
                     the same on every rank?"
                ),
            ));
        }
        std::thread::sleep(backoff.min(deadline - now));
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

enum Attempt {
    /// Nobody listening yet, a dropped connection: try again.
    Retry(String),
    /// Rank 0 answered and refused, or spoke another protocol.
    Fatal(String),
}

fn try_fetch(
    host: &str,
    port: u16,
    rank: usize,
    world: usize,
    deadline: Instant,
) -> std::result::Result<UniqueId, Attempt> {
    let retry = |e: std::io::Error| Attempt::Retry(e.to_string());
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| Attempt::Retry(format!("resolving `{host}`: {e}")))?
        .collect();
    let mut last = Attempt::Retry(format!("`{host}` resolves to no address"));
    for a in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        let stream =
            TcpStream::connect_timeout(&a, left.clamp(Duration::from_millis(1), IO_TIMEOUT));
        let mut s = match stream {
            Ok(s) => s,
            Err(e) => {
                last = retry(e);
                continue;
            }
        };
        s.set_read_timeout(Some(IO_TIMEOUT)).map_err(retry)?;
        s.set_write_timeout(Some(IO_TIMEOUT)).map_err(retry)?;
        let mut hello = Vec::with_capacity(16);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&VERSION.to_le_bytes());
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(world as u32).to_le_bytes());
        s.write_all(&hello).map_err(retry)?;
        let mut head = [0u8; 8];
        s.read_exact(&mut head).map_err(retry)?;
        if &head[0..4] != MAGIC {
            return Err(Attempt::Fatal(
                "the process listening there is not a qtrain rank 0 (wrong MASTER_PORT?)".into(),
            ));
        }
        let status = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
        if status == 0 {
            let mut id = [0u8; ID_BYTES];
            s.read_exact(&mut id).map_err(retry)?;
            return Ok(id);
        }
        let mut len = [0u8; 4];
        s.read_exact(&mut len).map_err(retry)?;
        let mut msg = vec![0u8; u32::from_le_bytes(len).min(64 * 1024) as usize];
        s.read_exact(&mut msg).map_err(retry)?;
        return Err(Attempt::Fatal(format!(
            "rank 0 refused rank {rank}: {}",
            String::from_utf8_lossy(&msg)
        )));
    }
    Err(last)
}

/// The whole exchange for one rank: rank 0 listens, creates the id with `make_id`
/// and serves it; the others fetch it. A world of one only calls `make_id`.
pub fn exchange_id(
    host: &str,
    port: u16,
    rank: usize,
    world: usize,
    timeout: Duration,
    make_id: impl FnOnce() -> Result<UniqueId>,
) -> Result<UniqueId> {
    if world <= 1 {
        return make_id();
    }
    if rank == 0 {
        let server = IdServer::bind(host, port)?;
        let id = make_id()?;
        server.serve(&id, world, timeout)?;
        Ok(id)
    } else {
        fetch_id(host, port, rank, world, timeout)
    }
}
