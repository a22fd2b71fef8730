//! Whether a worker's hello fits the job: its rank, the job size and every tensor's size, with a
//! refusal that says which one differs and what to pass.

use crate::protocol::Hello;

/// Admits `hello` into a job of `workers` workers and tensors of `dims` floats, or says why not.
/// `held`: a live connection holds the hello's rank already (who, is not told: a stranger must
/// learn nothing of the job's peers).
pub(super) fn admit(
    hello: &Hello,
    workers: usize,
    dims: &[usize],
    held: bool,
) -> Result<(), String> {
    if hello.rank as usize >= workers {
        return Err(format!(
            "rank {} is out of range: the job has {workers} workers (ranks 0..{})",
            hello.rank,
            workers - 1
        ));
    }
    if hello.workers != 0 && hello.workers as usize != workers {
        return Err(format!(
            "job size mismatch: the worker expects {} workers, the server has {workers} (pass the same --workers to both)",
            hello.workers
        ));
    }
    if hello.dims.len() != dims.len() {
        return Err(format!(
            "tensor count mismatch: the worker has {} tensors, the server {} (pass the same --dims to both)",
            hello.dims.len(),
            dims.len()
        ));
    }
    if let Some(t) = (0..dims.len()).find(|&t| hello.dims[t] != dims[t] as u64) {
        return Err(format!(
            "tensor size mismatch: tensor {t} has {} floats on the worker, {} on the server (pass the same --dims to both)",
            hello.dims[t], dims[t]
        ));
    }
    if held {
        return Err(format!(
            "rank {} is already connected (each worker needs its own --rank)",
            hello.rank
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(rank: u32, workers: u32, dims: &[u64]) -> Hello {
        Hello {
            rank,
            workers,
            dims: dims.to_vec(),
            rdma: false,
            auth_nonce: None,
        }
    }

    #[test]
    fn refusals_say_what_differs() {
        let dims = [1, 1000, 300_000];
        let ok = hello(3, 4, &[1, 1000, 300_000]);
        assert_eq!(admit(&ok, 4, &dims, false), Ok(()));
        assert_eq!(
            admit(&hello(3, 0, &[1, 1000, 300_000]), 4, &dims, false),
            Ok(())
        );
        let why = |h: &Hello| admit(h, 4, &dims, false).unwrap_err();
        assert!(why(&hello(4, 0, &[1, 1000, 300_000])).contains("rank 4 is out of range"));
        assert!(why(&hello(0, 8, &[1, 1000, 300_000])).contains("expects 8 workers"));
        assert!(why(&hello(0, 4, &[1, 1000])).contains("the worker has 2 tensors, the server 3"));
        let size = why(&hello(0, 4, &[1, 1001, 300_000]));
        assert!(
            size.contains("tensor 1 has 1001 floats on the worker, 1000 on the server"),
            "{size}"
        );
        let taken = admit(&ok, 4, &dims, true).unwrap_err();
        assert!(taken.contains("rank 3 is already connected"), "{taken}");
        assert!(
            !taken.contains("from"),
            "the holder's address leaked: {taken}"
        );
    }
}
