//! The unique-id rendezvous over loopback TCP: the id arrives intact, ranks that
//! start before rank 0 retry, and every failure is bounded and names the address.

use qtrain_dist::rendezvous::{exchange_id, fetch_id, IdServer, UniqueId, ID_BYTES};
use qtrain_dist::DistError;
use std::time::{Duration, Instant};

fn test_id(seed: u8) -> UniqueId {
    let mut id = [0u8; ID_BYTES];
    for (i, b) in id.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(seed);
    }
    id
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn two_threads_exchange_a_128_byte_id() {
    let server = IdServer::bind("127.0.0.1", 0).unwrap();
    let port = server.port();
    let id = test_id(5);
    let t = std::thread::spawn(move || server.serve(&id, 2, Duration::from_secs(20)));
    let got = fetch_id("127.0.0.1", port, 1, 2, Duration::from_secs(20)).unwrap();
    assert_eq!(got, id);
    t.join().unwrap().unwrap();
}

#[test]
fn ranks_that_start_first_retry_until_rank_0_listens() {
    let port = free_port();
    let world = 4;
    let id = test_id(9);
    let clients: Vec<_> = (1..world)
        .map(|r| {
            std::thread::spawn(move || {
                exchange_id("localhost", port, r, world, Duration::from_secs(20), || {
                    panic!("only rank 0 makes the id")
                })
            })
        })
        .collect();
    // Rank 0 is late (loading its model).
    std::thread::sleep(Duration::from_millis(300));
    let mine = exchange_id("127.0.0.1", port, 0, world, Duration::from_secs(20), || {
        Ok(id)
    })
    .unwrap();
    assert_eq!(mine, id);
    for c in clients {
        assert_eq!(c.join().unwrap().unwrap(), id);
    }
}

#[test]
fn a_world_of_one_needs_no_network() {
    let id = exchange_id(
        "no.such.host.invalid",
        1,
        0,
        1,
        Duration::from_millis(1),
        || Ok(test_id(1)),
    )
    .unwrap();
    assert_eq!(id, test_id(1));
}

#[test]
fn a_rank_of_a_differently_sized_run_fails_both_sides() {
    let server = IdServer::bind("127.0.0.1", 0).unwrap();
    let port = server.port();
    let t = std::thread::spawn(move || server.serve(&test_id(2), 2, Duration::from_secs(20)));
    let e = fetch_id("127.0.0.1", port, 1, 3, Duration::from_secs(20)).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("127.0.0.1:{port}"))
            && msg.contains("WORLD_SIZE=3")
            && msg.contains("refused"),
        "{msg}"
    );
    let server_err = t.join().unwrap().unwrap_err().to_string();
    assert!(server_err.contains("WORLD_SIZE=2"), "{server_err}");
}

#[test]
fn rank_0_gives_up_naming_the_missing_ranks() {
    let t = Instant::now();
    let server = IdServer::bind("127.0.0.1", 0).unwrap();
    let port = server.port();
    // Rank 2 comes, rank 1 never does.
    let c = std::thread::spawn(move || fetch_id("127.0.0.1", port, 2, 3, Duration::from_secs(20)));
    let e = server
        .serve(&test_id(3), 3, Duration::from_millis(600))
        .unwrap_err();
    match &e {
        DistError::Rendezvous { addr, msg } => {
            assert_eq!(addr, &format!("127.0.0.1:{port}"));
            assert!(msg.contains("ranks [1] of 3 never connected"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.join().unwrap().unwrap(), test_id(3));
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_rank_gives_up_when_nobody_listens() {
    let port = free_port();
    let t = Instant::now();
    let e = fetch_id("127.0.0.1", port, 1, 2, Duration::from_millis(400)).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("could not get the NCCL id"),
        "{msg}"
    );
    assert!(t.elapsed() >= Duration::from_millis(400) && t.elapsed() < Duration::from_secs(10));
}

#[test]
fn strangers_on_the_port_do_not_end_the_rendezvous() {
    use std::io::Write;
    let server = IdServer::bind("127.0.0.1", 0).unwrap();
    let port = server.port();
    let t = std::thread::spawn(move || server.serve(&test_id(4), 2, Duration::from_secs(20)));
    // A port scanner: connects, sends garbage, leaves.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    drop(s);
    assert_eq!(
        fetch_id("127.0.0.1", port, 1, 2, Duration::from_secs(20)).unwrap(),
        test_id(4)
    );
    t.join().unwrap().unwrap();
}

#[test]
fn a_busy_port_is_reported_with_its_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let e = IdServer::bind("127.0.0.1", port).unwrap_err().to_string();
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("in use"),
        "{e}"
    );
}
