//! The server loop against a scripted transport, and its stop check.

use super::*;
use crate::sync::SyncMode;
use hetsync_transport::any::Choice;
use hetsync_transport::{Key, TransportError, Version};
use std::collections::VecDeque;
use std::sync::mpsc;

/// A transport that plays scripted events, whose sends never finish (so both model versions
/// end up being read), and whose `release` drops a worker the way RDMA drops a stuck peer.
#[derive(Debug)]
struct Scripted {
    script: VecDeque<Vec<Event>>,
    sends: Vec<(Rank, Key, Version)>,
    victim: Rank,
}

impl Transport for Scripted {
    fn poll(
        &mut self,
        arena: &mut Arena,
        events: &mut Vec<Event>,
        _: Option<Instant>,
    ) -> Result<(), TransportError> {
        for ev in self.script.pop_front().unwrap_or_default() {
            if let Event::Pushed { rank, key, clock } = ev {
                arena.receive_into(rank, key).unwrap().fill(0);
                arena.hand_over(rank, key, clock).unwrap();
            }
            events.push(ev);
        }
        Ok(())
    }
    fn send_model(&mut self, arena: &mut Arena, rank: Rank, key: Key) {
        let (v, _) = arena.start_send(key);
        self.sends.push((rank, key, v));
    }
    fn release(&mut self, arena: &mut Arena, key: Key, version: Version) {
        // The victim's write never completes: it is dropped, its slots lent again, and its
        // sends (and, for this test, everyone's) stop reading.
        arena.reset_worker(self.victim);
        for &(_, k, v) in &self.sends {
            if (k, v) == (key, version) {
                arena.end_send(k, v);
            }
        }
        self.sends.retain(|&(_, k, v)| (k, v) != (key, version));
    }
    fn disconnect(&mut self, _: &mut Arena, _: Rank, why: &str) {
        panic!("nobody should be dropped by the server here: {why}");
    }
    fn shutdown(&mut self, _: &mut Arena, _: Duration) {}
    fn answer_status(&mut self, _: &mut Arena, _: u64, _: &[u8]) {}
    fn peer(&self, _: Rank) -> Option<hetsync_transport::PeerInfo> {
        None
    }
}

#[test]
fn a_participant_dropped_while_a_version_is_released_is_left_out_not_a_crash() {
    let cfg = ServerConfig {
        mode: SyncMode::NAIVE,
        rounds: Some(2),
        ..ServerConfig::new("127.0.0.1:0".parse().unwrap(), 2, vec![4])
    };
    let arena = Arena::new(2, parts_of(&cfg).unwrap()).unwrap();
    let push = |rank, clock| Event::Pushed {
        rank,
        key: 0,
        clock,
    };
    let script = VecDeque::from(vec![
        vec![Event::Joined { rank: 0 }, Event::Joined { rank: 1 }],
        vec![push(0, 0), push(1, 0)],
        // Round 1 finds both versions being read: releasing one drops worker 1.
        vec![push(0, 1), push(1, 1)],
    ]);
    let transport = Scripted {
        script,
        sends: Vec::new(),
        victim: 1,
    };
    let server = Server::new(transport, arena, cfg).unwrap();
    let report = server.run(&AtomicBool::new(false)).unwrap();
    assert_eq!(report.stats.rounds, 2);
    assert_eq!(
        report.stats.participants,
        2 + 1,
        "round 1 went on without worker 1"
    );
}

#[test]
fn stop_is_seen_even_before_any_worker_joins() {
    let (server, _) = Server::bind(ServerConfig {
        mode: SyncMode::NAIVE,
        transport: Choice::Tcp,
        ..ServerConfig::new("127.0.0.1:0".parse().unwrap(), 2, vec![8, 3])
    })
    .unwrap();
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| tx.send(server.run(&stop)).unwrap());
        std::thread::sleep(Duration::from_millis(150));
        stop.store(true, Ordering::Relaxed);
        // A bound that only catches a hang: the loop wakes at least every 100 ms.
        let report = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server ignored stop");
        let report = report.unwrap();
        assert!(!report.started);
        assert_eq!(report.stats.rounds, 0);
    });
}

/// Sets the flag when dropped: a test that panics still stops its server (else the scope that
/// joins the server's thread would wait forever).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs a TCP server for `cfg` on a thread while `f` talks to it at the address given; stops
/// it afterwards (also when `f` panics) and checks that it ended without an error.
fn with_server(cfg: ServerConfig, f: impl FnOnce(&str)) {
    let (server, _) = Server::bind(ServerConfig {
        transport: Choice::Tcp,
        ..cfg
    })
    .unwrap();
    let addr = server.local_addr().to_string();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let run = s.spawn(|| server.run(&stop));
        {
            let _stop = StopOnDrop(&stop);
            f(&addr);
        }
        run.join().unwrap().unwrap();
    });
}

fn connect(addr: &str, rank: Rank, dims: &[usize]) -> crate::client::Client {
    let mut opts = crate::client::ConnectOptions::new(addr, rank, dims.to_vec());
    opts.transport = Choice::Tcp;
    crate::client::Client::connect(&opts).unwrap()
}

#[test]
fn workers_start_from_the_initial_model_given_and_a_wrong_size_is_refused() {
    let dims = vec![3, 700_000]; // the second tensor in parts (1 MiB each)
    let init: Vec<f32> = (0..dims.iter().sum::<usize>()).map(|i| i as f32).collect();
    let cfg = |init: Vec<f32>| ServerConfig {
        mode: SyncMode::NAIVE,
        rounds: Some(1),
        transport: Choice::Tcp,
        init_model: Some(init),
        ..ServerConfig::new("127.0.0.1:0".parse().unwrap(), 1, dims.clone())
    };
    let err = Server::bind(cfg(vec![0.0; 10])).unwrap_err();
    assert!(
        err.to_string().contains("the initial model has 10 floats"),
        "{err}"
    );
    with_server(cfg(init.clone()), |addr| {
        let mut c = connect(addr, 0, &dims);
        c.wait_all().unwrap();
        assert_eq!(c.model(0), &init[..3]);
        assert_eq!(c.model(1), &init[3..]);
        c.bye().unwrap();
    });
}

#[test]
fn a_bounded_wait_returns_empty_handed_and_a_later_one_gets_the_model() {
    let cfg = ServerConfig {
        mode: SyncMode::NAIVE,
        ..ServerConfig::new("127.0.0.1:0".parse().unwrap(), 2, vec![4])
    };
    with_server(cfg, |addr| {
        let mut first = connect(addr, 0, &[4]);
        // The first model comes once both workers joined: not yet.
        let t = Instant::now();
        let got = first.wait_for(Some(0), Duration::from_millis(50)).unwrap();
        assert_eq!(got, None);
        assert!(
            t.elapsed() >= Duration::from_millis(45),
            "{:?}",
            t.elapsed()
        );
        assert!(first.awaiting(0));
        let mut second = connect(addr, 1, &[4]);
        let got = first.wait_for(None, Duration::from_secs(20)).unwrap();
        assert_eq!(got, Some(crate::client::Status::Ready));
        assert!(!first.awaiting(0));
        second.wait_all().unwrap();
        first.bye().unwrap();
        second.bye().unwrap();
    });
}

#[test]
fn a_part_that_closed_the_last_round_answers_pushes_without_closing_more() {
    // Two single-part tensors under the timeout barrier: worker 0 runs tensor 0 on its own
    // (each round closes by timeout without worker 1) while tensor 1 never moves, so the run
    // cannot end and tensor 0 is pushed past the run's last round.
    let cfg = ServerConfig {
        mode: SyncMode::named("timeout", Duration::from_millis(1), 0).unwrap(),
        rounds: Some(3),
        ..ServerConfig::new("127.0.0.1:0".parse().unwrap(), 2, vec![8, 8])
    };
    with_server(cfg, |addr| {
        let mut a = connect(addr, 0, &[8, 8]);
        let _b = connect(addr, 1, &[8, 8]);
        a.wait_all().unwrap();
        for _ in 0..8 {
            a.tensor(0).1.fill(1.0);
            a.push(0).unwrap();
            a.wait(0).unwrap();
        }
        assert_eq!(a.round(0), 3, "tensor 0 must stop at the run's last round");
        assert_eq!(a.round(1), 0);
        // Its model is that of round 3: three steps of the one gradient 1.0 at rate 0.1.
        assert!(
            a.model(0).iter().all(|&m| (m + 0.3).abs() < 1e-6),
            "{:?}",
            a.model(0)
        );
    });
}
