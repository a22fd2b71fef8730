//! `--init-model`: a job started from a model saved by `--save-model` continues exactly where
//! that one stopped (5 + 5 naive rounds end byte-identical to 10), and a file of the wrong size
//! stops the server with a message that says so.

mod common;

use common::{job, read_model, scratch, Proc};

#[test]
fn a_saved_model_continues_training_where_it_stopped() {
    let dir = scratch("init-model");
    let (ten, five, again) = (
        dir.join("ten.f32"),
        dir.join("five.f32"),
        dir.join("again.f32"),
    );
    let dims = ["--dims", "1,1000,70000"];
    let naive = |rounds: &'static str| ["--policy", "naive", "--lr", "0.5", "--rounds", rounds];
    let (w10, w5) = (
        ["--compute-ms", "0", "--rounds", "10"],
        ["--compute-ms", "0", "--rounds", "5"],
    );
    job(&dims, &naive("10"), &[&w10[..]; 4], &ten);
    job(&dims, &naive("5"), &[&w5[..]; 4], &five);
    let init = five.to_str().unwrap();
    let log = job(
        &dims,
        &[
            &naive("5")[..],
            &["--init-model", init, "--partition-kib", "64"],
        ]
        .concat(),
        &[&w5[..]; 4],
        &again,
    );
    assert!(log.contains("finished: 5 rounds"), "{log}");
    let (ten, five, again) = (read_model(&ten), read_model(&five), read_model(&again));
    assert_ne!(five, ten, "5 more rounds must move the model");
    assert_eq!(
        again, ten,
        "5 rounds from the saved 5 must give the 10-round model"
    );
}

#[test]
fn an_initial_model_of_the_wrong_size_is_refused_clearly() {
    let dir = scratch("init-model-bad");
    let short = dir.join("short.f32");
    std::fs::write(&short, [0u8; 4 * 7]).unwrap();
    let ragged = dir.join("ragged.f32");
    std::fs::write(&ragged, [0u8; 10]).unwrap();
    for (file, says) in [
        (
            &short,
            "the initial model has 7 floats; the job's tensors ([3, 5]) have 8",
        ),
        (&ragged, "has 10 bytes, not a whole number of f32"),
    ] {
        let args = [
            "server",
            "--workers",
            "1",
            "--dims",
            "3,5",
            "--listen",
            "127.0.0.1:0",
            "--init-model",
            file.to_str().unwrap(),
        ];
        let mut server = Proc::spawn("server", &args);
        let status = server.wait();
        assert!(!status.success(), "{}", server.log());
        assert!(server.log().contains(says), "{}", server.log());
    }
}
