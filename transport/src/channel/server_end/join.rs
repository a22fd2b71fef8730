//! From a hello to a joined worker: with a shared secret, the challenge and the check of the
//! worker's proof come first (see [`crate::auth`]); then the hello is admitted (its rank, job
//! size and tensors), the rank is taken and the welcome goes out. Nothing is allocated for a
//! peer, and nothing about the job is told, before it has proven itself.

use super::ServerEnd;
use crate::auth::{nonce, Nonce};
use crate::channel::handshake;
use crate::protocol::{FrameKind, Hello, Welcome, CHALLENGE_LEN};
use crate::{Arena, Event};

/// A hello waiting for the answer to the server's challenge.
#[derive(Debug)]
pub(super) struct Challenged {
    hello: Hello,
    ours: Nonce,
}

impl ServerEnd {
    /// A hello arrived: challenge it when the job has a secret, else admit it.
    pub(super) fn on_hello(&mut self, arena: &mut Arena, idx: usize, hello: Hello) {
        let Some(secret) = self.secret.clone() else {
            if hello.auth_nonce.is_some() {
                let why = "this server does not authenticate workers (it was started without --secret-file) but this worker insists: give the server the job's --secret-file too";
                return self.refuse(arena, idx, why);
            }
            return self.join(arena, idx, hello);
        };
        let Some(theirs) = hello.auth_nonce else {
            let why = "this server admits only workers that know the job's secret: start the worker with --secret-file FILE (or HETSYNC_SECRET_FILE)";
            return self.refuse(arena, idx, why);
        };
        let ours = match nonce() {
            Ok(n) => n,
            Err(e) => return self.refuse(arena, idx, &format!("server error: {e}")),
        };
        let proof = secret.server_proof(&theirs, &ours, &hello.encode());
        let mut payload = Vec::with_capacity(CHALLENGE_LEN);
        payload.extend_from_slice(&ours);
        payload.extend_from_slice(&proof);
        let p = self.peers[idx].as_mut().expect("live peer");
        p.conn.set_awaiting_auth();
        p.challenged = Some(Box::new(Challenged { hello, ours }));
        p.out.push_control(FrameKind::Challenge, &payload);
        self.flush(arena, idx);
    }

    /// The worker answered the challenge: admit its hello if the proof holds.
    pub(super) fn on_auth(&mut self, arena: &mut Arena, idx: usize, proof: &[u8]) {
        let p = self.peers[idx].as_mut().expect("live peer");
        let c = p
            .challenged
            .take()
            .expect("auth frames only after a challenge");
        let secret = self.secret.as_ref().expect("challenges only with a secret");
        let theirs = c.hello.auth_nonce.expect("challenged hellos carry a nonce");
        if !secret.verify_worker(&c.ours, &theirs, &c.hello.encode(), proof) {
            let why = "authentication failed: this worker does not know the job's secret (check that server and worker use the same --secret-file)";
            return self.refuse(arena, idx, why);
        }
        self.join(arena, idx, c.hello);
    }

    /// Admits `hello` (rank, job, tensors) and welcomes the worker, or refuses it saying why.
    fn join(&mut self, arena: &mut Arena, idx: usize, hello: Hello) {
        let held = self.index(hello.rank).is_some();
        if let Err(why) = handshake::admit(&hello, self.workers, arena.parts().dims(), held) {
            return self.refuse(arena, idx, &why);
        }
        let p = self.peers[idx].as_mut().expect("live peer");
        p.rank = Some(hello.rank);
        p.conn.set_joined();
        p.join_pending = hello.rdma;
        self.by_rank[hello.rank as usize] = Some(idx);
        let welcome = Welcome {
            part_bytes: arena.parts().part_bytes() as u64,
            push_clock: self.push_clock,
        };
        p.out.push_control(FrameKind::Welcome, &welcome.encode());
        self.flush(arena, idx);
        // A peer the welcome could not be written to is gone already (and reported).
        if !hello.rdma && self.peers[idx].is_some() {
            self.admission.remove(idx);
            self.pending.push(Event::Joined { rank: hello.rank });
        }
    }
}
