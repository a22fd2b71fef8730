//! The command line's definition and parsing rules.

use super::*;
use clap::CommandFactory;

#[test]
fn cli_definition_is_valid() {
    Cli::command().debug_assert();
}

fn parses(args: &str) -> bool {
    Cli::try_parse_from(args.split_whitespace()).is_ok()
}

#[test]
fn timeouts_must_be_positive() {
    let server = "hetsync server --workers 2 --dim 4";
    assert!(parses("hetsync server --workers 2 --dims 4,5,6"));
    assert!(!parses("hetsync server --workers 2 --dims 4 --dim 4"));
    assert!(!parses("hetsync server --workers 2"));
    assert!(!parses("hetsync server --workers 2 --dims 4,0"));
    assert!(!parses(&format!("{server} --partition-kib 0")));
    assert!(!parses(&format!("{server} --timeout-ms 0")));
    assert!(parses(&format!("{server} --timeout-ms 0.5")));
    let worker = "hetsync worker --server x:1 --rank 0 --dim 4";
    assert!(!parses(&format!("{worker} --compute-ms -1")));
    assert!(parses(&format!("{worker} --compute-ms 0")));
    assert!(parses(&format!(
        "{worker} --straggle-ms 9 --straggle-prob 0.25"
    )));
    assert!(!parses(&format!(
        "{worker} --straggle-ms 9 --straggle-prob 1.5"
    )));
    assert!(!parses(&format!("{worker} --straggle-prob 0.5")));
    for p in ["naive", "timeout", "adaptive", "bsp", "ssp", "asp"] {
        assert!(parses(&format!("{server} --policy {p}")), "{p}");
    }
    assert!(parses(&format!(
        "{server} --policy ssp --staleness 2 --trace t"
    )));
    assert!(!parses(&format!("{server} --policy ssp --staleness 0")));
    assert!(parses(&format!("{server} --policy timeout --late drop")));
}

#[test]
fn bench_scale_options() {
    assert!(parses("hetsync bench scale"));
    assert!(parses(
        "hetsync bench scale --workers 1000 --dims 16,4 --seconds 2 --json f --policy timeout"
    ));
    assert!(parses(
        "hetsync bench scale --partition-kib 4 --transport tcp"
    ));
    assert!(!parses("hetsync bench scale --workers 0"));
    assert!(!parses("hetsync bench scale --dims 16,0"));
    assert!(!parses("hetsync bench scale --transport rdma"));
    let Command::Bench(BenchCommand::Scale(a)) =
        Cli::parse_from(["hetsync", "bench", "scale"]).command
    else {
        panic!("not bench scale");
    };
    assert_eq!(
        (a.workers, a.policy, a.dims),
        (1000, Policy::Naive, vec![16])
    );
}
