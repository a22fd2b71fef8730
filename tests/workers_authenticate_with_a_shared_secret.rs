//! With `--secret-file`, server and workers prove to each other that they know the job's secret
//! before a worker is admitted: a worker without it, with another one, or a raw peer with a
//! forged proof is refused with a clear reason, and the workers that know it train as usual.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{read_frame, read_model, scratch, Proc};
use hetsync::protocol::{control_frame, FrameKind, Hello, CHALLENGE_LEN};

const DIM: usize = 1000;

fn secret_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn only_workers_that_know_the_secret_are_admitted() {
    let dir = scratch("auth");
    let (good, bad, model) = (dir.join("good"), dir.join("bad"), dir.join("model.f32"));
    secret_file(&good, "this job's secret: 7f3a9c0e1b2d4f68\n");
    secret_file(&bad, "another job's secret: 0000000000\n");
    let (mut server, addr) = Proc::server(&[
        "--workers",
        "4",
        "--dim",
        "1000",
        "--policy",
        "naive",
        "--lr",
        "0.5",
        "--rounds",
        "20",
        "--save-model",
        model.to_str().unwrap(),
        "--secret-file",
        good.to_str().unwrap(),
    ]);
    assert!(server.log().contains("workers must know the job's secret"));
    let refused = |extra: &[&str]| {
        let mut w = Proc::worker(&addr, 0, DIM, extra);
        assert!(!w.wait().success(), "admitted with {extra:?}");
        w.log()
    };
    let none = refused(&[]);
    assert!(
        none.contains("admits only workers that know the job's secret"),
        "{none}"
    );
    let other = refused(&["--secret-file", bad.to_str().unwrap()]);
    assert!(other.contains("authentication failed"), "{other}");

    // A raw peer that asks to authenticate and answers the challenge with a forged proof.
    let mut raw = TcpStream::connect(&addr).unwrap();
    raw.set_read_timeout(Some(common::HANG)).unwrap();
    let hello = Hello {
        rank: 1,
        workers: 4,
        dims: vec![DIM as u64],
        rdma: false,
        auth_nonce: Some([3; 32]),
    };
    raw.write_all(&control_frame(FrameKind::Hello, 0, 0, &hello.encode()))
        .unwrap();
    let (h, challenge) = read_frame(&mut raw);
    assert_eq!(
        (h.kind, challenge.len()),
        (FrameKind::Challenge, CHALLENGE_LEN)
    );
    raw.write_all(&control_frame(FrameKind::Auth, 0, 0, &[0; 32]))
        .unwrap();
    let (h, why) = read_frame(&mut raw);
    assert_eq!(h.kind, FrameKind::Error);
    let why = String::from_utf8(why).unwrap();
    assert!(why.contains("does not know the job's secret"), "{why}");
    // It learnt nothing about the job: no welcome, no partition size, no rank taken.

    // A status client that knows the secret but answers its challenge twice: the server
    // carries on (it used to panic here).
    let secret =
        hetsync_transport::auth::Secret::new(b"this job's secret: 7f3a9c0e1b2d4f68".to_vec())
            .unwrap();
    let mut raw = TcpStream::connect(&addr).unwrap();
    raw.set_read_timeout(Some(common::HANG)).unwrap();
    let ours = [9u8; 32];
    raw.write_all(&control_frame(FrameKind::Status, 0, 0, &ours))
        .unwrap();
    let (h, challenge) = read_frame(&mut raw);
    assert_eq!(h.kind, FrameKind::Challenge);
    let theirs: [u8; 32] = challenge[..32].try_into().unwrap();
    let proof = secret.worker_proof(&theirs, &ours, b"status");
    let answer = control_frame(FrameKind::Auth, 0, 0, &proof);
    raw.write_all(&[answer.clone(), answer].concat()).unwrap();
    // The second answer is a protocol violation: the client is dropped (its report may or may
    // not have gone out first), and nothing else happens.
    let (h, body) = read_frame(&mut raw);
    match h.kind {
        FrameKind::Status => assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok()),
        FrameKind::Error => assert!(String::from_utf8_lossy(&body).contains("challenge")),
        other => panic!("unexpected {other:?}"),
    }
    // Its status, too, is for those who know the secret; they see the refusals counted.
    let denied = common::status(&addr, &[]).unwrap_err();
    assert!(
        denied.contains("only to those who know the job's secret"),
        "{denied}"
    );
    let v = common::status(&addr, &["--secret-file", good.to_str().unwrap()]).unwrap();
    assert_eq!(
        (v["policy"].as_str(), v["started"].as_bool()),
        (Some("naive"), Some(false))
    );
    assert!(
        v["stats"]["refused_by_reason"]["authentication"].as_u64() >= Some(3),
        "{v}"
    );
    let secret = ["--secret-file", good.to_str().unwrap(), "--compute-ms", "0"];
    let mut ws: Vec<Proc> = (0..4)
        .map(|r| Proc::worker(&addr, r, DIM, &secret))
        .collect();
    for w in &mut ws {
        w.success();
    }
    server.success();
    common::assert_closed_form(&read_model(&model), 4, 20, 0.5);
    let log = server.log();
    assert!(log.contains("authentication failed"), "{log}");
}

#[test]
fn a_worker_with_a_secret_refuses_a_server_without_one() {
    let dir = scratch("auth-server-none");
    let good = dir.join("good");
    secret_file(&good, "this job's secret: 7f3a9c0e1b2d4f68\n");
    let (mut server, addr) = Proc::server(&["--workers", "1", "--dim", "1000", "--rounds", "1"]);
    let mut w = Proc::worker(&addr, 0, DIM, &["--secret-file", good.to_str().unwrap()]);
    assert!(!w.wait().success());
    assert!(
        w.log().contains("does not authenticate workers"),
        "{}",
        w.log()
    );
    // A short secret file is refused before anything is sent.
    let short = dir.join("short");
    secret_file(&short, "tiny\n");
    let mut w = Proc::worker(&addr, 0, DIM, &["--secret-file", short.to_str().unwrap()]);
    assert!(!w.wait().success());
    assert!(w.log().contains("at least 16"), "{}", w.log());
    let mut ok = Proc::worker(&addr, 0, DIM, &["--compute-ms", "0"]);
    ok.success();
    server.success();
}

#[test]
fn a_worker_refuses_a_server_that_cannot_prove_the_secret() {
    let dir = scratch("auth-fake-server");
    let good = dir.join("good");
    secret_file(&good, "this job's secret: 7f3a9c0e1b2d4f68\n");
    let fake = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = fake.local_addr().unwrap().to_string();
    let mut w = Proc::worker(&addr, 0, DIM, &["--secret-file", good.to_str().unwrap()]);
    let (mut s, _) = fake.accept().unwrap();
    s.set_read_timeout(Some(common::HANG)).unwrap();
    let (h, hello) = read_frame(&mut s);
    assert_eq!(h.kind, FrameKind::Hello);
    assert!(Hello::decode(&hello).unwrap().auth_nonce.is_some());
    // A challenge whose proof was made without the secret.
    s.write_all(&control_frame(
        FrameKind::Challenge,
        0,
        0,
        &[5; CHALLENGE_LEN],
    ))
    .unwrap();
    let (h, why) = read_frame(&mut s);
    assert_eq!(
        h.kind,
        FrameKind::Error,
        "the worker answered a forged challenge"
    );
    assert!(String::from_utf8(why)
        .unwrap()
        .contains("server's proof does not match"));
    assert!(!w.wait().success());
}
