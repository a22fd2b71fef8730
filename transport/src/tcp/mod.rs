//! The TCP transport: every byte over the channel's sockets. The server side is the channel's
//! [`ServerEnd`](crate::channel::ServerEnd) declining every upgrade offer; the worker side reads
//! models straight into, and writes gradients from, buffers it owns.

mod client;
mod pipeline;
mod server;

pub use client::TcpClient;
pub use server::TcpServer;
