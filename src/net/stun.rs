//! STUN (RFC 8489) binding requests on the shared socket, built and parsed with `stun-rs`,
//! and NAT behaviour discovery (RFC 5780) for `qssh netcheck`.
//!
//! Mapping behaviour (RFC 5780 §4.3): the mapped address seen by the server's primary
//! address, by its alternate IP, and by its alternate IP and port. Filtering behaviour
//! (§4.4): whether answers arrive when the server is asked (CHANGE-REQUEST) to send them from
//! its other IP and port, or only its other port. Both need a server that reports
//! OTHER-ADDRESS (coturn with two `-L` addresses does); with plain servers the mapping is
//! still judged by comparing what two different servers saw.

use super::udp::UdpMux;
use crate::core::limits::{STUN_RETRANSMIT, STUN_TIMEOUT};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use stun_rs::attributes::discovery::{ChangeRequest, ChangeRequestFlags, OtherAddress};
use stun_rs::attributes::stun::{MappedAddress, XorMappedAddress};
use stun_rs::methods::BINDING;
use stun_rs::{
    MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessageBuilder, TransactionId,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StunError {
    #[error("no answer within {} ms", STUN_TIMEOUT.as_millis())]
    Timeout,
    #[error("cannot send: {0}")]
    Send(String),
    #[error("invalid answer: {0}")]
    Invalid(String),
}

/// Which source the server should answer from (RFC 5780 CHANGE-REQUEST).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    Port,
    IpAndPort,
}

/// A binding answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// Our address as the server saw it (XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS).
    pub mapped: SocketAddr,
    /// The server's alternate address (OTHER-ADDRESS), if it supports RFC 5780.
    pub other: Option<SocketAddr>,
    /// Where the answer came from.
    pub from: SocketAddr,
    /// Time from the first request to the answer.
    pub rtt: Duration,
}

/// Encodes a binding request with transaction id `txid`.
pub fn encode_request(txid: [u8; 12], change: Change) -> Result<Vec<u8>, StunError> {
    let mut b = StunMessageBuilder::new(BINDING, MessageClass::Request)
        .with_transaction_id(TransactionId::from(txid));
    match change {
        Change::None => {}
        Change::Port => {
            b = b.with_attribute(ChangeRequest::new(Some(
                ChangeRequestFlags::ChangePort.into(),
            )))
        }
        Change::IpAndPort => {
            b = b.with_attribute(ChangeRequest::new(Some(
                ChangeRequestFlags::ChangeIp | ChangeRequestFlags::ChangePort,
            )))
        }
    }
    let msg = b.build();
    let mut buf = [0u8; 128];
    let n = MessageEncoderBuilder::default()
        .build()
        .encode(&mut buf, &msg)
        .map_err(|e| StunError::Invalid(format!("{e:?}")))?;
    Ok(buf[..n].to_vec())
}

/// Parses a binding success response for `txid`: (mapped, other).
pub fn decode_response(
    txid: [u8; 12],
    data: &[u8],
) -> Result<(SocketAddr, Option<SocketAddr>), StunError> {
    let (msg, _) = MessageDecoderBuilder::default()
        .build()
        .decode(data)
        .map_err(|e| StunError::Invalid(format!("{e:?}")))?;
    if msg.method() != BINDING || msg.class() != MessageClass::SuccessResponse {
        return Err(StunError::Invalid("not a binding success response".into()));
    }
    if msg.transaction_id().as_bytes() != &txid {
        return Err(StunError::Invalid("transaction id mismatch".into()));
    }
    let mapped = if let Some(a) = msg.get::<XorMappedAddress>() {
        *a.as_xor_mapped_address()
            .map_err(|e| StunError::Invalid(format!("{e:?}")))?
            .socket_address()
    } else if let Some(a) = msg.get::<MappedAddress>() {
        *a.as_mapped_address()
            .map_err(|e| StunError::Invalid(format!("{e:?}")))?
            .socket_address()
    } else {
        return Err(StunError::Invalid("no mapped address".into()));
    };
    let other = msg
        .get::<OtherAddress>()
        .and_then(|a| a.as_other_address().ok())
        .map(|a| *a.socket_address());
    Ok((mapped, other))
}

/// One binding transaction to `server` over `mux`, retransmitted every STUN_RETRANSMIT until
/// STUN_TIMEOUT.
pub async fn binding(
    mux: &UdpMux,
    server: SocketAddr,
    change: Change,
) -> Result<Binding, StunError> {
    let mut txid = [0u8; 12];
    getrandom::fill(&mut txid).map_err(|e| StunError::Send(e.to_string()))?;
    let req = encode_request(txid, change)?;
    let started = Instant::now();
    let deadline = started + STUN_TIMEOUT;
    let mut rx = mux
        .stun_request(server, txid, &req)
        .await
        .map_err(|e| StunError::Send(e.to_string()))?;
    loop {
        let wait = STUN_RETRANSMIT.min(deadline.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(wait, &mut rx).await {
            Ok(Ok((from, data))) => {
                let (mapped, other) = decode_response(txid, &data)?;
                return Ok(Binding {
                    mapped: SocketAddr::new(mapped.ip().to_canonical(), mapped.port()),
                    other,
                    from,
                    rtt: started.elapsed(),
                });
            }
            Ok(Err(_)) => return Err(StunError::Timeout),
            Err(_) if Instant::now() >= deadline => return Err(StunError::Timeout),
            Err(_) => {
                mux.send_to(&req, server)
                    .await
                    .map_err(|e| StunError::Send(e.to_string()))?;
            }
        }
    }
}

/// RFC 5780 mapping behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Our address is the mapped address: no NAT.
    NoNat,
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
    Unknown,
}

/// RFC 5780 filtering behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filtering {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
    Unknown,
}

impl std::fmt::Display for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mapping::NoNat => "none (no NAT)",
            Mapping::EndpointIndependent => "endpoint-independent",
            Mapping::AddressDependent => "address-dependent",
            Mapping::AddressAndPortDependent => "address-and-port-dependent",
            Mapping::Unknown => "unknown",
        })
    }
}

impl std::fmt::Display for Filtering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Filtering::EndpointIndependent => "endpoint-independent",
            Filtering::AddressDependent => "address-dependent",
            Filtering::AddressAndPortDependent => "address-and-port-dependent",
            Filtering::Unknown => "unknown (server lacks RFC 5780)",
        })
    }
}

/// The usual name of a (mapping, filtering) pair.
pub fn nat_type(m: Mapping, f: Filtering) -> &'static str {
    match (m, f) {
        (Mapping::NoNat, Filtering::EndpointIndependent) => "public (open internet)",
        (Mapping::NoNat, _) => "public behind a firewall",
        (Mapping::EndpointIndependent, Filtering::EndpointIndependent) => "full cone",
        (Mapping::EndpointIndependent, Filtering::AddressDependent) => "restricted cone",
        (Mapping::EndpointIndependent, Filtering::AddressAndPortDependent) => {
            "port-restricted cone"
        }
        (Mapping::EndpointIndependent, Filtering::Unknown) => "cone (filtering unknown)",
        (Mapping::AddressDependent | Mapping::AddressAndPortDependent, _) => "symmetric",
        (Mapping::Unknown, _) => "unknown",
    }
}

/// One server's part of a netcheck.
#[derive(Debug, Clone)]
pub struct ServerReport {
    pub server: String,
    pub result: Result<Binding, String>,
}

/// What `qssh netcheck` found.
#[derive(Debug, Clone)]
pub struct NetReport {
    pub local: SocketAddr,
    pub servers: Vec<ServerReport>,
    pub udp: bool,
    pub mapping: Mapping,
    pub filtering: Filtering,
}

/// Runs the checks from one socket (as RFC 5780 requires) against `servers`.
pub async fn netcheck(
    mux: &UdpMux,
    servers: &[(String, SocketAddr)],
    local_ips: &[std::net::IpAddr],
) -> NetReport {
    let mut reports = Vec::new();
    for (name, addr) in servers {
        let r = binding(mux, *addr, Change::None).await;
        reports.push(ServerReport {
            server: format!("{name} ({addr})"),
            result: r.map_err(|e| e.to_string()),
        });
    }
    let answers: Vec<(SocketAddr, Binding)> = servers
        .iter()
        .zip(&reports)
        .filter_map(|((_, a), r)| r.result.as_ref().ok().map(|b| (*a, *b)))
        .collect();
    let udp = !answers.is_empty();
    let local_port = mux.local_addr().port();
    let mut mapping = Mapping::Unknown;
    let mut filtering = Filtering::Unknown;
    if let Some(&(primary, first)) = answers
        .iter()
        .find(|(_, b)| b.other.is_some())
        .or(answers.first())
    {
        let no_nat = first.mapped.port() == local_port && local_ips.contains(&first.mapped.ip());
        // Mapping.
        if no_nat {
            mapping = Mapping::NoNat;
        } else if let Some(other) = first.other {
            let alt_ip = SocketAddr::new(other.ip(), primary.port());
            match binding(mux, alt_ip, Change::None).await {
                Ok(b2) if b2.mapped == first.mapped => mapping = Mapping::EndpointIndependent,
                Ok(b2) => match binding(mux, other, Change::None).await {
                    Ok(b3) if b3.mapped == b2.mapped => mapping = Mapping::AddressDependent,
                    Ok(_) => mapping = Mapping::AddressAndPortDependent,
                    Err(_) => {}
                },
                Err(_) => {}
            }
        } else if let Some((_, second)) = answers.iter().find(|(a, _)| a.ip() != primary.ip()) {
            mapping = if second.mapped == first.mapped {
                Mapping::EndpointIndependent
            } else {
                Mapping::AddressAndPortDependent
            };
        }
        // Filtering.
        if first.other.is_some() {
            filtering = if binding(mux, primary, Change::IpAndPort).await.is_ok() {
                Filtering::EndpointIndependent
            } else if binding(mux, primary, Change::Port).await.is_ok() {
                Filtering::AddressDependent
            } else {
                Filtering::AddressAndPortDependent
            };
        }
    }
    NetReport {
        local: mux.local_addr(),
        servers: reports,
        udp,
        mapping,
        filtering,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_response_codec() {
        let txid = [7u8; 12];
        let req = encode_request(txid, Change::IpAndPort).unwrap();
        assert_eq!(req[0] & 0xC0, 0, "STUN's first two bits are zero");
        assert_eq!(&req[8..20], &txid);
        assert_eq!(
            crate::core::rendezvous::classify(&req),
            crate::core::rendezvous::UdpKind::Stun
        );
        // A success response built with stun-rs, as a server would send it.
        let mapped: SocketAddr = "192.0.2.1:32853".parse().unwrap();
        let other: SocketAddr = "192.0.2.9:3479".parse().unwrap();
        let msg = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
            .with_transaction_id(TransactionId::from(txid))
            .with_attribute(XorMappedAddress::from(mapped))
            .with_attribute(OtherAddress::from(other))
            .build();
        let mut buf = [0u8; 128];
        let n = MessageEncoderBuilder::default()
            .build()
            .encode(&mut buf, &msg)
            .unwrap();
        assert_eq!(
            decode_response(txid, &buf[..n]).unwrap(),
            (mapped, Some(other))
        );
        assert!(decode_response([8; 12], &buf[..n]).is_err());
        assert!(decode_response(txid, &buf[..n - 1]).is_err());
        assert!(
            decode_response(txid, &req).is_err(),
            "a request is no answer"
        );
    }

    #[test]
    fn nat_names() {
        assert_eq!(
            nat_type(
                Mapping::EndpointIndependent,
                Filtering::AddressAndPortDependent
            ),
            "port-restricted cone"
        );
        assert_eq!(
            nat_type(
                Mapping::AddressAndPortDependent,
                Filtering::AddressAndPortDependent
            ),
            "symmetric"
        );
        assert_eq!(
            nat_type(Mapping::EndpointIndependent, Filtering::EndpointIndependent),
            "full cone"
        );
    }
}
