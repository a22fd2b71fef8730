//! The Het-Sync wire format: a fixed 32-byte frame header followed by a payload.
//!
//! Pure encode/decode, no I/O, so the same code serves the TCP data path, the TCP control channel
//! of the RDMA transport, and fuzzing. Everything is little-endian; gradients and models travel as
//! raw little-endian `f32`, so a push payload can be read straight into a gradient slot.
//!
//! ```text
//! offset  size  field
//!      0     4  magic    b"HSYN"
//!      4     2  version  PROTOCOL_VERSION
//!      6     1  kind     FrameKind
//!      7     1  flags    must be 0 (reserved)
//!      8     4  key      tensor (partition) index
//!     12     4  reserved must be 0
//!     16     8  clock    round of the model a gradient was computed on / round of a model
//!     24     8  len      payload bytes that follow
//! ```

use thiserror::Error;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"HSYN";
/// Wire version; bumped on any incompatible change. Peers must match exactly.
pub const PROTOCOL_VERSION: u16 = 1;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 32;
/// Largest payload of a control frame (hello, error text): far above any legitimate use.
pub const MAX_CONTROL_PAYLOAD: u64 = 64 * 1024;
/// Most tensors (keys) a job may declare.
pub const MAX_KEYS: usize = 4096;

#[cfg(not(target_endian = "little"))]
compile_error!(
    "Het-Sync moves f32 tensors as raw little-endian bytes; big-endian hosts are not supported"
);

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Worker -> server, first frame: version is in the header, payload is a [`Hello`].
    Hello = 1,
    /// Server -> worker: the handshake was accepted. Empty payload.
    Welcome = 2,
    /// Worker -> server: a gradient for `key`, computed on the model of round `clock`.
    Push = 3,
    /// Server -> worker: the model for `key` after `clock` closed rounds.
    Model = 4,
    /// Either way: an orderly goodbye; the sender closes after it. Empty payload.
    Bye = 5,
    /// Either way: the sender refuses or drops the peer; payload is UTF-8 text saying why.
    Error = 6,
    /// Either way, right after the handshake: the sender's RDMA endpoint and the buffers the
    /// other side may write ([`RdmaParams`]). From the server, an empty payload means "no RDMA
    /// here: carry on over TCP".
    RdmaConnect = 7,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::Welcome,
            3 => Self::Push,
            4 => Self::Model,
            5 => Self::Bye,
            6 => Self::Error,
            7 => Self::RdmaConnect,
            _ => return None,
        })
    }
}

/// A malformed or unacceptable frame. Each variant says what was wrong with which field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    /// The first four bytes were not `HSYN`: the peer does not speak Het-Sync.
    #[error("bad magic {0:02x?}: peer does not speak the Het-Sync protocol")]
    BadMagic([u8; 4]),
    /// The peer speaks another protocol version.
    #[error("protocol version {got} not supported (this build speaks version {PROTOCOL_VERSION}); run the same hetsync release everywhere")]
    BadVersion {
        /// The version the peer sent.
        got: u16,
    },
    /// The kind byte names no known frame.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Reserved bits were set.
    #[error("reserved header field is {0:#x}, must be 0")]
    Reserved(u64),
    /// Fewer bytes than a header or payload needs.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes required.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// A payload longer than this kind of frame may carry.
    #[error("{kind:?} frame declares {len} payload bytes, more than the limit of {max}")]
    TooLong {
        /// The frame kind.
        kind: FrameKind,
        /// The declared length.
        len: u64,
        /// The limit for this kind.
        max: u64,
    },
    /// A tensor payload whose size is not the negotiated tensor size.
    #[error(
        "{kind:?} for key {key} carries {len} bytes, but the negotiated tensor is {expected} bytes"
    )]
    WrongSize {
        /// The frame kind.
        kind: FrameKind,
        /// The key it was for.
        key: u32,
        /// The declared length.
        len: u64,
        /// The negotiated length.
        expected: u64,
    },
    /// A key outside the negotiated set.
    #[error("key {key} out of range: the job has {keys} key(s)")]
    BadKey {
        /// The key received.
        key: u32,
        /// How many keys were negotiated.
        keys: usize,
    },
    /// A frame that is well formed but not allowed at this point of the conversation.
    #[error("unexpected {kind:?} frame {when}")]
    Unexpected {
        /// The frame kind.
        kind: FrameKind,
        /// When it arrived, e.g. "before the handshake".
        when: &'static str,
    },
    /// A hello payload that does not describe a valid job.
    #[error("invalid hello: {0}")]
    BadHello(String),
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame carries.
    pub kind: FrameKind,
    /// Tensor index (0 when the frame is not about a tensor).
    pub key: u32,
    /// Round number (see [`FrameKind`] for its meaning per kind).
    pub clock: u64,
    /// Payload length in bytes.
    pub len: u64,
}

impl Header {
    /// A header for `kind` with the given fields.
    pub fn new(kind: FrameKind, key: u32, clock: u64, len: u64) -> Self {
        Self {
            kind,
            key,
            clock,
            len,
        }
    }

    /// Encodes the header into its 32 wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b[6] = self.kind as u8;
        b[7] = 0;
        b[8..12].copy_from_slice(&self.key.to_le_bytes());
        b[16..24].copy_from_slice(&self.clock.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes and checks a header: magic, version, kind and reserved fields. Payload lengths are
    /// checked against the negotiated job by [`Limits::check`].
    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        if b.len() < HEADER_LEN {
            return Err(ProtocolError::Truncated {
                what: "frame header",
                need: HEADER_LEN,
                have: b.len(),
            });
        }
        let magic: [u8; 4] = b[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != PROTOCOL_VERSION {
            return Err(ProtocolError::BadVersion { got: version });
        }
        let kind = FrameKind::from_u8(b[6]).ok_or(ProtocolError::UnknownKind(b[6]))?;
        let reserved = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
        if b[7] != 0 || reserved != 0 {
            return Err(ProtocolError::Reserved(
                u64::from(b[7]) << 32 | u64::from(reserved),
            ));
        }
        Ok(Self {
            kind,
            key: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            clock: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
            len: u64::from_le_bytes(b[24..32].try_into().expect("8 bytes")),
        })
    }
}

/// The tensor sizes a connection negotiated; bounds every payload it may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Elements (f32) per key.
    pub dims: Vec<usize>,
}

impl Limits {
    /// Checks a header's payload length and key against the negotiated job. Control frames are
    /// bounded by [`MAX_CONTROL_PAYLOAD`]; tensor frames must match their key's size exactly.
    pub fn check(&self, h: &Header) -> Result<(), ProtocolError> {
        match h.kind {
            FrameKind::Push | FrameKind::Model => {
                let dim = *self.dims.get(h.key as usize).ok_or(ProtocolError::BadKey {
                    key: h.key,
                    keys: self.dims.len(),
                })?;
                let expected = (dim * 4) as u64;
                if h.len != expected {
                    return Err(ProtocolError::WrongSize {
                        kind: h.kind,
                        key: h.key,
                        len: h.len,
                        expected,
                    });
                }
                Ok(())
            }
            FrameKind::Welcome | FrameKind::Bye => check_len(h, 0),
            FrameKind::Hello | FrameKind::Error | FrameKind::RdmaConnect => {
                check_len(h, MAX_CONTROL_PAYLOAD)
            }
        }
    }
}

fn check_len(h: &Header, max: u64) -> Result<(), ProtocolError> {
    if h.len > max {
        return Err(ProtocolError::TooLong {
            kind: h.kind,
            len: h.len,
            max,
        });
    }
    Ok(())
}

/// The handshake a worker opens with: who it is and the job it expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The worker's rank, `0..workers`.
    pub rank: u32,
    /// How many workers the worker believes the job has; 0 when it does not know (the server
    /// then checks the rank against its own job size).
    pub workers: u32,
    /// Elements (f32) of each key's tensor.
    pub dims: Vec<u64>,
    /// An [`FrameKind::RdmaConnect`] offer follows the welcome: the server reports the worker as
    /// joined only once it has answered it, so no model goes out before the transport is settled.
    pub rdma: bool,
}

/// Hello flag bit: an RDMA offer follows.
const HELLO_RDMA: u32 = 1;

impl Hello {
    /// Encodes the hello payload (without the header).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(12 + 8 * self.dims.len());
        v.extend_from_slice(&self.rank.to_le_bytes());
        v.extend_from_slice(&self.workers.to_le_bytes());
        v.extend_from_slice(&(self.dims.len() as u32).to_le_bytes());
        for d in &self.dims {
            v.extend_from_slice(&d.to_le_bytes());
        }
        let flags = if self.rdma { HELLO_RDMA } else { 0 };
        v.extend_from_slice(&flags.to_le_bytes());
        v
    }

    /// Decodes a hello payload; rejects truncation, trailing bytes, no keys, too many keys,
    /// zero-sized tensors and a rank outside the declared job (when one is declared).
    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        let truncated = |need| ProtocolError::Truncated {
            what: "hello payload",
            need,
            have: b.len(),
        };
        if b.len() < 12 {
            return Err(truncated(12));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let (rank, workers, nkeys) = (u32_at(0), u32_at(4), u32_at(8) as usize);
        if nkeys == 0 || nkeys > MAX_KEYS {
            return Err(ProtocolError::BadHello(format!(
                "{nkeys} keys declared (must be 1..={MAX_KEYS})"
            )));
        }
        let need = 12 + 8 * nkeys + 4;
        if b.len() < need {
            return Err(truncated(need));
        }
        if b.len() > need {
            return Err(ProtocolError::BadHello(format!(
                "{} trailing bytes after {nkeys} key sizes and the flags",
                b.len() - need
            )));
        }
        let flags = u32::from_le_bytes(b[need - 4..need].try_into().expect("4 bytes"));
        if flags & !HELLO_RDMA != 0 {
            return Err(ProtocolError::BadHello(format!(
                "unknown hello flags {flags:#x}"
            )));
        }
        let dims: Vec<u64> = (0..nkeys)
            .map(|k| u64::from_le_bytes(b[12 + 8 * k..20 + 8 * k].try_into().expect("8 bytes")))
            .collect();
        if let Some(k) = dims.iter().position(|&d| d == 0) {
            return Err(ProtocolError::BadHello(format!("key {k} has size 0")));
        }
        if workers != 0 && rank >= workers {
            return Err(ProtocolError::BadHello(format!(
                "rank {rank} is not in 0..{workers}"
            )));
        }
        Ok(Self {
            rank,
            workers,
            dims,
            rdma: flags & HELLO_RDMA != 0,
        })
    }
}

/// Most keys a job may have over RDMA: the immediate carries the key in 8 bits.
pub const MAX_RDMA_KEYS: usize = 256;

/// One side's RDMA endpoint and the buffers (one per key) the other side may RDMA-write: the
/// worker offers its model buffers, the server its slots for that worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaParams {
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number.
    pub psn: u32,
    /// Local identifier (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Global identifier.
    pub gid: [u8; 16],
    /// Writable buffers, one per key: (address, length, rkey).
    pub buffers: Vec<(u64, u64, u32)>,
}

impl RdmaParams {
    /// Encodes the payload of an [`FrameKind::RdmaConnect`] frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(30 + 20 * self.buffers.len());
        v.extend_from_slice(&self.qpn.to_le_bytes());
        v.extend_from_slice(&self.psn.to_le_bytes());
        v.extend_from_slice(&self.lid.to_le_bytes());
        v.extend_from_slice(&self.gid);
        v.extend_from_slice(&(self.buffers.len() as u32).to_le_bytes());
        for (addr, len, rkey) in &self.buffers {
            v.extend_from_slice(&addr.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(&rkey.to_le_bytes());
        }
        v
    }

    /// Decodes an [`FrameKind::RdmaConnect`] payload; rejects truncation, trailing bytes and
    /// more buffers than [`MAX_RDMA_KEYS`].
    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        const FIXED: usize = 4 + 4 + 2 + 16 + 4;
        let truncated = |need| ProtocolError::Truncated {
            what: "RDMA parameters",
            need,
            have: b.len(),
        };
        if b.len() < FIXED {
            return Err(truncated(FIXED));
        }
        let n = u32::from_le_bytes(b[26..30].try_into().expect("4 bytes")) as usize;
        if n > MAX_RDMA_KEYS {
            return Err(ProtocolError::BadHello(format!(
                "{n} RDMA buffers offered (at most {MAX_RDMA_KEYS})"
            )));
        }
        let need = FIXED + 20 * n;
        if b.len() != need {
            return Err(if b.len() < need {
                truncated(need)
            } else {
                ProtocolError::BadHello(format!(
                    "{} trailing bytes after the RDMA parameters",
                    b.len() - need
                ))
            });
        }
        let buffers = (0..n)
            .map(|i| {
                let o = FIXED + 20 * i;
                (
                    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes")),
                    u64::from_le_bytes(b[o + 8..o + 16].try_into().expect("8 bytes")),
                    u32::from_le_bytes(b[o + 16..o + 20].try_into().expect("4 bytes")),
                )
            })
            .collect();
        Ok(Self {
            qpn: u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
            psn: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            lid: u16::from_le_bytes(b[8..10].try_into().expect("2 bytes")),
            gid: b[10..26].try_into().expect("16 bytes"),
            buffers,
        })
    }
}

/// The 32-bit immediate of an RDMA push or model write: the key in the top 8 bits, the low 24
/// bits of the clock below.
pub fn encode_imm(key: u32, clock: u64) -> u32 {
    debug_assert!((key as usize) < MAX_RDMA_KEYS);
    (key << 24) | (clock & 0xff_ffff) as u32
}

/// Decodes an immediate: the key, and the clock as the value nearest `near` whose low 24 bits
/// match (clocks on the wire are never more than a few rounds from the receiver's).
pub fn decode_imm(imm: u32, near: u64) -> (u32, u64) {
    const SPAN: u64 = 1 << 24;
    let low = u64::from(imm & 0xff_ffff);
    let base = near & !(SPAN - 1);
    let candidates = [
        base.wrapping_sub(SPAN) | low,
        base | low,
        (base + SPAN) | low,
    ];
    let clock = candidates
        .into_iter()
        .filter(|&c| c <= near.saturating_add(SPAN / 2))
        .min_by_key(|&c| c.abs_diff(near))
        .unwrap_or(base | low);
    (imm >> 24, clock)
}

/// Encodes a whole control frame (header and payload) into one buffer.
pub fn control_frame(kind: FrameKind, key: u32, clock: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&Header::new(kind, key, clock, payload.len() as u64).encode());
    v.extend_from_slice(payload);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { dims: vec![8, 3] }
    }

    #[test]
    fn header_round_trips() {
        for kind in [
            FrameKind::Hello,
            FrameKind::Welcome,
            FrameKind::Push,
            FrameKind::Model,
            FrameKind::Bye,
            FrameKind::Error,
            FrameKind::RdmaConnect,
        ] {
            let h = Header::new(kind, 7, u64::MAX - 3, 12345);
            assert_eq!(Header::decode(&h.encode()), Ok(h));
        }
    }

    #[test]
    fn rejects_bad_magic() {
        let mut b = Header::new(FrameKind::Push, 0, 0, 32).encode();
        b[0] = b'X';
        assert!(matches!(Header::decode(&b), Err(ProtocolError::BadMagic(m)) if m == *b"XSYN"));
    }

    #[test]
    fn rejects_other_versions() {
        let mut b = Header::new(FrameKind::Push, 0, 0, 32).encode();
        b[4..6].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(
            Header::decode(&b),
            Err(ProtocolError::BadVersion { got: 2 })
        );
    }

    #[test]
    fn rejects_unknown_kinds() {
        for k in [0u8, 8, 200, 255] {
            let mut b = Header::new(FrameKind::Push, 0, 0, 32).encode();
            b[6] = k;
            assert_eq!(Header::decode(&b), Err(ProtocolError::UnknownKind(k)));
        }
    }

    #[test]
    fn rejects_reserved_bits() {
        let mut b = Header::new(FrameKind::Bye, 0, 0, 0).encode();
        b[7] = 1;
        assert!(matches!(
            Header::decode(&b),
            Err(ProtocolError::Reserved(_))
        ));
        let mut b = Header::new(FrameKind::Bye, 0, 0, 0).encode();
        b[13] = 1;
        assert!(matches!(
            Header::decode(&b),
            Err(ProtocolError::Reserved(_))
        ));
    }

    #[test]
    fn rejects_truncated_headers() {
        let b = Header::new(FrameKind::Bye, 0, 0, 0).encode();
        for n in 0..HEADER_LEN {
            assert_eq!(
                Header::decode(&b[..n]),
                Err(ProtocolError::Truncated {
                    what: "frame header",
                    need: HEADER_LEN,
                    have: n
                })
            );
        }
    }

    #[test]
    fn tensor_frames_must_match_their_key_exactly() {
        let l = limits();
        assert_eq!(l.check(&Header::new(FrameKind::Push, 0, 0, 32)), Ok(()));
        assert_eq!(l.check(&Header::new(FrameKind::Model, 1, 0, 12)), Ok(()));
        // Larger than the negotiated tensor, smaller, and absurd.
        for len in [36, 28, 0, u64::MAX] {
            assert!(matches!(
                l.check(&Header::new(FrameKind::Push, 0, 0, len)),
                Err(ProtocolError::WrongSize { expected: 32, .. })
            ));
        }
        assert_eq!(
            l.check(&Header::new(FrameKind::Push, 2, 0, 32)),
            Err(ProtocolError::BadKey { key: 2, keys: 2 })
        );
    }

    #[test]
    fn control_frames_are_bounded() {
        let l = limits();
        assert!(matches!(
            l.check(&Header::new(
                FrameKind::Hello,
                0,
                0,
                MAX_CONTROL_PAYLOAD + 1
            )),
            Err(ProtocolError::TooLong { .. })
        ));
        assert!(matches!(
            l.check(&Header::new(FrameKind::Bye, 0, 0, 1)),
            Err(ProtocolError::TooLong { max: 0, .. })
        ));
        assert!(matches!(
            l.check(&Header::new(FrameKind::Welcome, 0, 0, 4)),
            Err(ProtocolError::TooLong { max: 0, .. })
        ));
        assert_eq!(l.check(&Header::new(FrameKind::Error, 0, 0, 100)), Ok(()));
    }

    #[test]
    fn hello_round_trips() {
        let h = Hello {
            rank: 3,
            workers: 4,
            dims: vec![1 << 20, 5],
            rdma: true,
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn hello_rejects_every_truncation_and_trailing_bytes() {
        let b = Hello {
            rank: 0,
            workers: 2,
            dims: vec![10, 20],
            rdma: false,
        }
        .encode();
        for n in 0..b.len() {
            assert!(
                matches!(Hello::decode(&b[..n]), Err(ProtocolError::Truncated { .. })),
                "prefix of {n} bytes accepted"
            );
        }
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(
            Hello::decode(&long),
            Err(ProtocolError::BadHello(_))
        ));
    }

    #[test]
    fn hello_may_leave_the_job_size_to_the_server() {
        let h = Hello {
            rank: 9,
            workers: 0,
            dims: vec![1],
            rdma: false,
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn hello_rejects_impossible_jobs() {
        let bad = [
            Hello {
                rank: 4,
                workers: 4,
                dims: vec![1],
                rdma: false,
            },
            Hello {
                rank: 1,
                workers: 1,
                dims: vec![1],
                rdma: false,
            },
            Hello {
                rank: 0,
                workers: 1,
                dims: vec![0],
                rdma: false,
            },
            Hello {
                rank: 0,
                workers: 1,
                dims: vec![],
                rdma: false,
            },
        ];
        for h in bad {
            assert!(
                matches!(Hello::decode(&h.encode()), Err(ProtocolError::BadHello(_))),
                "{h:?} accepted"
            );
        }
        let mut many = Hello {
            rank: 0,
            workers: 1,
            dims: vec![1],
            rdma: false,
        }
        .encode();
        many[8..12].copy_from_slice(&(MAX_KEYS as u32 + 1).to_le_bytes());
        assert!(matches!(
            Hello::decode(&many),
            Err(ProtocolError::BadHello(_))
        ));
    }

    #[test]
    fn rdma_params_round_trip_and_reject_truncation() {
        let p = RdmaParams {
            qpn: 0x11,
            psn: 0x22,
            lid: 3,
            gid: [7; 16],
            buffers: vec![(0x7f00_0000_1000, 4096, 0xabcd), (1, 2, 3)],
        };
        let b = p.encode();
        assert_eq!(RdmaParams::decode(&b), Ok(p));
        for n in 0..b.len() {
            assert!(
                RdmaParams::decode(&b[..n]).is_err(),
                "prefix of {n} accepted"
            );
        }
        let mut long = b.clone();
        long.push(0);
        assert!(RdmaParams::decode(&long).is_err());
    }

    #[test]
    fn immediates_carry_key_and_clock_across_the_24_bit_wrap() {
        for (key, clock, near) in [
            (0u32, 0u64, 0u64),
            (5, 17, 17),
            (255, (1 << 24) - 1, 1 << 24),
            (1, 1 << 24, (1 << 24) - 2),
            (9, 3 * (1 << 24) + 5, 3 * (1 << 24) + 9),
        ] {
            assert_eq!(decode_imm(encode_imm(key, clock), near), (key, clock));
        }
    }

    #[test]
    fn decoding_random_bytes_never_panics() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let l = limits();
        for _ in 0..20_000 {
            let mut b = [0u8; HEADER_LEN + 24];
            for byte in b.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = x as u8;
            }
            // Keep the magic/version half the time so later checks are reached too.
            if x & 1 == 0 {
                b[0..4].copy_from_slice(&MAGIC);
                b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
                b[6] = (x >> 8) as u8 % 8;
            }
            if let Ok(h) = Header::decode(&b) {
                let _ = l.check(&h);
            }
            let _ = Hello::decode(&b[HEADER_LEN..]);
            let _ = RdmaParams::decode(&b[HEADER_LEN..]);
        }
    }
}
