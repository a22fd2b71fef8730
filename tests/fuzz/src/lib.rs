//! The fuzz harness for the server side of the wire protocol, shared by the AFL target
//! (`src/bin/connection.rs`) and the property tests (`tests/`).
//!
//! [`run`] takes any byte string and must never panic on it: a panic is a finding. The first two
//! bytes steer (see [`Mode`] and [`Splits`]); the rest is what a peer sends. It is fed through a
//! [`Connection`] twice, once cut into the pieces the second byte chooses and once a whole
//! target at a time, and both runs must agree frame for frame, on the error and on where it
//! came. Along the way every frame and target is checked against the protocol's rules, and
//! every frame of the stream goes through the pure decoders ([`Header`], [`Hello`],
//! [`Welcome`], [`RdmaParams`], [`check_len`]), whose successes must re-encode to the very
//! bytes they came from.

use hetsync_transport::auth::{Secret, MIN_SECRET_LEN};
use hetsync_transport::channel::connection::{Connection, Frame, Target};
use hetsync_transport::protocol::{
    check_len, control_frame, FrameKind, Header, Hello, Parts, ProtocolError, RdmaParams, Welcome,
    HEADER_LEN, NONCE_LEN, PROOF_LEN,
};

/// The small jobs an input may pick (every slot a few KiB at most, so each run is cheap).
pub fn job(which: u8) -> Parts {
    match which % 3 {
        // Three parts: 1024, 176 and 4 bytes (the connection unit tests' job).
        0 => Parts::new(&[300, 1], 1024),
        // One part of 4 bytes.
        1 => Parts::new(&[1], 1024),
        // Two full parts and one of 8 bytes.
        _ => Parts::new(&[512, 2], 1024),
    }
    .expect("a valid job")
}

/// What the first byte of an input says about the server's side of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// Which [`job`].
    pub job: u8,
    /// The connection is joined before any byte arrives.
    pub joined: bool,
    /// A challenge went out before any byte arrives.
    pub awaiting_auth: bool,
    /// After a hello the server sends a challenge: only the proof may follow.
    pub challenge_after_hello: bool,
    /// The server admits the worker after its hello (or after its proof, when challenged).
    pub join_after_handshake: bool,
}

impl Mode {
    /// Bit 0-1: the job; bit 2: joined; bit 3: awaiting a proof; bit 4: challenge after a hello;
    /// bit 5: join after the handshake.
    pub fn from_byte(b: u8) -> Self {
        Self {
            job: b & 3,
            joined: b & 4 != 0,
            awaiting_auth: b & 8 != 0,
            challenge_after_hello: b & 16 != 0,
            join_after_handshake: b & 32 != 0,
        }
    }

    /// The byte that says this mode.
    pub fn to_byte(self) -> u8 {
        self.job
            | u8::from(self.joined) << 2
            | u8::from(self.awaiting_auth) << 3
            | u8::from(self.challenge_after_hello) << 4
            | u8::from(self.join_after_handshake) << 5
    }
}

/// How many bytes each read delivers (never more than its target holds), from the second byte
/// of an input: 0 fills each target whole; otherwise the low three bits pick a largest read and
/// the high five seed the sizes under it.
#[derive(Debug, Clone)]
pub struct Splits {
    max: usize,
    state: u32,
}

impl Splits {
    /// Whole targets, one read each.
    pub fn whole() -> Self {
        Self {
            max: usize::MAX,
            state: 0,
        }
    }

    /// The splits the byte `b` says.
    pub fn from_byte(b: u8) -> Self {
        if b == 0 {
            return Self::whole();
        }
        const MAX: [usize; 8] = [1, 2, 3, 7, 31, 32, 33, 1000];
        Self {
            max: MAX[usize::from(b & 7)],
            state: u32::from(b >> 3).wrapping_mul(0x9e37_79b9) | 1,
        }
    }

    fn next(&mut self) -> usize {
        if self.max == usize::MAX {
            return usize::MAX;
        }
        // xorshift32: deterministic, so a crashing input replays exactly.
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        1 + self.state as usize % self.max
    }
}

/// What feeding a stream to a connection came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Every frame completed, in order.
    pub frames: Vec<Frame>,
    /// The error the connection ended on (the server drops the peer), if any.
    pub error: Option<ProtocolError>,
    /// Bytes taken before the error, or all of them.
    pub consumed: usize,
    /// What the server would say if the peer hung up here.
    pub at_eof: &'static str,
    /// The worker's slots, as the pushes left them.
    pub slots: Vec<Vec<u8>>,
}

/// Feeds `stream` to a fresh connection in the server's situation `mode`, with reads of the
/// sizes `splits` gives, checking every target and frame against the protocol's rules on the
/// way. Panics only on a broken rule: never on what the peer sent.
pub fn drive(stream: &[u8], mode: Mode, mut splits: Splits) -> Outcome {
    let parts = job(mode.job);
    let mut slots: Vec<Vec<u8>> = parts.iter().map(|p| vec![0; p.bytes()]).collect();
    let mut c = Connection::new();
    // The server's view, to check each frame against.
    let mut joined = false;
    let mut awaiting_auth = false;
    let mut hello_seen = false;
    if mode.joined {
        c.set_joined();
        joined = true;
    }
    if mode.awaiting_auth {
        c.set_awaiting_auth();
        awaiting_auth = true;
    }
    let mut frames = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let want = splits.next().min(stream.len() - at);
        let n = match c.target() {
            Target::Buf(b) => {
                assert!(!b.is_empty(), "an empty buffer target at byte {at}");
                let n = b.len().min(want);
                b[..n].copy_from_slice(&stream[at..at + n]);
                n
            }
            Target::Slot { key, range } => {
                assert!(joined, "a slot target (key {key}) before the worker joined");
                let slot = slots
                    .get_mut(key as usize)
                    .unwrap_or_else(|| panic!("a slot target for key {key}, not a part"));
                assert!(
                    !range.is_empty() && range.end == slot.len(),
                    "slot target {range:?} for key {key}, whose part is {} bytes",
                    slot.len()
                );
                let n = range.len().min(want);
                slot[range.start..range.start + n].copy_from_slice(&stream[at..at + n]);
                n
            }
        };
        at += n;
        let frame = match c.advance(n, &parts) {
            Ok(None) => continue,
            Ok(Some(frame)) => frame,
            Err(e) => {
                assert!(!e.to_string().is_empty(), "an error with no message");
                return Outcome {
                    frames,
                    error: Some(e),
                    consumed: at,
                    at_eof: c.at_eof(),
                    slots,
                };
            }
        };
        match &frame {
            Frame::Hello(hello) => {
                assert!(
                    !joined && !hello_seen,
                    "a hello accepted twice or after joining"
                );
                hello_seen = true;
                let bytes = hello.encode();
                assert!(
                    bytes.len() <= Hello::MAX_LEN,
                    "a hello longer than its limit"
                );
                assert_eq!(
                    Hello::decode(&bytes).as_ref(),
                    Ok(hello),
                    "hello round trip"
                );
                if mode.challenge_after_hello {
                    c.set_awaiting_auth();
                    awaiting_auth = true;
                } else if mode.join_after_handshake {
                    c.set_joined();
                    joined = true;
                }
            }
            Frame::Auth(_) => {
                // The server takes one answer per challenge (and panicked on a second one once).
                assert!(awaiting_auth && !joined, "a proof nobody asked for");
                awaiting_auth = false;
                if mode.join_after_handshake {
                    c.set_joined();
                    joined = true;
                }
            }
            Frame::Status(_) => {
                assert!(
                    !joined && !hello_seen,
                    "a status request after a hello or joining"
                );
                hello_seen = true;
            }
            Frame::Push { key, .. } => {
                assert!(joined, "a push before joining");
                parts.get(*key).expect("a push for a part of the job");
            }
            Frame::Bye | Frame::RdmaConnect(_) => {
                assert!(joined, "{frame:?} before joining");
            }
            Frame::Error(_) => {
                assert!(
                    joined || awaiting_auth,
                    "an error frame before the handshake"
                );
            }
        }
        if let Frame::RdmaConnect(payload) = &frame {
            decoders(payload);
        }
        frames.push(frame);
    }
    Outcome {
        frames,
        error: None,
        consumed: at,
        at_eof: c.at_eof(),
        slots,
    }
}

/// Runs every pure decoder on `payload`; whatever decodes must re-encode to the same bytes.
pub fn decoders(payload: &[u8]) {
    if let Ok(h) = Hello::decode(payload) {
        assert_eq!(h.encode(), payload, "hello re-encodes differently");
    }
    if let Ok(w) = Welcome::decode(payload) {
        assert_eq!(
            w.encode()[..],
            payload[..],
            "welcome re-encodes differently"
        );
    }
    if let Ok(r) = RdmaParams::decode(payload) {
        assert_eq!(r.encode(), payload, "RDMA parameters re-encode differently");
    }
}

/// Walks `stream` as frames back to back, through the pure decoders only: each header (and its
/// length against no job and against every job), and each payload through every decoder.
pub fn walk(stream: &[u8]) {
    let mut at = 0;
    while let Some(rest) = stream.get(at..) {
        let h = match Header::decode(rest) {
            Ok(h) => h,
            Err(e) => {
                assert!(!e.to_string().is_empty());
                break;
            }
        };
        assert_eq!(
            h.encode()[..],
            rest[..HEADER_LEN],
            "header re-encodes differently"
        );
        let _ = check_len(&h, None);
        for j in 0..3 {
            if check_len(&h, Some(&job(j))).is_ok() && matches!(h.kind, FrameKind::Push) {
                assert_eq!(job(j).get(h.key).map(|p| p.bytes() as u64), Ok(h.len));
            }
        }
        let end = (HEADER_LEN as u64)
            .saturating_add(h.len)
            .min(rest.len() as u64) as usize;
        decoders(&rest[HEADER_LEN..end]);
        if end == rest.len() {
            break;
        }
        at += end;
    }
}

/// The whole harness: never panics on any input unless a rule of the protocol code is broken.
pub fn run(data: &[u8]) {
    let (mode, splits, stream) = match data {
        [m, s, rest @ ..] => (Mode::from_byte(*m), Splits::from_byte(*s), rest),
        _ => (Mode::from_byte(0), Splits::whole(), data),
    };
    let cut = drive(stream, mode, splits);
    let whole = drive(stream, mode, Splits::whole());
    assert_eq!(cut, whole, "how the bytes were split changed the outcome");
    walk(stream);
    decoders(stream);
    // A worker's proof is compared in constant time whatever its length.
    let secret = Secret::new(vec![7; MIN_SECRET_LEN]).expect("long enough");
    let nonce = [1; NONCE_LEN];
    let proof = stream.get(..PROOF_LEN).unwrap_or(stream);
    let _ = secret.verify_worker(&nonce, &nonce, stream, proof);
}

/// A hello for `job(0)`.
pub fn hello(auth: bool) -> Vec<u8> {
    let h = Hello {
        rank: 1,
        workers: 2,
        dims: vec![300, 1],
        rdma: auth,
        auth_nonce: auth.then_some([5; NONCE_LEN]),
    };
    control_frame(FrameKind::Hello, 0, 0, &h.encode())
}

/// A push of part `key` of `job(0)`.
pub fn push(key: u32, clock: u64) -> Vec<u8> {
    let len = job(0).get(key).expect("a part of job 0").bytes();
    control_frame(FrameKind::Push, key, clock, &vec![0x3c; len])
}

/// The seed corpus (`in/`): name and bytes, each beginning with its mode and split bytes.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with = |mode: Mode, split: u8, frames: &[Vec<u8>]| {
        let mut v = vec![mode.to_byte(), split];
        for f in frames {
            v.extend_from_slice(f);
        }
        v
    };
    let fresh = Mode::from_byte(0);
    let join = Mode {
        join_after_handshake: true,
        ..fresh
    };
    let challenge = Mode {
        challenge_after_hello: true,
        ..join
    };
    let joined = Mode {
        joined: true,
        ..fresh
    };
    let rdma = RdmaParams {
        qpn: 17,
        psn: 99,
        lid: 0,
        gid: [0xfe; 16],
        addr: 0x7f00_0000_1000,
        len: 4096,
        rkey: 0x1234,
    };
    let welcome = Welcome {
        part_bytes: 1024,
        push_clock: Default::default(),
    };
    let mut garbage = vec![0u8; 96];
    let mut x = 0x2545_f491_u32;
    for b in &mut garbage {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    vec![
        ("hello", with(fresh, 0, &[hello(false)])),
        (
            "hello_push",
            with(
                join,
                0x2c,
                &[
                    hello(false),
                    push(0, 1),
                    push(1, 1),
                    push(2, 1),
                    control_frame(FrameKind::Bye, 0, 0, &[]),
                ],
            ),
        ),
        (
            "hello_auth_push",
            with(
                challenge,
                0x13,
                &[
                    hello(true),
                    control_frame(FrameKind::Auth, 0, 0, &[9; PROOF_LEN]),
                    control_frame(FrameKind::RdmaConnect, 0, 0, &rdma.encode()),
                    push(2, 7),
                    control_frame(FrameKind::Error, 0, 0, b"out of memory"),
                ],
            ),
        ),
        (
            "status",
            with(
                fresh,
                0x05,
                &[control_frame(FrameKind::Status, 0, 0, &[4; NONCE_LEN])],
            ),
        ),
        (
            "joined_mix",
            with(
                joined,
                0x07,
                &[
                    push(1, 3),
                    control_frame(FrameKind::RdmaConnect, 0, 0, &[]),
                    control_frame(FrameKind::Welcome, 0, 0, &welcome.encode()),
                ],
            ),
        ),
        ("garbage", garbage),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_reach_what_they_are_named_for() {
        let outcome = |name: &str| {
            let (_, bytes) = seeds().into_iter().find(|(n, _)| *n == name).unwrap();
            drive(
                &bytes[2..],
                Mode::from_byte(bytes[0]),
                Splits::from_byte(bytes[1]),
            )
        };
        let hello = outcome("hello");
        assert!(matches!(hello.frames[..], [Frame::Hello(_)]) && hello.error.is_none());
        let pushes = outcome("hello_push");
        assert_eq!(pushes.frames.len(), 5, "{pushes:?}");
        assert_eq!(pushes.frames[4], Frame::Bye);
        let auth = outcome("hello_auth_push");
        assert!(matches!(auth.frames[1], Frame::Auth(_)), "{auth:?}");
        assert!(matches!(auth.frames[4], Frame::Error(_)), "{auth:?}");
        assert!(matches!(
            outcome("status").frames[..],
            [Frame::Status(Some(_))]
        ));
        assert!(matches!(
            outcome("joined_mix").error,
            Some(ProtocolError::Unexpected { .. })
        ));
        assert!(matches!(
            outcome("garbage").error,
            Some(ProtocolError::BadMagic(_))
        ));
    }

    #[test]
    fn modes_and_splits_round_trip_their_bytes() {
        for b in 0..64u8 {
            assert_eq!(Mode::from_byte(b).to_byte(), b);
        }
        for b in 1..=255u8 {
            let mut s = Splits::from_byte(b);
            assert!((0..100).all(|_| (1..=1000).contains(&s.next())));
        }
    }
}
