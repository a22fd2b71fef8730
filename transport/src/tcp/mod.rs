//! The TCP transport: a non-blocking epoll server ([`TcpServer`]) and a blocking worker link
//! ([`TcpClient`]). Sockets come from socket2, the event loop from nix's `epoll`.

mod client;
mod server;

pub use client::TcpClient;
pub use server::{TcpServer, TcpServerConfig};
