//! From a hello to a joined worker: with a shared secret, the challenge and the check of the
//! worker's proof come first (see [`crate::auth`]); then the hello is admitted (its rank, job
//! size and tensors), the rank is taken and the welcome goes out. Nothing is allocated for a
//! peer, and nothing about the job is told, before it has proven itself.

use super::ServerEnd;
use crate::auth::{nonce, Nonce};
use crate::channel::handshake;
use crate::protocol::{FrameKind, Hello, Welcome, CHALLENGE_LEN};
use crate::{Arena, Event};

/// A hello (or a status request) waiting for the answer to the server's challenge.
#[derive(Debug)]
pub(super) struct Challenged {
    /// The hello; `None` for a status request.
    hello: Option<Hello>,
    theirs: Nonce,
    ours: Nonce,
}

/// What a status request's proofs are bound to, in place of a hello.
pub const STATUS: &[u8] = b"status";

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
        let bound = hello.encode();
        self.challenge(arena, idx, Some(hello), theirs, &bound, &secret);
    }

    /// A status request: answered once it is authenticated (when the job has a secret).
    pub(super) fn on_status(&mut self, arena: &mut Arena, idx: usize, theirs: Option<Nonce>) {
        match (self.secret.clone(), theirs) {
            (None, _) => self.status_requested(idx),
            (Some(secret), Some(theirs)) => {
                self.challenge(arena, idx, None, theirs, STATUS, &secret)
            }
            (Some(_), None) => self.refuse(
                arena,
                idx,
                "this server tells its status only to those who know the job's secret: pass --secret-file FILE (or HETSYNC_SECRET_FILE)",
            ),
        }
    }

    fn status_requested(&mut self, idx: usize) {
        let p = self.peers[idx].as_ref().expect("live peer");
        self.pending
            .push(Event::StatusRequested { request: p.token });
    }

    /// Sends the challenge: our nonce and our proof over both nonces and `bound`.
    fn challenge(
        &mut self,
        arena: &mut Arena,
        idx: usize,
        hello: Option<Hello>,
        theirs: Nonce,
        bound: &[u8],
        secret: &crate::auth::Secret,
    ) {
        let ours = match nonce() {
            Ok(n) => n,
            Err(e) => return self.refuse(arena, idx, &format!("server error: {e}")),
        };
        let proof = secret.server_proof(&theirs, &ours, bound);
        let mut payload = Vec::with_capacity(CHALLENGE_LEN);
        payload.extend_from_slice(&ours);
        payload.extend_from_slice(&proof);
        let p = self.peers[idx].as_mut().expect("live peer");
        p.conn.set_awaiting_auth();
        p.challenged = Some(Box::new(Challenged {
            hello,
            theirs,
            ours,
        }));
        p.out.push_control(FrameKind::Challenge, &payload);
        self.flush(arena, idx);
    }

    /// The worker answered the challenge: admit its hello if the proof holds.
    pub(super) fn on_auth(&mut self, arena: &mut Arena, idx: usize, proof: &[u8]) {
        let p = self.peers[idx].as_mut().expect("live peer");
        let Some(c) = p.challenged.take() else {
            // The connection admits one answer per challenge; keep the server alive regardless.
            return self.refuse(arena, idx, "a second answer to one challenge");
        };
        let secret = self.secret.as_ref().expect("challenges only with a secret");
        let bound = c.hello.as_ref().map_or(STATUS.to_vec(), Hello::encode);
        if !secret.verify_worker(&c.ours, &c.theirs, &bound, proof) {
            let why = "authentication failed: this worker does not know the job's secret (check that server and worker use the same --secret-file)";
            return self.refuse(arena, idx, why);
        }
        match c.hello {
            Some(hello) => self.join(arena, idx, hello),
            None => self.status_requested(idx),
        }
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
        p.rdma_data = hello.rdma;
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
