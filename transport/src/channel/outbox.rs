//! One connection's queued output: frames the kernel has not taken yet, models by reference.
//!
//! A model is queued as a reference to a version in the [`Arena`] (counted as a reader there, so
//! no update writes it) and goes out by `writev` straight from the arena; only when an update must
//! reuse that version while a peer still has not read it ([`Outbox::detach`]) is the unsent rest
//! copied, into this peer's queue alone.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use crate::protocol::{control_frame, FrameKind, Header, HEADER_LEN};
use crate::{Arena, Key, Version};

/// A piece of the queue.
#[derive(Debug)]
enum Segment {
    /// Owned bytes (control frames, detached models), sent from `pos` on.
    Bytes { buf: Vec<u8>, pos: usize },
    /// A model frame: its header, then version `version` of part `key` still in the arena;
    /// `pos` bytes of the two have gone. Queuing one allocates nothing.
    Model {
        hdr: [u8; HEADER_LEN],
        key: Key,
        version: Version,
        pos: usize,
    },
}

impl Segment {
    /// The unsent rest as at most two slices (a model's header and its data).
    fn remaining<'a>(&'a self, arena: &'a Arena) -> [&'a [u8]; 2] {
        match self {
            Segment::Bytes { buf, pos, .. } => [&buf[*pos..], &[]],
            Segment::Model {
                hdr,
                key,
                version,
                pos,
            } => {
                let data = arena.version_bytes(*key, *version);
                [
                    &hdr[(*pos).min(HEADER_LEN)..],
                    &data[pos.saturating_sub(HEADER_LEN)..],
                ]
            }
        }
    }

    fn remaining_len(&self, arena: &Arena) -> usize {
        let [a, b] = self.remaining(arena);
        a.len() + b.len()
    }

    fn advance(&mut self, n: usize) {
        match self {
            Segment::Bytes { pos, .. } | Segment::Model { pos, .. } => *pos += n,
        }
    }
}

/// A connection's output queue.
#[derive(Debug, Default)]
pub struct Outbox {
    segs: VecDeque<Segment>,
    /// Bytes queued and not written yet.
    queued: usize,
}

/// Slices handed to one `writev` (a model takes two).
const IOV: usize = 8;

impl Outbox {
    /// Whether everything queued has gone out.
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// Bytes queued and not written yet.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Queues a control frame.
    pub fn push_control(&mut self, kind: FrameKind, payload: &[u8]) {
        let buf = control_frame(kind, 0, 0, payload);
        self.queued += buf.len();
        self.segs.push_back(Segment::Bytes { buf, pos: 0 });
    }

    /// Queues part `key`'s current model (its header and a reference to the arena's version).
    pub fn push_model(&mut self, arena: &mut Arena, key: Key) {
        let (version, round) = arena.start_send(key);
        let len = arena.version_bytes(key, version).len() as u64;
        self.queued += HEADER_LEN + len as usize;
        self.segs.push_back(Segment::Model {
            hdr: Header::new(FrameKind::Model, key, round, len).encode(),
            key,
            version,
            pos: 0,
        });
    }

    /// Writes what is queued, several segments per `writev`, until the writer would block.
    /// Returns whether everything went out. Models that went out whole stop reading their
    /// version.
    pub fn flush(&mut self, w: &mut impl Write, arena: &mut Arena) -> io::Result<bool> {
        while !self.segs.is_empty() {
            let mut slices = [IoSlice::new(&[]); IOV];
            let mut n = 0;
            'fill: for seg in &self.segs {
                for part in seg.remaining(arena) {
                    if n == IOV {
                        break 'fill;
                    }
                    if !part.is_empty() {
                        slices[n] = IoSlice::new(part);
                        n += 1;
                    }
                }
            }
            match w.write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut written) => {
                    self.queued -= written;
                    while written > 0 {
                        let seg = self.segs.front_mut().expect("wrote from it");
                        let left = seg.remaining_len(arena);
                        if written < left {
                            seg.advance(written);
                            break;
                        }
                        written -= left;
                        if let Segment::Model { key, version, .. } =
                            self.segs.pop_front().expect("a segment")
                        {
                            arena.end_send(key, version);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Copies the unsent rest of every queued send of version `version` of part `key` into this
    /// queue, so the arena may change that version (the peer still gets, whole, the model it was
    /// stamped with).
    pub fn detach(&mut self, arena: &mut Arena, key: Key, version: Version) {
        for seg in self.segs.iter_mut() {
            if matches!(*seg, Segment::Model { key: k, version: v, .. } if k == key && v == version)
            {
                let buf = seg.remaining(arena).concat();
                *seg = Segment::Bytes { buf, pos: 0 };
                arena.end_send(key, version);
            }
        }
    }

    /// Drops everything queued (the connection is closing): its sends stop reading the arena.
    pub fn abandon(&mut self, arena: &mut Arena) {
        self.queued = 0;
        for seg in self.segs.drain(..) {
            if let Segment::Model { key, version, .. } = seg {
                arena.end_send(key, version);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Parts;

    /// A writer that takes at most `cap` bytes per call, then would block once.
    struct Trickle {
        out: Vec<u8>,
        cap: usize,
        blocked: bool,
    }

    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(b)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.blocked = !self.blocked;
            if !self.blocked {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.cap - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn held_arena() -> Arena {
        let mut a = Arena::new(1, Parts::new(&[256], 1024).unwrap()).unwrap();
        a.receive_into(0, 0)
            .unwrap()
            .copy_from_slice(bytemuck::cast_slice(&[1.0f32; 256]));
        a.hand_over(0, 0, 0).unwrap();
        a
    }

    fn add(target: crate::Update<'_>, g: &[&[f32]]) {
        match target {
            crate::Update::InPlace(m) => m.iter_mut().zip(g[0]).for_each(|(d, x)| *d += x),
            crate::Update::Into { next, model } => {
                for i in 0..next.len() {
                    next[i] = model[i] + g[0][i];
                }
            }
        }
    }

    #[test]
    fn a_model_goes_out_whole_by_reference_and_then_stops_reading_its_version() {
        let mut a = held_arena();
        let mut o = Outbox::default();
        o.push_model(&mut a, 0);
        assert_eq!(a.readers(0, Version(0)), 1);
        let mut w = Trickle {
            out: Vec::new(),
            cap: 100,
            blocked: false,
        };
        while !o.flush(&mut w, &mut a).unwrap() {
            assert_eq!(a.readers(0, Version(0)), 1, "read while queued");
        }
        assert_eq!(w.out.len(), HEADER_LEN + 1024);
        assert_eq!(a.readers(0, Version(0)), 0);
    }

    #[test]
    fn a_detached_model_is_the_version_it_was_stamped_with() {
        let mut a = held_arena();
        let mut o = Outbox::default();
        o.push_model(&mut a, 0);
        let mut w = Trickle {
            out: Vec::new(),
            cap: 200,
            blocked: false,
        };
        assert!(!o.flush(&mut w, &mut a).unwrap());
        // Round 1 closes into version 1 (version 0 is being sent), which is queued too; round 2
        // then finds both versions being read.
        a.update(0, &[0], add).unwrap();
        o.push_model(&mut a, 0);
        assert_eq!(
            a.update(0, &[0], add),
            Err(crate::ArenaError::VersionBusy {
                key: 0,
                version: Version(0)
            })
        );
        o.detach(&mut a, 0, Version(0));
        a.update(0, &[0], add).unwrap();
        assert_eq!(a.model(0), &[2.0; 256]);
        while !o.flush(&mut w, &mut a).unwrap() {}
        let h = Header::decode(&w.out[..HEADER_LEN]).unwrap();
        assert_eq!((h.kind, h.clock), (FrameKind::Model, 0));
        let first = &w.out[HEADER_LEN..HEADER_LEN + 1024];
        assert!(first.iter().all(|&b| b == 0), "torn model");
        let second = &w.out[2 * HEADER_LEN + 1024..];
        assert_eq!(second, bytemuck::cast_slice::<f32, u8>(&[1.0; 256]));
        assert_eq!(a.readers(0, Version(0)), 0);
        assert_eq!(a.readers(0, Version(1)), 0);
    }
}
