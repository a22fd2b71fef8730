//! The Het-Sync wire format: a fixed 32-byte frame header followed by a payload.
//!
//! Pure encode/decode, no I/O, so the same code serves the TCP data path, the TCP control channel
//! of the RDMA transport, and fuzzing. Everything is little-endian; gradients and models travel as
//! raw little-endian `f32`, so a push payload can be read straight into a gradient slot.
//!
//! A job is a list of tensors; each travels as one or more *parts* of at most the server's
//! partition size ([`Parts`]), and the `key` of a push or model frame is the part's index. The
//! handshake ([`Hello`], [`Welcome`]) agrees on the tensors, the partition size and what a push's
//! clock means ([`PushClock`]); the RDMA
//! parameters and immediates are in [`rdma`].
//!
//! ```text
//! offset  size  field
//!      0     4  magic    b"HSYN"
//!      4     2  version  PROTOCOL_VERSION
//!      6     1  kind     FrameKind
//!      7     1  flags    must be 0 (reserved)
//!      8     4  key      part index (see Parts)
//!     12     4  reserved must be 0
//!     16     8  clock    push: see PushClock (model round or worker clock) / model: its round
//!     24     8  len      payload bytes that follow
//! ```

mod hello;
mod parts;
pub mod rdma;

pub use hello::{Hello, PushClock, Welcome, CHALLENGE_LEN, MAX_TENSORS, NONCE_LEN, PROOF_LEN};
pub use parts::{Part, Parts, MAX_PARTS, MAX_PART_BYTES, MIN_PART_BYTES};
pub use rdma::{RdmaAccept, RdmaParams, MAX_RDMA_PARTS};

use thiserror::Error;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"HSYN";
/// Wire version; bumped on any incompatible change. Peers must match exactly.
/// 2: partitions (the welcome carries the partition size; keys are parts), clock stamps on RDMA.
/// 3: the welcome says what a push's clock means ([`PushClock`]: model round or worker clock).
pub const PROTOCOL_VERSION: u16 = 4;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 32;
/// Largest payload of a control frame (error text, RDMA parameters): far above any legitimate
/// use. A hello is bounded by [`Hello::MAX_LEN`] instead (it lists every tensor's size).
pub const MAX_CONTROL_PAYLOAD: u64 = 64 * 1024;

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
    /// Either way, right after the handshake: the worker's RDMA endpoint and model buffer
    /// ([`RdmaParams`]), and the server's answer ([`RdmaAccept`]: its endpoint, and the keys of
    /// the windows over the worker's slots). From the server, an empty payload means "no RDMA
    /// here: carry on over TCP"; from the worker, an empty payload after the server's answer means
    /// "my queue pair is connected and my receives are posted": only then has it joined.
    RdmaConnect = 7,
    /// Server -> worker, after a hello that asks to authenticate: the server's nonce and its
    /// proof of knowing the shared secret (see `auth`).
    Challenge = 8,
    /// Worker -> server, after a challenge: the worker's proof of knowing the shared secret.
    Auth = 9,
    /// Client -> server, first frame instead of a hello: a status request (`hetsync status`),
    /// empty or carrying an authentication nonce as a hello does. Server -> client: the report,
    /// JSON of at most [`MAX_STATUS_REPORT`] bytes; the server closes after it.
    Status = 10,
}

/// Largest status report.
pub const MAX_STATUS_REPORT: u64 = 16 << 20;

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
            8 => Self::Challenge,
            9 => Self::Auth,
            10 => Self::Status,
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
    /// A key (part) outside the negotiated set.
    #[error("key {key} out of range: the job has {keys} part(s)")]
    BadKey {
        /// The key received.
        key: u32,
        /// How many parts were negotiated.
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
    /// A handshake payload (hello, welcome, RDMA parameters) that does not describe a valid job.
    #[error("invalid handshake: {0}")]
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
    /// checked against the negotiated job by [`check_len`].
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

/// Checks a header's payload length before any of it is read or allocated. Control frames are
/// bounded by [`MAX_CONTROL_PAYLOAD`] (a hello by [`Hello::MAX_LEN`], a welcome is exactly
/// [`Welcome::LEN`]); a push or model must be exactly its part's size, so before the handshake
/// (`parts` is `None`) no tensor frame is acceptable.
pub fn check_len(h: &Header, parts: Option<&Parts>) -> Result<(), ProtocolError> {
    let max = match h.kind {
        FrameKind::Push | FrameKind::Model => {
            let Some(parts) = parts else {
                return Err(ProtocolError::Unexpected {
                    kind: h.kind,
                    when: "before the handshake",
                });
            };
            let expected = parts.get(h.key)?.bytes() as u64;
            if h.len != expected {
                return Err(ProtocolError::WrongSize {
                    kind: h.kind,
                    key: h.key,
                    len: h.len,
                    expected,
                });
            }
            return Ok(());
        }
        FrameKind::Bye => 0,
        FrameKind::Welcome | FrameKind::Challenge | FrameKind::Auth => {
            let expected = match h.kind {
                FrameKind::Welcome => Welcome::LEN,
                FrameKind::Challenge => CHALLENGE_LEN,
                _ => PROOF_LEN,
            } as u64;
            if h.len != expected {
                return Err(ProtocolError::WrongSize {
                    kind: h.kind,
                    key: h.key,
                    len: h.len,
                    expected,
                });
            }
            return Ok(());
        }
        FrameKind::Hello => Hello::MAX_LEN as u64,
        FrameKind::Status => MAX_STATUS_REPORT,
        FrameKind::Error => MAX_CONTROL_PAYLOAD,
        // The server's answer carries a key per part; a worker's offer is only RdmaParams::LEN.
        FrameKind::RdmaConnect => MAX_CONTROL_PAYLOAD.max(RdmaAccept::len(MAX_RDMA_PARTS) as u64),
    };
    if h.len > max {
        return Err(ProtocolError::TooLong {
            kind: h.kind,
            len: h.len,
            max,
        });
    }
    Ok(())
}

/// Encodes a whole control frame (header and payload) into one buffer.
pub fn control_frame(kind: FrameKind, key: u32, clock: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&Header::new(kind, key, clock, payload.len() as u64).encode());
    v.extend_from_slice(payload);
    v
}

/// Reads a little-endian `u32` at `at` (the caller checked the length).
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Reads a little-endian `u64` at `at` (the caller checked the length).
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests;
