//! The few socket calls of the server end: a listening socket whose errors say how to fix them,
//! and a non-blocking read.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};

use nix::errno::Errno;
use socket2::{Domain, Protocol, Socket, Type};

use crate::TransportError;

/// One `read`, retried on EINTR: `None` when the socket has nothing now, `Some(0)` at EOF.
pub(super) fn read_nonblocking(
    stream: &mut TcpStream,
    buf: &mut [u8],
) -> io::Result<Option<usize>> {
    loop {
        match stream.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

pub(super) fn listen(addr: SocketAddr) -> Result<TcpListener, TransportError> {
    let err = |source: io::Error| {
        let hint = match source.raw_os_error() {
            Some(e) if e == Errno::EADDRINUSE as i32 => {
                " (another process holds this port: pick another with --listen HOST:PORT, or port 0 for any free one)"
            }
            Some(e) if e == Errno::EADDRNOTAVAIL as i32 => {
                " (no interface of this host has that address)"
            }
            Some(e) if e == Errno::EACCES as i32 => {
                " (ports below 1024 need privileges: use a higher port)"
            }
            _ => "",
        };
        TransportError::Listen {
            addr: addr.to_string(),
            source,
            hint,
        }
    };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_cloexec(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(1024).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    Ok(socket.into())
}
