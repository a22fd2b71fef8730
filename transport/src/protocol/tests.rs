use super::rdma::{model_imm, split_model_imm, with_key_byte, BlockLayout, STAMP_LEN};
use super::*;

fn parts() -> Parts {
    Parts::new(&[8, 3], 1024).unwrap()
}

const KINDS: [FrameKind; 7] = [
    FrameKind::Hello,
    FrameKind::Welcome,
    FrameKind::Push,
    FrameKind::Model,
    FrameKind::Bye,
    FrameKind::Error,
    FrameKind::RdmaConnect,
];

#[test]
fn header_round_trips() {
    for kind in KINDS {
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
    b[4..6].copy_from_slice(&1u16.to_le_bytes());
    assert_eq!(
        Header::decode(&b),
        Err(ProtocolError::BadVersion { got: 1 })
    );
}

#[test]
fn rejects_unknown_kinds() {
    for k in [0u8, 11, 200, 255] {
        let mut b = Header::new(FrameKind::Push, 0, 0, 32).encode();
        b[6] = k;
        assert_eq!(Header::decode(&b), Err(ProtocolError::UnknownKind(k)));
    }
}

#[test]
fn rejects_reserved_bits() {
    for at in [7, 13] {
        let mut b = Header::new(FrameKind::Bye, 0, 0, 0).encode();
        b[at] = 1;
        assert!(matches!(
            Header::decode(&b),
            Err(ProtocolError::Reserved(_))
        ));
    }
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
fn tensor_frames_must_match_their_part_exactly() {
    let p = parts();
    let ok = |h: Header| check_len(&h, Some(&p));
    assert_eq!(ok(Header::new(FrameKind::Push, 0, 0, 32)), Ok(()));
    assert_eq!(ok(Header::new(FrameKind::Model, 1, 0, 12)), Ok(()));
    for len in [36, 28, 0, u64::MAX] {
        assert!(matches!(
            ok(Header::new(FrameKind::Push, 0, 0, len)),
            Err(ProtocolError::WrongSize { expected: 32, .. })
        ));
    }
    assert_eq!(
        ok(Header::new(FrameKind::Push, 2, 0, 32)),
        Err(ProtocolError::BadKey { key: 2, keys: 2 })
    );
    // Before the handshake no tensor frame is acceptable, whatever its size.
    assert!(matches!(
        check_len(&Header::new(FrameKind::Push, 0, 0, 32), None),
        Err(ProtocolError::Unexpected { .. })
    ));
}

#[test]
fn control_frames_are_bounded() {
    let p = parts();
    let check = |kind, len| check_len(&Header::new(kind, 0, 0, len), Some(&p));
    assert!(matches!(
        check(FrameKind::Hello, Hello::MAX_LEN as u64 + 1),
        Err(ProtocolError::TooLong { .. })
    ));
    assert_eq!(check(FrameKind::Hello, Hello::MAX_LEN as u64), Ok(()));
    assert!(matches!(
        check(FrameKind::Error, MAX_CONTROL_PAYLOAD + 1),
        Err(ProtocolError::TooLong { .. })
    ));
    assert!(matches!(
        check(FrameKind::Bye, 1),
        Err(ProtocolError::TooLong { max: 0, .. })
    ));
    assert!(matches!(
        check(FrameKind::Welcome, 4),
        Err(ProtocolError::WrongSize { expected: 12, .. })
    ));
    assert_eq!(check(FrameKind::Welcome, 12), Ok(()));
    assert_eq!(check(FrameKind::Error, 100), Ok(()));
}

#[test]
fn hello_round_trips() {
    let h = Hello {
        rank: 3,
        workers: 4,
        dims: vec![1 << 20, 5],
        rdma: true,
        auth_nonce: None,
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
        auth_nonce: None,
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
        auth_nonce: None,
    };
    assert_eq!(Hello::decode(&h.encode()), Ok(h));
}

#[test]
fn hello_rejects_impossible_jobs() {
    let hello = |rank, workers, dims: Vec<u64>| Hello {
        rank,
        workers,
        dims,
        rdma: false,
        auth_nonce: None,
    };
    for h in [
        hello(4, 4, vec![1]),
        hello(1, 1, vec![1]),
        hello(0, 1, vec![0]),
        hello(0, 1, vec![]),
    ] {
        assert!(
            matches!(Hello::decode(&h.encode()), Err(ProtocolError::BadHello(_))),
            "{h:?} accepted"
        );
    }
    let mut many = hello(0, 1, vec![1]).encode();
    many[8..12].copy_from_slice(&(MAX_TENSORS as u32 + 1).to_le_bytes());
    assert!(matches!(
        Hello::decode(&many),
        Err(ProtocolError::BadHello(_))
    ));
    // The largest hello (with a nonce) fits its bound exactly, and round-trips.
    let largest = Hello {
        auth_nonce: Some([7; NONCE_LEN]),
        ..hello(0, 1, vec![1; MAX_TENSORS])
    };
    assert_eq!(largest.encode().len(), Hello::MAX_LEN);
    assert_eq!(Hello::decode(&largest.encode()), Ok(largest.clone()));
    // A nonce announced but cut short, or one not announced but present, is refused.
    let mut short = largest.encode();
    short.pop();
    assert!(Hello::decode(&short).is_err());
    let mut extra = hello(0, 1, vec![1]).encode();
    extra.extend_from_slice(&[7; NONCE_LEN]);
    assert!(Hello::decode(&extra).is_err());
}

#[test]
fn welcome_round_trips_and_rejects_odd_partitions() {
    for push_clock in [PushClock::ModelRound, PushClock::WorkerClock] {
        let w = Welcome {
            part_bytes: 65536,
            push_clock,
        };
        assert_eq!(Welcome::decode(&w.encode()), Ok(w));
    }
    for bad in [0u64, 1000, 1025, 1 << 31] {
        let mut b = [0u8; Welcome::LEN];
        b[..8].copy_from_slice(&bad.to_le_bytes());
        assert!(Welcome::decode(&b).is_err(), "{bad}");
    }
    let mut unknown_flag = Welcome {
        part_bytes: 65536,
        push_clock: PushClock::ModelRound,
    }
    .encode();
    unknown_flag[8] = 2;
    assert!(Welcome::decode(&unknown_flag).is_err());
    assert!(Welcome::decode(&[0; 8]).is_err());
}

#[test]
fn parts_cut_tensors_into_contiguous_runs_numbered_across_tensors() {
    // 1, 1000 and 300,000 floats in parts of 64 KiB (16,384 floats).
    let p = Parts::new(&[1, 1000, 300_000], 64 * 1024).unwrap();
    assert_eq!(p.len(), 1 + 1 + 19);
    assert_eq!(p.of_tensor(0), 0..1);
    assert_eq!(p.of_tensor(1), 1..2);
    assert_eq!(p.of_tensor(2), 2..21);
    let mut next = 0;
    for k in p.of_tensor(2) {
        let part = p[k];
        assert_eq!((part.tensor, part.start), (2, next));
        assert!(part.bytes() <= 64 * 1024);
        next += part.len;
    }
    assert_eq!(next, 300_000, "the parts are the tensor");
    assert_eq!(p[20].len, 300_000 - 18 * 16_384);
    // Without partitions worth the name, one part per tensor.
    let whole = Parts::new(&[1, 1000, 300_000], 1 << 30).unwrap();
    assert_eq!(whole.len(), 3);
    assert!(Parts::new(&[4], 1000).is_err(), "not a multiple of 1 KiB");
    assert!(Parts::new(&[4, 0], 1024).is_err(), "an empty tensor");
    assert!(Parts::new(&[1 << 40], 1024).is_err(), "too many parts");
}

#[test]
fn block_layout_keeps_tensors_contiguous_and_parts_disjoint() {
    let p = Parts::new(&[1, 1000, 300_000], 64 * 1024).unwrap();
    let b = BlockLayout::new(&p);
    let mut ranges: Vec<_> = (0..p.len() as u32).map(|k| b.stamp(k)).collect();
    for t in 0..3 {
        let keys = p.of_tensor(t);
        let whole = b.tensor(t, p.dims()[t] * 4);
        assert_eq!(whole.start % 64, 0);
        assert_eq!(b.data(keys.start).start, whole.start);
        assert_eq!(b.data(keys.end - 1).end, whole.end);
        for k in keys {
            assert_eq!(b.stamp(k).len(), STAMP_LEN);
            ranges.push(b.data(k));
        }
    }
    ranges.sort_by_key(|r| r.start);
    for pair in ranges.windows(2) {
        assert!(pair[0].end <= pair[1].start, "overlap {pair:?}");
    }
    assert!(ranges.last().unwrap().end <= b.len());
}

#[test]
fn rdma_params_round_trip_and_reject_truncation() {
    let p = RdmaParams {
        qpn: 0x11,
        psn: 0x22,
        lid: 3,
        gid: [7; 16],
        addr: 0x7f00_0000_1000,
        len: 4096,
        rkey: 0xabcd,
    };
    let b = p.encode();
    assert_eq!(b.len(), RdmaParams::LEN);
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
fn an_rdma_answer_carries_one_window_key_per_part_exactly() {
    let params = RdmaParams {
        rkey: 0,
        ..RdmaParams::unable()
    };
    let a = RdmaAccept {
        params,
        windows: vec![0x1234_5601, 0xfeed_ee02, 7],
    };
    let b = a.encode();
    assert_eq!(b.len(), RdmaAccept::len(3));
    assert_eq!(RdmaAccept::decode(&b, 3), Ok(a));
    // The worker knows its job's part count: one key more or less is refused.
    assert!(RdmaAccept::decode(&b, 2).is_err());
    assert!(RdmaAccept::decode(&b, 4).is_err());
    assert!(RdmaAccept::decode(&b[..b.len() - 1], 3).is_err());
    // The largest answer fits the frame limit for its kind.
    let h = Header::new(
        FrameKind::RdmaConnect,
        0,
        0,
        RdmaAccept::len(MAX_RDMA_PARTS) as u64,
    );
    assert_eq!(check_len(&h, None), Ok(()));
}

#[test]
fn a_model_immediate_carries_the_part_and_the_new_key_byte() {
    let last = (MAX_PARTS - 1) as u32;
    for (key, rkey) in [(0, 0x1234_56ffu32), (5, 0xabcd_ef00), (last, 0x42)] {
        let (k, byte) = split_model_imm(model_imm(key, rkey));
        assert_eq!((k, byte), (key, rkey as u8));
        assert_eq!(with_key_byte(rkey & !0xff, byte), rkey);
    }
    assert!(RdmaParams::unable().is_unable());
}

#[test]
fn decoding_random_bytes_never_panics() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let p = parts();
    for _ in 0..20_000 {
        let mut b = [0u8; HEADER_LEN + 48];
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
            let _ = check_len(&h, Some(&p));
            let _ = check_len(&h, None);
        }
        let _ = Hello::decode(&b[HEADER_LEN..]);
        let _ = Welcome::decode(&b[HEADER_LEN..HEADER_LEN + Welcome::LEN]);
        let _ = RdmaParams::decode(&b[HEADER_LEN..]);
    }
}
