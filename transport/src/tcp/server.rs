//! The server side of the TCP transport.

use std::time::{Duration, Instant};

use crate::channel::{ListenConfig, ServerEnd};
use crate::{Arena, Event, Key, Rank, Transport, TransportError, Version};

/// The epoll TCP transport, server side.
#[derive(Debug)]
pub struct TcpServer {
    end: ServerEnd,
}

impl TcpServer {
    /// Starts listening.
    pub fn bind(cfg: &ListenConfig) -> Result<Self, TransportError> {
        Ok(Self {
            end: ServerEnd::bind(cfg)?,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.end.local_addr()
    }
}

impl Transport for TcpServer {
    fn poll(
        &mut self,
        arena: &mut Arena,
        events: &mut Vec<Event>,
        deadline: Option<Instant>,
    ) -> Result<(), TransportError> {
        self.end.poll(arena, events, deadline)?;
        self.end.take_abandoned(); // nothing was set up for their offers
                                   // A worker that offers an upgrade carries on over TCP.
        for (rank, _) in self.end.take_offers() {
            self.end.decline_offer(arena, rank);
        }
        Ok(())
    }

    fn send_model(&mut self, arena: &mut Arena, rank: Rank, key: Key) {
        self.end.send_model(arena, rank, key);
    }

    fn release(&mut self, arena: &mut Arena, key: Key, version: Version) {
        self.end.release(arena, key, version);
    }

    fn disconnect(&mut self, arena: &mut Arena, rank: Rank, why: &str) {
        self.end.disconnect(arena, rank, why);
    }

    fn shutdown(&mut self, arena: &mut Arena, grace: Duration) {
        self.end.shutdown(arena, grace);
    }

    fn answer_status(&mut self, arena: &mut Arena, request: u64, report: &[u8]) {
        self.end.answer_status(arena, request, report);
    }

    fn peer(&self, rank: Rank) -> Option<crate::PeerInfo> {
        self.end.peer(rank)
    }
}
