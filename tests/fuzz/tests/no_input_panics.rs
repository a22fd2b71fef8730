//! Property tests: any byte sequence a peer sends either decodes into frames or ends on a typed
//! [`ProtocolError`], never a panic, whatever the server's state and however the bytes are split.
//!
//! Each input goes through the whole fuzz harness ([`hetsync_fuzz::run`]): the connection fed
//! in the input's pieces and whole (both must agree), and every pure decoder. Inputs come from
//! a fixed xorshift generator, so a failure replays exactly; the failing input is printed in hex
//! and can be saved to a file and replayed with `cargo run --bin connection -- FILE`.

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};

use hetsync_fuzz::{drive, hello, job, push, run, seeds, Mode, Splits};
use hetsync_transport::channel::connection::Frame;
use hetsync_transport::protocol::{
    Hello, ProtocolError, RdmaParams, Welcome, MAGIC, NONCE_LEN, PROOF_LEN, PROTOCOL_VERSION,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    fn pick<T: Copy>(&mut self, of: &[T]) -> T {
        of[self.below(of.len())]
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs the harness on `input`; on a panic, fails the test with the input in hex.
fn check(input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| run(input))).is_err() {
        panic!(
            "panicked on this input ({} bytes; save it with `xxd -r -p` and replay it with \
             `cargo run --bin connection -- FILE`):\n{}",
            input.len(),
            hex(input)
        );
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let count = 200_000;
    for _ in 0..count {
        let len = if rng.below(8) == 0 {
            rng.below(2048)
        } else {
            rng.below(80)
        };
        let mut input = rng.bytes(len);
        // Half of them start with a valid magic and version, to get past the first check.
        if len >= 8 && rng.below(2) == 0 {
            input[2..6].copy_from_slice(&MAGIC);
            input[6..8].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        }
        check(&input);
    }
    println!("random byte strings: {count} inputs, no panic");
}

/// One frame, mostly well formed: a header whose fields are each valid more often than not, and
/// a payload of about the declared length (a valid hello, nonce, proof, welcome or RDMA
/// parameters when the kind calls for one).
fn frame(rng: &mut Rng) -> Vec<u8> {
    let kind = if rng.below(20) == 0 {
        rng.next() as u8
    } else {
        1 + rng.below(10) as u8
    };
    let key = if rng.below(10) == 0 {
        rng.next() as u32
    } else {
        rng.below(4) as u32
    };
    let parts = job(rng.below(3) as u8);
    let part_len = parts.get(key).map(|p| p.bytes()).unwrap_or(4);
    let mut payload = match kind {
        1 => {
            let n = 1 + rng.below(3);
            let workers = rng.below(4) as u32;
            let h = Hello {
                rank: rng.below(4) as u32,
                workers,
                dims: (0..n).map(|_| rng.pick(&[300, 1, 512, 2, 0])).collect(),
                rdma: rng.below(2) == 0,
                auth_nonce: (rng.below(2) == 0).then_some([3; NONCE_LEN]),
            };
            h.encode()
        }
        2 => Welcome {
            part_bytes: rng.pick(&[1024, 2048, 1000, 0]),
            push_clock: Default::default(),
        }
        .encode()
        .to_vec(),
        3 | 4 => vec![0x5a; part_len],
        7 if rng.below(2) == 0 => RdmaParams {
            qpn: 1,
            psn: 2,
            lid: 3,
            gid: [4; 16],
            addr: 5,
            len: 6,
            rkey: 7,
        }
        .encode(),
        8 => rng.bytes(NONCE_LEN + PROOF_LEN),
        9 => rng.bytes(PROOF_LEN),
        10 => {
            let n = rng.pick(&[0, NONCE_LEN, 5]);
            rng.bytes(n)
        }
        _ => {
            let n = rng.pick(&[0, 1, 13, 46]);
            rng.bytes(n)
        }
    };
    // Now and then a payload a little off its right size.
    match rng.below(12) {
        0 => payload.truncate(payload.len().saturating_sub(1)),
        1 => payload.push(0),
        _ => {}
    }
    let len = match rng.below(40) {
        0 => rng.next(),
        1 => u64::MAX,
        _ => payload.len() as u64,
    };
    let mut f = Vec::with_capacity(32 + payload.len());
    if rng.below(40) == 0 {
        f.extend_from_slice(&rng.bytes(4));
    } else {
        f.extend_from_slice(&MAGIC);
    }
    let version = if rng.below(40) == 0 {
        rng.next() as u16
    } else {
        PROTOCOL_VERSION
    };
    f.extend_from_slice(&version.to_le_bytes());
    f.push(kind);
    f.push(if rng.below(40) == 0 { 1 } else { 0 });
    f.extend_from_slice(&key.to_le_bytes());
    let reserved: u32 = if rng.below(40) == 0 { 1 } else { 0 };
    f.extend_from_slice(&reserved.to_le_bytes());
    f.extend_from_slice(&rng.next().to_le_bytes());
    f.extend_from_slice(&len.to_le_bytes());
    f.extend_from_slice(&payload);
    f
}

fn error_name(e: &ProtocolError) -> &'static str {
    match e {
        ProtocolError::BadMagic(_) => "BadMagic",
        ProtocolError::BadVersion { .. } => "BadVersion",
        ProtocolError::UnknownKind(_) => "UnknownKind",
        ProtocolError::Reserved(_) => "Reserved",
        ProtocolError::Truncated { .. } => "Truncated",
        ProtocolError::TooLong { .. } => "TooLong",
        ProtocolError::WrongSize { .. } => "WrongSize",
        ProtocolError::BadKey { .. } => "BadKey",
        ProtocolError::Unexpected { .. } => "Unexpected",
        ProtocolError::BadHello(_) => "BadHello",
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "Hello",
        Frame::Push { .. } => "Push",
        Frame::Bye => "Bye",
        Frame::Error(_) => "Error",
        Frame::RdmaConnect(_) => "RdmaConnect",
        Frame::Auth(_) => "Auth",
        Frame::Status(_) => "Status",
    }
}

#[test]
fn random_frame_sequences_decode_or_end_on_a_typed_error() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let count = 100_000;
    let (mut frames, mut errors) = (0usize, 0usize);
    let mut frame_kinds = BTreeSet::new();
    let mut error_kinds = BTreeSet::new();
    for _ in 0..count {
        let mut input = vec![rng.next() as u8, rng.next() as u8];
        for _ in 0..1 + rng.below(5) {
            input.extend(frame(&mut rng));
        }
        // Now and then the peer hangs up early.
        if rng.below(8) == 0 {
            input.truncate(rng.below(input.len() + 1));
        }
        check(&input);
        if input.len() >= 2 {
            let o = drive(&input[2..], Mode::from_byte(input[0]), Splits::whole());
            frames += o.frames.len();
            frame_kinds.extend(o.frames.iter().map(frame_name));
            if let Some(e) = &o.error {
                errors += 1;
                error_kinds.insert(error_name(e));
            }
        }
    }
    println!(
        "random frame sequences: {count} inputs, {frames} frames decoded ({frame_kinds:?}), \
         {errors} typed errors ({error_kinds:?}), no panic"
    );
    // The generator reaches every frame and every error, or this test proves little.
    assert_eq!(frame_kinds.len(), 7, "frames reached: {frame_kinds:?}");
    assert_eq!(error_kinds.len(), 10, "errors reached: {error_kinds:?}");
}

#[test]
fn mutations_of_valid_conversations_never_panic() {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut corpus: Vec<Vec<u8>> = seeds().into_iter().map(|(_, b)| b).collect();
    let mut conversation = vec![0x20, 0x00];
    conversation.extend(hello(false));
    conversation.extend(push(1, 2));
    conversation.extend(push(2, 3));
    corpus.push(conversation);
    let count = 100_000;
    for _ in 0..count {
        let mut input = corpus[rng.below(corpus.len())].clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(input.len().max(1));
            match rng.below(7) {
                0 if !input.is_empty() => input[at] ^= 1 << rng.below(8),
                1 if !input.is_empty() => {
                    input[at] = rng.pick(&[0, 1, 2, 3, 31, 32, 33, 0x7f, 0xff])
                }
                2 if input.len() >= at + 8 => {
                    let v: u64 = rng.pick(&[0, 1, 4, 176, 1024, 1 << 32, u64::MAX]);
                    input[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
                3 => input.truncate(at),
                4 => {
                    let n = rng.below(40);
                    let extra = rng.bytes(n);
                    input.splice(at..at, extra);
                }
                5 => {
                    let other = &corpus[rng.below(corpus.len())];
                    let from = rng.below(other.len());
                    let tail = other[from..].to_vec();
                    input.truncate(at);
                    input.extend(tail);
                }
                _ => {
                    // Another mode byte: the same bytes against another state of the server.
                    let mode = rng.next() as u8;
                    if let Some(b) = input.first_mut() {
                        *b = mode;
                    }
                }
            }
        }
        check(&input);
    }
    println!("mutations of valid conversations: {count} inputs, no panic");
}

#[test]
fn the_seed_corpus_is_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("in");
    for (name, bytes) in seeds() {
        let on_disk = std::fs::read(dir.join(name)).unwrap_or_default();
        assert!(
            on_disk == bytes,
            "in/{name} is not what the encoders make now: run `cargo run --example gen_seeds`"
        );
        check(&bytes);
    }
}
