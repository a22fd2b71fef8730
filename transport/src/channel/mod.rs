//! The TCP machinery under both transports: readiness and timers ([`reactor`]), the sans-IO
//! framing of one connection ([`connection`]), its output queue ([`outbox`]), and the two ends
//! built from them: the server's ([`ServerEnd`]) and the worker's ([`WorkerEnd`]).

pub mod admission;
pub mod connection;
mod handshake;
pub mod outbox;
pub mod reactor;
mod server_end;
mod socket;
mod status;
mod worker_end;

pub use admission::Limits;
pub use server_end::{ListenConfig, ServerEnd, DEFAULT_WRITE_TIMEOUT};
pub use status::request_status;
pub use worker_end::WorkerEnd;
