//! The orderly end: goodbye to every worker, then linger until each has closed its end.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use super::ServerEnd;
use crate::protocol::FrameKind;
use crate::Arena;

impl ServerEnd {
    /// Says goodbye to every worker and lingers until each has closed its end (so a worker in
    /// the middle of a push sees the goodbye, not EPIPE), at most `grace`.
    pub fn shutdown(&mut self, arena: &mut Arena, grace: Duration) {
        for idx in 0..self.peers.len() {
            match self.peers[idx].as_mut() {
                Some(p) if p.rank.is_some() => {
                    p.out.push_control(FrameKind::Bye, &[]);
                    self.flush(arena, idx);
                }
                Some(_) => self.close(arena, idx, None),
                None => {}
            }
        }
        let deadline = Instant::now() + grace;
        let mut scratch = vec![0u8; 256 * 1024];
        loop {
            for idx in 0..self.peers.len() {
                if self.peers[idx].is_none() {
                    continue;
                }
                self.flush(arena, idx);
                let Some(p) = self.peers[idx].as_mut() else {
                    continue;
                };
                let mut gone = false;
                while !gone {
                    match p.stream.read(&mut scratch) {
                        Ok(0) => gone = true,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => gone = true,
                    }
                }
                if gone {
                    self.close(arena, idx, None);
                }
            }
            if self.peers.iter().all(Option::is_none) || Instant::now() >= deadline {
                break;
            }
            // Level-triggered: any peer with data or a pending write wakes us up.
            self.reactor.wait_briefly(50);
        }
        for idx in 0..self.peers.len() {
            self.close(arena, idx, None);
        }
        self.pending.clear();
    }
}
