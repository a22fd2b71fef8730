//! The server's view of one connection, without a socket: bytes in, frames out.
//!
//! The caller asks [`Connection::target`] where the next bytes go (the header buffer, a control
//! payload, or a range of the worker's slot for a push), reads into it however it likes, and
//! reports how many bytes arrived with [`Connection::advance`], which answers with a complete
//! [`Frame`] when there is one. Every length is checked against the job before anything is
//! allocated, and every frame against the point of the conversation, so the same code is
//! unit-tested on every split of every frame with no socket.

use std::ops::Range;

use crate::protocol::{self, FrameKind, Header, Hello, Parts, ProtocolError, HEADER_LEN};
use crate::{Clock, Key};

/// A complete frame from a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The handshake.
    Hello(Hello),
    /// A push whose payload is now in the worker's slot of part `key`.
    Push {
        /// The part.
        key: Key,
        /// The round of the model the gradient was computed on.
        clock: Clock,
    },
    /// An orderly goodbye.
    Bye,
    /// The peer reports an error and leaves.
    Error(String),
    /// An RDMA offer (its payload, decoded by the RDMA transport).
    RdmaConnect(Vec<u8>),
    /// The worker's answer to the server's challenge: its proof of knowing the secret.
    Auth([u8; protocol::PROOF_LEN]),
    /// A status request, with the client's authentication nonce if it has a secret.
    Status(Option<[u8; protocol::NONCE_LEN]>),
}

/// Where the next bytes of a connection go.
#[derive(Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// Into this buffer, owned by the connection.
    Buf(&'a mut [u8]),
    /// Into the worker's slot of part `key`, at these bytes of it.
    Slot {
        /// The part.
        key: Key,
        /// The bytes of the slot still to fill.
        range: Range<usize>,
    },
}

/// The framing state of one connection.
#[derive(Debug, Default)]
pub struct Connection {
    hdr: [u8; HEADER_LEN],
    /// Bytes of the header, or of the payload of `frame`, received so far.
    got: usize,
    /// The frame whose payload is being received.
    frame: Option<Header>,
    /// The payload of a control frame.
    ctrl: Vec<u8>,
    /// The hello arrived (a second one is a violation).
    hello_seen: bool,
    /// A challenge went out: the worker's proof is the only acceptable frame.
    awaiting_auth: bool,
    joined: bool,
}

impl Connection {
    /// A fresh connection, expecting a hello.
    pub fn new() -> Self {
        Self::default()
    }

    /// The handshake was accepted: tensor frames are acceptable from now on.
    pub fn set_joined(&mut self) {
        self.awaiting_auth = false;
        self.joined = true;
    }

    /// A challenge went out: only the worker's proof may come next.
    pub fn set_awaiting_auth(&mut self) {
        self.awaiting_auth = true;
    }

    /// Where the next bytes go. Never empty.
    pub fn target(&mut self) -> Target<'_> {
        match self.frame {
            None => Target::Buf(&mut self.hdr[self.got..]),
            Some(h) if h.kind == FrameKind::Push => Target::Slot {
                key: h.key,
                range: self.got..h.len as usize,
            },
            Some(_) => Target::Buf(&mut self.ctrl[self.got..]),
        }
    }

    /// `n` bytes arrived in [`target`](Self::target) (`n` > 0 and at most its length). Returns
    /// the frame they completed, if any. An error means the peer must be dropped.
    pub fn advance(&mut self, n: usize, parts: &Parts) -> Result<Option<Frame>, ProtocolError> {
        self.got += n;
        let Some(h) = self.frame else {
            if self.got < HEADER_LEN {
                return Ok(None);
            }
            self.got = 0;
            let h = Header::decode(&self.hdr)?;
            protocol::check_len(&h, self.joined.then_some(parts))?;
            // A hello is bounded by this job, not only by the protocol's largest: it lists this
            // job's tensors (with some room, so a worker with a different count hears which).
            let hello_max = (16 + 8 * (parts.dims().len() + 64) + protocol::NONCE_LEN) as u64;
            if h.kind == FrameKind::Hello && h.len > hello_max {
                return Err(ProtocolError::TooLong {
                    kind: h.kind,
                    len: h.len,
                    max: hello_max,
                });
            }
            let when = match (self.joined, h.kind) {
                (_, FrameKind::Welcome | FrameKind::Model | FrameKind::Challenge) => {
                    Some("from a worker")
                }
                (false, FrameKind::Hello | FrameKind::Status) if self.hello_seen => Some("twice"),
                (false, FrameKind::Status) if h.len != 0 && h.len != protocol::NONCE_LEN as u64 => {
                    Some("with a payload that is neither empty nor a nonce")
                }
                (false, FrameKind::Status) => None,
                (false, FrameKind::Hello) => None,
                (false, FrameKind::Auth) if self.awaiting_auth => None,
                (false, FrameKind::Auth) => Some("without a challenge"),
                (false, FrameKind::Error) if self.awaiting_auth => None,
                (false, _) if self.awaiting_auth => Some("instead of the answer to the challenge"),
                (false, _) => Some("before the handshake"),
                (true, FrameKind::Hello) => Some("after the handshake"),
                (true, FrameKind::Auth | FrameKind::Status) => Some("after the handshake"),
                (true, _) => None,
            };
            if let Some(when) = when {
                return Err(ProtocolError::Unexpected { kind: h.kind, when });
            }
            if h.kind != FrameKind::Push {
                // Bounded by check_len above: at most a hello's maximum.
                self.ctrl.clear();
                self.ctrl.resize(h.len as usize, 0);
            }
            if h.len > 0 {
                self.frame = Some(h);
                return Ok(None);
            }
            return self.complete(h).map(Some);
        };
        if (self.got as u64) < h.len {
            return Ok(None);
        }
        self.got = 0;
        self.frame = None;
        self.complete(h).map(Some)
    }

    fn complete(&mut self, h: Header) -> Result<Frame, ProtocolError> {
        Ok(match h.kind {
            FrameKind::Hello => {
                self.hello_seen = true;
                Frame::Hello(Hello::decode(&std::mem::take(&mut self.ctrl))?)
            }
            FrameKind::Auth => {
                // One answer per challenge: another Auth is now a violation.
                self.awaiting_auth = false;
                Frame::Auth(self.ctrl[..].try_into().expect("length checked"))
            }
            FrameKind::Status => {
                self.hello_seen = true;
                Frame::Status(self.ctrl[..].try_into().ok())
            }
            FrameKind::Push => Frame::Push {
                key: h.key,
                clock: h.clock,
            },
            FrameKind::Bye => Frame::Bye,
            FrameKind::Error => Frame::Error(String::from_utf8_lossy(&self.ctrl).into_owned()),
            FrameKind::RdmaConnect => Frame::RdmaConnect(std::mem::take(&mut self.ctrl)),
            FrameKind::Welcome | FrameKind::Model | FrameKind::Challenge => {
                unreachable!("refused at the header")
            }
        })
    }

    /// Where the peer is when its connection ends: for the message that says so.
    pub fn at_eof(&self) -> &'static str {
        match (self.frame, self.got) {
            (None, 0) => "without saying goodbye",
            (None, _) => "in the middle of a frame header",
            (Some(_), _) => "in the middle of a frame payload",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{control_frame, Welcome};

    fn parts() -> Parts {
        Parts::new(&[300, 1], 1024).unwrap()
    }

    fn hello() -> Hello {
        Hello {
            rank: 1,
            workers: 2,
            dims: vec![300, 1],
            rdma: false,
            auth_nonce: None,
        }
    }

    /// Feeds `bytes` to `c` in pieces of the given sizes; slot bytes go to `slots[key]`.
    fn feed(
        c: &mut Connection,
        bytes: &[u8],
        cuts: &[usize],
        slots: &mut [Vec<u8>],
    ) -> Result<Vec<Frame>, ProtocolError> {
        let p = parts();
        let mut frames = Vec::new();
        let mut at = 0;
        let mut pieces = cuts.to_vec();
        pieces.push(bytes.len());
        for end in pieces {
            while at < end {
                let n = match c.target() {
                    Target::Buf(b) => {
                        let n = b.len().min(end - at);
                        b[..n].copy_from_slice(&bytes[at..at + n]);
                        n
                    }
                    Target::Slot { key, range } => {
                        let n = range.len().min(end - at);
                        let slot = &mut slots[key as usize];
                        slot[range.start..range.start + n].copy_from_slice(&bytes[at..at + n]);
                        n
                    }
                };
                assert!(n > 0, "an empty target");
                at += n;
                frames.extend(c.advance(n, &p)?);
            }
        }
        Ok(frames)
    }

    fn slots() -> Vec<Vec<u8>> {
        parts().iter().map(|p| vec![0; p.bytes()]).collect()
    }

    fn push(key: Key, clock: Clock, fill: u8, len: usize) -> Vec<u8> {
        control_frame(FrameKind::Push, key, clock, &vec![fill; len])
    }

    #[test]
    fn the_answer_to_a_challenge_is_the_only_frame_between_hello_and_join() {
        let hs = control_frame(FrameKind::Hello, 0, 0, &hello().encode());
        let auth = control_frame(FrameKind::Auth, 0, 0, &[9; protocol::PROOF_LEN]);
        let mut c = Connection::new();
        let err = feed(&mut c, &auth, &[], &mut slots()).unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::Unexpected {
                    when: "without a challenge",
                    ..
                }
            ),
            "{err:?}"
        );
        let mut c = Connection::new();
        assert_eq!(feed(&mut c, &hs, &[], &mut slots()).unwrap().len(), 1);
        let again = feed(&mut c, &hs, &[], &mut slots()).unwrap_err();
        assert!(matches!(
            again,
            ProtocolError::Unexpected { when: "twice", .. }
        ));
        let mut c = Connection::new();
        feed(&mut c, &hs, &[], &mut slots()).unwrap();
        c.set_awaiting_auth();
        let early = feed(&mut c, &push(0, 0, 1, 1024), &[], &mut slots()).unwrap_err();
        // A push is refused by its length check already: no tensor frame before joining.
        assert!(
            matches!(early, ProtocolError::Unexpected { .. }),
            "{early:?}"
        );
        let mut c = Connection::new();
        feed(&mut c, &hs, &[], &mut slots()).unwrap();
        c.set_awaiting_auth();
        let bye = control_frame(FrameKind::Bye, 0, 0, &[]);
        let instead = feed(&mut c, &bye, &[], &mut slots()).unwrap_err();
        assert!(
            matches!(
                instead,
                ProtocolError::Unexpected {
                    when: "instead of the answer to the challenge",
                    ..
                }
            ),
            "{instead:?}"
        );
        let mut c = Connection::new();
        feed(&mut c, &hs, &[], &mut slots()).unwrap();
        c.set_awaiting_auth();
        for cut in 1..auth.len() {
            let mut d = Connection::new();
            feed(&mut d, &hs, &[], &mut slots()).unwrap();
            d.set_awaiting_auth();
            assert_eq!(
                feed(&mut d, &auth, &[cut], &mut slots()).unwrap(),
                vec![Frame::Auth([9; protocol::PROOF_LEN])]
            );
        }
        // One answer per challenge.
        let mut d = Connection::new();
        feed(&mut d, &hs, &[], &mut slots()).unwrap();
        d.set_awaiting_auth();
        let twice = [auth.clone(), auth.clone()].concat();
        let again = feed(&mut d, &twice, &[], &mut slots()).unwrap_err();
        assert!(matches!(
            again,
            ProtocolError::Unexpected {
                when: "without a challenge",
                ..
            }
        ));
        let wrong = control_frame(FrameKind::Auth, 0, 0, &[9; 31]);
        assert!(
            feed(&mut c, &wrong, &[], &mut slots()).is_err(),
            "a proof of the wrong size"
        );
    }

    #[test]
    fn a_hello_is_bounded_by_the_job_before_its_payload_is_allocated() {
        let mut c = Connection::new();
        let big = Header::new(FrameKind::Hello, 0, 0, 100_000).encode();
        let e = feed(&mut c, &big, &[], &mut slots()).unwrap_err();
        assert!(matches!(e, ProtocolError::TooLong { .. }), "{e:?}");
        assert!(c.ctrl.capacity() < 100_000, "allocated before checking");
    }

    #[test]
    fn a_status_request_is_a_first_frame_with_no_payload_or_a_nonce() {
        let empty = control_frame(FrameKind::Status, 0, 0, &[]);
        let nonce = control_frame(FrameKind::Status, 0, 0, &[4; protocol::NONCE_LEN]);
        let odd = control_frame(FrameKind::Status, 0, 0, &[4; 5]);
        let mut c = Connection::new();
        assert_eq!(
            feed(&mut c, &empty, &[], &mut slots()).unwrap(),
            vec![Frame::Status(None)]
        );
        let mut c = Connection::new();
        assert_eq!(
            feed(&mut c, &nonce, &[7], &mut slots()).unwrap(),
            vec![Frame::Status(Some([4; protocol::NONCE_LEN]))]
        );
        assert!(feed(&mut c, &empty, &[], &mut slots()).is_err(), "twice");
        assert!(feed(&mut Connection::new(), &odd, &[], &mut slots()).is_err());
        let mut c = Connection::new();
        feed(
            &mut c,
            &control_frame(FrameKind::Hello, 0, 0, &hello().encode()),
            &[],
            &mut slots(),
        )
        .unwrap();
        assert!(
            feed(&mut c, &empty, &[], &mut slots()).is_err(),
            "after a hello"
        );
    }

    #[test]
    fn a_handshake_and_a_push_split_at_every_point() {
        let hs = control_frame(FrameKind::Hello, 0, 0, &hello().encode());
        let body = push(0, 7, 0xab, 1024);
        for cut in 0..=hs.len() {
            let mut c = Connection::new();
            let frames = feed(&mut c, &hs, &[cut], &mut slots()).unwrap();
            assert_eq!(frames, vec![Frame::Hello(hello())], "hello cut at {cut}");
        }
        for cut in 0..=body.len() {
            let mut c = Connection::new();
            c.set_joined();
            let mut s = slots();
            let frames = feed(&mut c, &body, &[cut], &mut s).unwrap();
            assert_eq!(
                frames,
                vec![Frame::Push { key: 0, clock: 7 }],
                "push cut at {cut}"
            );
            assert!(s[0].iter().all(|&b| b == 0xab), "payload not in the slot");
        }
        // Two cuts anywhere in a run of frames back to back (a header split twice, a header and
        // its payload, two frames).
        let mut run = push(1, 3, 1, 176);
        run.extend(push(0, 4, 2, 1024));
        run.extend(control_frame(FrameKind::Bye, 0, 0, &[]));
        for a in (0..run.len()).step_by(7) {
            for b in (a..run.len()).step_by(13) {
                let mut c = Connection::new();
                c.set_joined();
                let mut s = slots();
                let frames = feed(&mut c, &run, &[a, b], &mut s).unwrap();
                assert_eq!(
                    frames,
                    vec![
                        Frame::Push { key: 1, clock: 3 },
                        Frame::Push { key: 0, clock: 4 },
                        Frame::Bye
                    ],
                    "cuts at {a}, {b}"
                );
                assert!(s[1].iter().all(|&x| x == 1) && s[0].iter().all(|&x| x == 2));
            }
        }
    }

    #[test]
    fn every_malformed_case_is_an_error_before_anything_is_allocated() {
        let joined = |bytes: &[u8]| {
            let mut c = Connection::new();
            c.set_joined();
            feed(&mut c, bytes, &[], &mut slots())
        };
        let fresh = |bytes: &[u8]| feed(&mut Connection::new(), bytes, &[], &mut slots());

        let mut bad_magic = push(0, 0, 0, 1024);
        bad_magic[0] = b'G';
        assert!(matches!(fresh(&bad_magic), Err(ProtocolError::BadMagic(_))));
        let mut bad_version = push(0, 0, 0, 1024);
        bad_version[4] = 9;
        assert!(matches!(
            joined(&bad_version),
            Err(ProtocolError::BadVersion { .. })
        ));
        let mut unknown = push(0, 0, 0, 1024);
        unknown[6] = 99;
        assert_eq!(joined(&unknown), Err(ProtocolError::UnknownKind(99)));
        // A push declaring more than its part: refused at the header, nothing read into a slot.
        let h = Header::new(FrameKind::Push, 0, 0, 1 << 40).encode();
        assert!(matches!(
            joined(&h),
            Err(ProtocolError::WrongSize { expected: 1024, .. })
        ));
        assert!(matches!(
            joined(&push(5, 0, 0, 4)),
            Err(ProtocolError::BadKey { key: 5, keys: 3 })
        ));
        // A hello declaring a huge payload is refused before it is allocated.
        let h = Header::new(FrameKind::Hello, 0, 0, u64::MAX).encode();
        assert!(matches!(fresh(&h), Err(ProtocolError::TooLong { .. })));
        // Out of turn.
        assert!(matches!(
            fresh(&push(0, 0, 0, 1024)),
            Err(ProtocolError::Unexpected {
                when: "before the handshake",
                ..
            })
        ));
        assert!(matches!(
            fresh(&control_frame(FrameKind::Bye, 0, 0, &[])),
            Err(ProtocolError::Unexpected { .. })
        ));
        let hs = control_frame(FrameKind::Hello, 0, 0, &hello().encode());
        assert!(matches!(
            joined(&hs),
            Err(ProtocolError::Unexpected {
                when: "after the handshake",
                ..
            })
        ));
        for kind in [FrameKind::Model, FrameKind::Welcome] {
            let len = if kind == FrameKind::Welcome {
                Welcome::LEN
            } else {
                4
            };
            let f = control_frame(kind, 2, 0, &vec![0; len]);
            assert!(
                matches!(
                    joined(&f),
                    Err(ProtocolError::Unexpected {
                        when: "from a worker",
                        ..
                    })
                ),
                "{kind:?} accepted"
            );
        }
        // A hello whose payload is malformed.
        let f = control_frame(FrameKind::Hello, 0, 0, &[1, 2, 3]);
        assert!(matches!(fresh(&f), Err(ProtocolError::Truncated { .. })));
        // Errors and RDMA offers pass through with their payloads.
        assert_eq!(
            joined(&control_frame(FrameKind::Error, 0, 0, b"disk full")).unwrap(),
            vec![Frame::Error("disk full".into())]
        );
        assert_eq!(
            joined(&control_frame(FrameKind::RdmaConnect, 0, 0, &[9; 46])).unwrap(),
            vec![Frame::RdmaConnect(vec![9; 46])]
        );
    }

    #[test]
    fn eof_says_where_the_peer_was() {
        let p = parts();
        let mut c = Connection::new();
        assert_eq!(c.at_eof(), "without saying goodbye");
        c.set_joined();
        let f = push(0, 0, 0, 1024);
        let Target::Buf(b) = c.target() else { panic!() };
        b[..5].copy_from_slice(&f[..5]);
        assert_eq!(c.advance(5, &p), Ok(None));
        assert_eq!(c.at_eof(), "in the middle of a frame header");
        let Target::Buf(b) = c.target() else { panic!() };
        b.copy_from_slice(&f[5..HEADER_LEN]);
        assert_eq!(c.advance(HEADER_LEN - 5, &p), Ok(None));
        assert_eq!(c.at_eof(), "in the middle of a frame payload");
    }
}
