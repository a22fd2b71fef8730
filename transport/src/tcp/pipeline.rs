//! A worker's TCP link as two queues that move as far as the socket lets them, never blocking:
//! pushes going out (each a header and a part of the gradient buffer, several frames per
//! `writev`, straight from the link's buffers) and frames coming in (a model part read straight
//! into the link's model buffer). Waiting is the link's business; these only move bytes.
//!
//! Keeping both directions moving from one thread is what lets a worker's push of part `i + 1`
//! overlap the server's sum and reply of part `i`: the worker writes what the socket takes,
//! reads what has come back, and goes on computing the next part's gradient while the kernel
//! holds the rest. Neither queue allocates per frame: the push queue reuses its capacity and a
//! model goes straight where it belongs.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};

use crate::protocol::{self, FrameKind, Header, Parts, ProtocolError, HEADER_LEN};
use crate::{Clock, Incoming, Key, LinkError, PeerError};

/// Frames handed to one `writev` at most (two slices each).
const BATCH: usize = 32;

/// A push waiting for the socket.
#[derive(Debug)]
struct Queued {
    hdr: [u8; HEADER_LEN],
    key: Key,
    /// Payload bytes.
    len: usize,
}

/// Pushes not yet (fully) written, oldest first.
#[derive(Debug, Default)]
pub(super) struct Outbound {
    queue: VecDeque<Queued>,
    /// Bytes of the oldest frame (header and payload) already written.
    sent: usize,
}

impl Outbound {
    /// Queues a push of part `key` computed on round `clock`.
    pub(super) fn push(&mut self, parts: &Parts, key: Key, clock: Clock) {
        let len = parts[key].bytes();
        let hdr = Header::new(FrameKind::Push, key, clock, len as u64).encode();
        self.queue.push_back(Queued { hdr, key, len });
    }

    /// Nothing is waiting to be written.
    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Forgets every push not yet written (the server has ended the run: nobody reads them).
    pub(super) fn clear(&mut self) {
        self.queue.clear();
        self.sent = 0;
    }

    /// Whether part `key` has a push still waiting (wholly or partly) to be written.
    #[cfg(test)]
    fn holds(&self, key: Key) -> bool {
        self.queue.iter().any(|q| q.key == key)
    }

    /// Writes as much as the socket takes now; `Ok(true)` once everything queued has gone.
    pub(super) fn write(
        &mut self,
        mut w: impl Write,
        grads: &[Vec<f32>],
        parts: &Parts,
    ) -> io::Result<bool> {
        while !self.queue.is_empty() {
            let written = {
                let mut iov = [IoSlice::new(&[]); 2 * BATCH];
                let mut n = 0;
                for (i, q) in self.queue.iter().take(BATCH).enumerate() {
                    let part = parts[q.key];
                    let body: &[u8] =
                        bytemuck::cast_slice(&grads[part.tensor as usize][part.elems()]);
                    let skip = if i == 0 { self.sent } else { 0 };
                    if skip < HEADER_LEN {
                        iov[n] = IoSlice::new(&q.hdr[skip..]);
                        n += 1;
                    }
                    iov[n] = IoSlice::new(&body[skip.saturating_sub(HEADER_LEN)..]);
                    n += 1;
                }
                match w.write_vectored(&iov[..n]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(k) => k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            self.advance(written);
        }
        Ok(true)
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let front = self
                .queue
                .front()
                .expect("written bytes belong to queued frames");
            let left = HEADER_LEN + front.len - self.sent;
            if n < left {
                self.sent += n;
                return;
            }
            n -= left;
            self.sent = 0;
            self.queue.pop_front();
        }
    }
}

/// The frame being read from the server.
#[derive(Debug, Default)]
pub(super) struct Inbound {
    hdr: [u8; HEADER_LEN],
    /// Bytes of the header, or of the payload of `frame`, received so far.
    got: usize,
    frame: Option<Header>,
    /// An error frame's text.
    text: Vec<u8>,
    /// The server said goodbye, or refused this worker: nothing after it is read.
    ended: bool,
    /// The server's refusal, repeated to every later read.
    refusal: Option<String>,
}

impl Inbound {
    /// Whether the server said goodbye (every frame before it has been reported).
    pub(super) fn said_goodbye(&self) -> bool {
        self.ended && self.refusal.is_none()
    }

    /// Reads every frame the socket holds now: models land in `models` and are reported in
    /// `out`, as is a goodbye. An error frame, a malformed frame or the end of the connection
    /// is an error.
    pub(super) fn read(
        &mut self,
        mut r: impl Read,
        models: &mut [Vec<f32>],
        parts: &Parts,
        out: &mut VecDeque<Incoming>,
        peer: &str,
    ) -> Result<(), LinkError> {
        let proto = |source| {
            LinkError::from(PeerError::Protocol {
                peer: peer.to_string(),
                source,
            })
        };
        if let Some(reason) = &self.refusal {
            return Err(LinkError::Refused {
                peer: peer.to_string(),
                reason: reason.clone(),
            });
        }
        while !self.ended {
            let buf: &mut [u8] = match self.frame {
                None => &mut self.hdr[self.got..],
                Some(h) if h.kind == FrameKind::Model => {
                    let part = parts[h.key];
                    let model: &mut [u8] =
                        bytemuck::cast_slice_mut(&mut models[part.tensor as usize][part.elems()]);
                    &mut model[self.got..]
                }
                Some(_) => &mut self.text[self.got..],
            };
            let n = match r.read(buf) {
                Ok(0) => {
                    let when = match (self.frame, self.got) {
                        (None, 0) => "without saying goodbye",
                        (None, _) => "in the middle of a frame header",
                        (Some(_), _) => "in the middle of a model",
                    };
                    return Err(PeerError::Closed {
                        peer: peer.to_string(),
                        when,
                    }
                    .into());
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(PeerError::Io {
                        op: "read model",
                        peer: peer.to_string(),
                        source,
                    }
                    .into())
                }
            };
            self.got += n;
            match self.frame {
                None if self.got == HEADER_LEN => {
                    self.got = 0;
                    let h = Header::decode(&self.hdr).map_err(proto)?;
                    protocol::check_len(&h, Some(parts)).map_err(proto)?;
                    match h.kind {
                        FrameKind::Model => self.frame = Some(h),
                        FrameKind::Bye => {
                            self.ended = true;
                            out.push_back(Incoming::Shutdown);
                        }
                        FrameKind::Error => {
                            // Bounded by check_len: at most MAX_CONTROL_PAYLOAD.
                            self.text.clear();
                            self.text.resize(h.len as usize, 0);
                            self.frame = Some(h);
                            if h.len == 0 {
                                return Err(self.refused(peer));
                            }
                        }
                        kind => {
                            return Err(proto(ProtocolError::Unexpected {
                                kind,
                                when: "from the server while waiting for a model",
                            }))
                        }
                    }
                }
                Some(h) if self.got as u64 == h.len => {
                    self.got = 0;
                    self.frame = None;
                    if h.kind == FrameKind::Error {
                        return Err(self.refused(peer));
                    }
                    out.push_back(Incoming::Model {
                        key: h.key,
                        round: h.clock,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn refused(&mut self, peer: &str) -> LinkError {
        self.ended = true;
        let reason = String::from_utf8_lossy(&self.text).into_owned();
        self.refusal = Some(reason.clone());
        LinkError::Refused {
            peer: peer.to_string(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::control_frame;

    /// A writer that takes at most `cap` bytes per call, and nothing once `room` is spent.
    struct Trickle {
        got: Vec<u8>,
        cap: usize,
        room: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(b)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.cap - n).min(self.room);
                self.got.extend_from_slice(&b[..take]);
                n += take;
                self.room -= take;
            }
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A reader handing out `bytes` at most `cap` at a time, then WouldBlock.
    struct Drip<'a> {
        bytes: &'a [u8],
        cap: usize,
    }

    impl Read for Drip<'_> {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            if self.bytes.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = b.len().min(self.cap).min(self.bytes.len());
            b[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    fn parts() -> Parts {
        Parts::new(&[700, 3], 1024).unwrap()
    }

    fn grads() -> Vec<Vec<f32>> {
        vec![(0..700).map(|i| i as f32).collect(), vec![-1.0, -2.0, -3.0]]
    }

    fn expected(pushes: &[(Key, Clock)]) -> Vec<u8> {
        let (p, g) = (parts(), grads());
        let mut v = Vec::new();
        for &(key, clock) in pushes {
            let part = p[key];
            let body: &[u8] = bytemuck::cast_slice(&g[part.tensor as usize][part.elems()]);
            v.extend(control_frame(FrameKind::Push, key, clock, body));
        }
        v
    }

    #[test]
    fn pushes_go_out_whole_and_in_order_however_the_socket_cuts_them() {
        let (p, g) = (parts(), grads());
        let pushes = [(0, 4), (1, 4), (2, 5), (0, 6)];
        for cap in [1, 7, 31, 33, 1000, 1 << 20] {
            let mut out = Outbound::default();
            for &(k, c) in &pushes {
                out.push(&p, k, c);
            }
            let mut w = Trickle {
                got: Vec::new(),
                cap,
                room: usize::MAX,
            };
            assert!(out.write(&mut w, &g, &p).unwrap());
            assert!(out.is_empty());
            assert_eq!(w.got, expected(&pushes), "cap {cap}");
        }
    }

    #[test]
    fn a_full_socket_keeps_the_rest_queued_for_later() {
        let (p, g) = (parts(), grads());
        let mut out = Outbound::default();
        out.push(&p, 0, 1);
        out.push(&p, 2, 1);
        let mut w = Trickle {
            got: Vec::new(),
            cap: 100,
            room: 1500,
        };
        assert!(!out.write(&mut w, &g, &p).unwrap(), "the socket filled up");
        assert!(
            out.holds(2) && !out.holds(0),
            "part 0 went whole, part 2 is on its way"
        );
        w.room = usize::MAX;
        assert!(out.write(&mut w, &g, &p).unwrap());
        assert_eq!(w.got, expected(&[(0, 1), (2, 1)]));
    }

    fn model_frame(p: &Parts, key: Key, round: Clock, fill: f32) -> Vec<u8> {
        let body: Vec<f32> = vec![fill; p[key].len];
        control_frame(FrameKind::Model, key, round, bytemuck::cast_slice(&body))
    }

    #[test]
    fn models_land_in_their_part_of_the_buffer_across_any_cuts() {
        let p = parts();
        // Tensor 0 (700 floats) is parts 0, 1 and 2; tensor 1 is part 3.
        let mut bytes = model_frame(&p, 1, 3, 2.5);
        bytes.extend(model_frame(&p, 0, 3, 1.5));
        bytes.extend(model_frame(&p, 3, 9, -1.0));
        bytes.extend(model_frame(&p, 2, 4, 0.5));
        bytes.extend(Header::new(FrameKind::Bye, 0, 0, 0).encode());
        bytes.extend(model_frame(&p, 0, 4, 7.0)); // after the goodbye: never read
        for cap in [1, 5, 32, 33, 4096, 1 << 20] {
            let mut inb = Inbound::default();
            let mut models = vec![vec![0.0f32; 700], vec![0.0; 3]];
            let mut got = VecDeque::new();
            let mut r = Drip { bytes: &bytes, cap };
            while !inb.said_goodbye() {
                inb.read(&mut r, &mut models, &p, &mut got, "s").unwrap();
            }
            let got: Vec<_> = got.into_iter().collect();
            assert_eq!(
                got,
                [
                    Incoming::Model { key: 1, round: 3 },
                    Incoming::Model { key: 0, round: 3 },
                    Incoming::Model { key: 3, round: 9 },
                    Incoming::Model { key: 2, round: 4 },
                    Incoming::Shutdown
                ],
                "cap {cap}"
            );
            assert!(models[0][..256].iter().all(|&x| x == 1.5));
            assert!(models[0][256..512].iter().all(|&x| x == 2.5));
            assert!(models[0][512..].iter().all(|&x| x == 0.5));
            assert_eq!(models[1], [-1.0; 3]);
        }
    }

    #[test]
    fn an_error_frame_is_a_refusal_and_malformed_frames_are_violations() {
        let p = parts();
        let err = control_frame(FrameKind::Error, 0, 0, b"evicted: too slow");
        let mut inb = Inbound::default();
        let mut models = vec![vec![0.0f32; 700], vec![0.0; 3]];
        let e = inb
            .read(
                Drip {
                    bytes: &err,
                    cap: 3,
                },
                &mut models,
                &p,
                &mut VecDeque::new(),
                "s",
            )
            .unwrap_err();
        assert!(
            matches!(&e, LinkError::Refused { reason, .. } if reason == "evicted: too slow"),
            "{e}"
        );
        let again = inb
            .read(&[][..], &mut models, &p, &mut VecDeque::new(), "s")
            .unwrap_err();
        assert!(
            matches!(&again, LinkError::Refused { reason, .. } if reason == "evicted: too slow"),
            "a later read repeats the refusal: {again}"
        );
        // A model of the wrong size, and a push from the server.
        let short = control_frame(FrameKind::Model, 0, 1, &[0u8; 16]);
        let push = control_frame(FrameKind::Push, 0, 1, &[0u8; 1024]);
        for bad in [short, push] {
            let e = Inbound::default()
                .read(
                    Drip {
                        bytes: &bad,
                        cap: 64,
                    },
                    &mut models,
                    &p,
                    &mut VecDeque::new(),
                    "s",
                )
                .unwrap_err();
            assert!(
                matches!(e, LinkError::Peer(PeerError::Protocol { .. })),
                "{e}"
            );
        }
    }

    #[test]
    fn the_end_of_the_connection_says_where_it_came() {
        let p = parts();
        let frame = model_frame(&p, 2, 1, 0.5);
        let mut models = vec![vec![0.0f32; 700], vec![0.0; 3]];
        for (cut, when) in [
            (0, "without saying goodbye"),
            (10, "in the middle of a frame header"),
            (40, "in the middle of a model"),
        ] {
            let mut inb = Inbound::default();
            let r: &[u8] = &frame[..cut];
            let e = inb
                .read(r, &mut models, &p, &mut VecDeque::new(), "s")
                .unwrap_err();
            assert!(
                matches!(e, LinkError::Peer(PeerError::Closed { when: w, .. }) if w == when),
                "cut {cut}"
            );
        }
    }
}
