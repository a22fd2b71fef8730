//! Writes the seed corpus `in/` from the protocol's own encoders ([`hetsync_fuzz::seeds`]):
//! `cargo run --example gen_seeds` (the test `the_seed_corpus_is_current` says when it is due).

fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("in");
    std::fs::create_dir_all(&dir)?;
    for (name, bytes) in hetsync_fuzz::seeds() {
        let path = dir.join(name);
        std::fs::write(&path, &bytes)?;
        println!("{}: {} bytes", path.display(), bytes.len());
    }
    Ok(())
}
