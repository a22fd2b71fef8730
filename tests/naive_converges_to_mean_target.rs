//! End to end over loopback: 4 worker processes and a `naive` server. With every worker in every
//! round, SGD from zero has a closed form: after k rounds the model is `mean * (1 - (1 - lr)^k)`.

mod common;

use common::{max_abs_diff, read_model, scratch, Proc};
use hetsync::worker::mean_target;

#[test]
fn naive_policy_reaches_the_closed_form_and_the_mean_target() {
    let dir = scratch("naive");
    let model = dir.join("model.f32");
    let (workers, dim, rounds, lr) = (4u32, 10_007usize, 40u32, 0.5f32);
    let (mut server, addr) = Proc::server(&[
        "--workers",
        "4",
        "--dim",
        "10007",
        "--policy",
        "naive",
        "--lr",
        "0.5",
        "--rounds",
        "40",
        "--save-model",
        model.to_str().unwrap(),
    ]);
    let mut ws: Vec<Proc> = (0..workers)
        .map(|r| Proc::worker(&addr, r, dim, &["--compute-ms", "0", "--workers", "4"]))
        .collect();
    server.success();
    for w in &mut ws {
        w.success();
    }
    let log = server.log();
    assert!(log.contains("finished: 40 rounds"), "{log}");
    assert!(log.contains("mean participants 4.00/4"), "{log}");

    let got = read_model(&model);
    let mean = mean_target(workers, 0, dim, 1);
    let decay = 1.0 - (1.0 - lr).powi(rounds as i32);
    let closed: Vec<f32> = mean.iter().map(|m| m * decay).collect();
    assert!(
        max_abs_diff(&got, &closed) < 1e-5,
        "off the closed form by {}",
        max_abs_diff(&got, &closed)
    );
    assert!(
        max_abs_diff(&got, &mean) < 1e-4,
        "off the mean target by {}",
        max_abs_diff(&got, &mean)
    );
}
