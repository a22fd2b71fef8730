//! The client end of `hetsync status`: one request, authenticated like a worker's hello when
//! there is a secret, and the server's report.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::server_end::STATUS;
use crate::auth::Secret;
use crate::protocol::{
    control_frame, FrameKind, Header, ProtocolError, CHALLENGE_LEN, HEADER_LEN,
    MAX_CONTROL_PAYLOAD, MAX_STATUS_REPORT, NONCE_LEN,
};
use crate::{LinkError, PeerError};

fn io_err(peer: &str, op: &'static str, source: std::io::Error) -> LinkError {
    PeerError::Io {
        op,
        peer: peer.to_string(),
        source,
    }
    .into()
}

fn proto_err(peer: &str, source: ProtocolError) -> LinkError {
    PeerError::Protocol {
        peer: peer.to_string(),
        source,
    }
    .into()
}

/// Reads one reply frame, its size checked for its kind before anything is allocated.
fn read_reply(s: &mut TcpStream, peer: &str) -> Result<(FrameKind, Vec<u8>), LinkError> {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h)
        .map_err(|e| io_err(peer, "read the reply", e))?;
    let h = Header::decode(&h).map_err(|e| proto_err(peer, e))?;
    let max = match h.kind {
        FrameKind::Challenge => CHALLENGE_LEN as u64,
        FrameKind::Status => MAX_STATUS_REPORT,
        FrameKind::Error => MAX_CONTROL_PAYLOAD,
        kind => {
            let when = "as a status reply";
            return Err(proto_err(peer, ProtocolError::Unexpected { kind, when }));
        }
    };
    if h.len > max || (h.kind == FrameKind::Challenge && h.len != max) {
        let e = ProtocolError::TooLong {
            kind: h.kind,
            len: h.len,
            max,
        };
        return Err(proto_err(peer, e));
    }
    let mut body = vec![0u8; h.len as usize];
    s.read_exact(&mut body)
        .map_err(|e| io_err(peer, "read the reply", e))?;
    Ok((h.kind, body))
}

/// Asks the server at `addr` for its status report (JSON), proving knowledge of `secret` when
/// given (and checking the server's proof); waits at most `timeout` for each step.
pub fn request_status(
    addr: &str,
    secret: Option<&Secret>,
    timeout: Duration,
) -> Result<Vec<u8>, LinkError> {
    let sa = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| LinkError::Connect {
            addr: addr.to_string(),
            source: std::io::ErrorKind::NotFound.into(),
            hint: " (check the host name in --server HOST:PORT)",
        })?;
    let mut s = TcpStream::connect_timeout(&sa, timeout).map_err(|source| LinkError::Connect {
        addr: addr.to_string(),
        source,
        hint: " (is `hetsync server` running there?)",
    })?;
    let peer = sa.to_string();
    s.set_read_timeout(Some(timeout))
        .map_err(|e| io_err(&peer, "setsockopt", e))?;
    let ours = match secret {
        Some(_) => Some(crate::auth::nonce().map_err(|e| io_err(&peer, "draw a nonce", e))?),
        None => None,
    };
    let payload = ours.map_or(Vec::new(), |n| n.to_vec());
    s.write_all(&control_frame(FrameKind::Status, 0, 0, &payload))
        .map_err(|e| io_err(&peer, "write the request", e))?;
    let mut reply = read_reply(&mut s, &peer)?;
    if let (FrameKind::Challenge, Some(secret), Some(ours)) = (reply.0, secret, ours) {
        let body = &reply.1;
        let theirs: [u8; NONCE_LEN] = body[..NONCE_LEN].try_into().expect("checked length");
        if !secret.verify_server(&ours, &theirs, STATUS, &body[NONCE_LEN..]) {
            return Err(LinkError::Refused {
                peer,
                reason: "authentication failed: the server's proof does not match this secret (a different --secret-file, or not the job's server)".into(),
            });
        }
        let proof = secret.worker_proof(&theirs, &ours, STATUS);
        s.write_all(&control_frame(FrameKind::Auth, 0, 0, &proof))
            .map_err(|e| io_err(&peer, "write the proof", e))?;
        reply = read_reply(&mut s, &peer)?;
    } else if reply.0 == FrameKind::Status && secret.is_some() {
        return Err(LinkError::Refused {
            peer,
            reason: "the server answered without proving it knows the job's secret: it is not this job's server".into(),
        });
    }
    match reply {
        (FrameKind::Status, body) => Ok(body),
        (FrameKind::Error, body) => Err(LinkError::Refused {
            peer,
            reason: String::from_utf8_lossy(&body).into_owned(),
        }),
        (kind, _) => Err(proto_err(
            &peer,
            ProtocolError::Unexpected {
                kind,
                when: "as a status reply",
            },
        )),
    }
}
