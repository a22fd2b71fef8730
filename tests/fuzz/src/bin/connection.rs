//! The AFL target: every input goes through [`hetsync_fuzz::run`], which never panics unless a
//! rule of the protocol code is broken.
//!
//! Built by `cargo afl build` (which sets `--cfg fuzzing`), it runs under `cargo afl fuzz`, and
//! replays one input given on standard input. Built by plain `cargo build`, it replays the files
//! named on its command line (or standard input), with the panic message and a backtrace as
//! usual: `cargo run --bin connection -- out/default/crashes/id:...`.

#[cfg(fuzzing)]
fn main() {
    afl::fuzz!(|data: &[u8]| {
        hetsync_fuzz::run(data);
    });
}

#[cfg(not(fuzzing))]
fn main() -> std::io::Result<()> {
    use std::io::Read;
    let files: Vec<String> = std::env::args().skip(1).collect();
    if files.is_empty() {
        let mut data = Vec::new();
        std::io::stdin().read_to_end(&mut data)?;
        hetsync_fuzz::run(&data);
        println!("stdin: {} bytes, no panic", data.len());
    }
    for f in files {
        let data = std::fs::read(&f)?;
        hetsync_fuzz::run(&data);
        println!("{f}: {} bytes, no panic", data.len());
    }
    Ok(())
}
