//! Mutual authentication of a worker and the server with a shared secret (`--secret-file`):
//! HMAC-SHA256 over nonces from both sides, before the server accepts a rank, allocates
//! anything for the peer or says anything about the job.
//!
//! 1. The worker's hello carries a fresh random nonce `nc` (and says it wants to authenticate).
//! 2. The server answers with a challenge: its own nonce `ns` and
//!    `HMAC(secret, "hetsync-server" | nc | ns | hello)`, proving it knows the secret.
//! 3. The worker checks that proof and answers with `HMAC(secret, "hetsync-worker" | ns | nc |
//!    hello)`; the server checks it and only then admits the hello.
//!
//! Both proofs bind both nonces and the hello, and are told apart by their labels, so neither
//! side's answer can be replayed, reflected or moved to another hello. Comparisons are constant
//! time (`hmac`'s `verify_slice`). The secret itself never travels. Gradients and models travel
//! unencrypted; what this protects is the job: who may take a rank, push into the model, and
//! learn the RDMA addresses and keys of its memory.

use std::fmt;
use std::io;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub use crate::protocol::{NONCE_LEN, PROOF_LEN};

/// The shortest secret accepted.
pub const MIN_SECRET_LEN: usize = 16;

/// A nonce.
pub type Nonce = [u8; NONCE_LEN];
/// A proof of knowing the secret.
pub type Proof = [u8; PROOF_LEN];

/// The job's shared secret. Its `Debug` does not show it.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// Why a secret file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// It could not be read.
    #[error("reading the secret file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// It is too short to be a secret.
    #[error("the secret file {path} holds {len} bytes; use at least {MIN_SECRET_LEN} random ones (e.g. `head -c 32 /dev/urandom | base64 > FILE`)")]
    TooShort {
        /// The file.
        path: String,
        /// Its length (without a final newline).
        len: usize,
    },
}

fn mac(key: &[u8], label: &[u8], parts: [&[u8]; 3]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
    m.update(label);
    for p in parts {
        m.update(p);
    }
    m
}

const SERVER: &[u8] = b"hetsync-server";
const WORKER: &[u8] = b"hetsync-worker";

impl Secret {
    /// A secret of these bytes (at least [`MIN_SECRET_LEN`]).
    pub fn new(bytes: Vec<u8>) -> Option<Self> {
        (bytes.len() >= MIN_SECRET_LEN).then_some(Self(bytes))
    }

    /// Reads a secret file: its bytes, without one final newline. Also returns a warning when
    /// others than its owner may read it.
    pub fn from_file(path: &Path) -> Result<(Self, Option<String>), SecretError> {
        let shown = path.display().to_string();
        let mut bytes = std::fs::read(path).map_err(|source| SecretError::Read {
            path: shown.clone(),
            source,
        })?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        let len = bytes.len();
        let secret = Self::new(bytes).ok_or(SecretError::TooShort {
            path: shown.clone(),
            len,
        })?;
        let warning = {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(path)
                .ok()
                .filter(|m| m.permissions().mode() & 0o077 != 0)
                .map(|_| format!("the secret file {shown} may be read by others than its owner (chmod 600 it)"))
        };
        Ok((secret, warning))
    }

    /// The server's proof for the worker nonce `nc`, its own nonce `ns` and the hello payload.
    pub fn server_proof(&self, nc: &Nonce, ns: &Nonce, hello: &[u8]) -> Proof {
        mac(&self.0, SERVER, [nc, ns, hello])
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `proof` is the server's proof for these (constant time).
    pub fn verify_server(&self, nc: &Nonce, ns: &Nonce, hello: &[u8], proof: &[u8]) -> bool {
        mac(&self.0, SERVER, [nc, ns, hello])
            .verify_slice(proof)
            .is_ok()
    }

    /// The worker's proof for the server nonce `ns`, its own nonce `nc` and its hello payload.
    pub fn worker_proof(&self, ns: &Nonce, nc: &Nonce, hello: &[u8]) -> Proof {
        mac(&self.0, WORKER, [ns, nc, hello])
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `proof` is the worker's proof for these (constant time).
    pub fn verify_worker(&self, ns: &Nonce, nc: &Nonce, hello: &[u8], proof: &[u8]) -> bool {
        mac(&self.0, WORKER, [ns, nc, hello])
            .verify_slice(proof)
            .is_ok()
    }
}

/// A fresh random nonce from the operating system.
pub fn nonce() -> io::Result<Nonce> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| io::Error::other(format!("getrandom: {e}")))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_for_the_same_secret_nonces_hello_and_side() {
        let s = Secret::new(b"0123456789abcdef".to_vec()).unwrap();
        let other = Secret::new(b"0123456789abcdeX".to_vec()).unwrap();
        let (nc, ns) = (nonce().unwrap(), nonce().unwrap());
        assert_ne!(nc, ns, "nonces are random");
        let hello = b"a hello";
        let p = s.server_proof(&nc, &ns, hello);
        assert!(s.verify_server(&nc, &ns, hello, &p));
        assert!(!other.verify_server(&nc, &ns, hello, &p));
        assert!(!s.verify_server(&ns, &nc, hello, &p), "nonces swapped");
        assert!(!s.verify_server(&nc, &ns, b"another", &p), "another hello");
        assert!(
            !s.verify_worker(&ns, &nc, hello, &p),
            "a server proof is no worker proof"
        );
        let w = s.worker_proof(&ns, &nc, hello);
        assert!(s.verify_worker(&ns, &nc, hello, &w));
        assert!(!s.verify_worker(&ns, &nc, hello, &w[..31]), "truncated");
        assert!(Secret::new(vec![7; 15]).is_none(), "too short");
        assert_eq!(format!("{s:?}"), "Secret(16 bytes)", "never printed");
    }

    #[test]
    fn a_secret_file_loses_one_final_newline_and_must_be_long_enough() {
        let dir = std::env::temp_dir().join(format!("hetsync-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("s");
        std::fs::write(&f, b"0123456789abcdef\n").unwrap();
        let (a, _) = Secret::from_file(&f).unwrap();
        let b = Secret::new(b"0123456789abcdef".to_vec()).unwrap();
        let (nc, ns) = (nonce().unwrap(), nonce().unwrap());
        assert!(b.verify_worker(&ns, &nc, b"h", &a.worker_proof(&ns, &nc, b"h")));
        std::fs::write(&f, b"short\n").unwrap();
        assert!(matches!(
            Secret::from_file(&f),
            Err(SecretError::TooShort { len: 5, .. })
        ));
        assert!(Secret::from_file(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
