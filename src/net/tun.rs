//! TUN devices for the VPN: creation with addresses, MTU and link state, routes, and typed
//! errors that say what to do.
//!
//! The device is created by `tun-rs` (TUNSETIFF, and the address/MTU/link ioctls) and is
//! not persistent: the kernel deletes the interface, its addresses and every route through it
//! when the last file descriptor closes, which is when [`Tun`] is dropped or the process
//! ends in any way (exit, signal, crash, SIGKILL). So cleanup needs no code that could be
//! skipped.
//!
//! Routes (`--route`) are added by running `ip route replace CIDR dev NAME` from iproute2:
//! `tun-rs` does not manage routes, and a netlink stack (rtnetlink) would add an async
//! netlink dependency for one message per route. `ip` is present wherever a TUN VPN is
//! configured, its failures are reported with its own message, and routes need no explicit
//! removal (they go with the interface).
//!
//! With offload, the device is opened with IFF_VNET_HDR and TSO/USO enabled: the kernel hands
//! over TCP/UDP super-packets of up to 64 KiB, which `tun-rs` splits into MTU-sized packets
//! (`recv_multiple`), and coalesces received packets back into super-packets when writing
//! (`send_multiple`): the batching that lets a user-space tunnel pass multi-gigabit TCP.

use crate::core::vpn::Prefix;
use std::io;
use std::net::IpAddr;
use std::process::Command;
use thiserror::Error;
use tun_rs::{DeviceBuilder, SyncDevice};

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;
/// Name pattern when none is chosen: the kernel picks the first free number.
pub const DEFAULT_TUN_NAME: &str = "qvpn%d";

/// Why a TUN device could not be set up.
#[derive(Debug, Error)]
pub enum TunError {
    #[error(
        "cannot create TUN interface: permission denied (creating network interfaces needs \
         CAP_NET_ADMIN: run as root, or grant it with `setcap cap_net_admin+ep $(command -v qssh)`)"
    )]
    Permission,
    #[error(
        "cannot create TUN interface: /dev/net/tun is missing (load the tun module: modprobe tun)"
    )]
    NoDevice,
    #[error("cannot create TUN interface {name}: an interface with that name exists and is busy (choose another --tun-name)")]
    Busy { name: String },
    #[error("invalid interface name {0:?}: 1 to 15 characters, letters, digits, '-', '_', '.' (and %d for a number)")]
    BadName(String),
    #[error("cannot create TUN interface: {0}")]
    Create(io::Error),
    #[error("cannot configure TUN interface {name}: {what}: {source}")]
    Configure {
        name: String,
        what: String,
        source: io::Error,
    },
    #[error("cannot add route {route} via {name}: {reason}")]
    Route {
        route: Prefix,
        name: String,
        reason: String,
    },
}

/// What to create.
#[derive(Debug, Clone)]
pub struct TunConfig {
    /// Interface name or pattern (`%d`); None: [`DEFAULT_TUN_NAME`].
    pub name: Option<String>,
    pub addresses: Vec<Prefix>,
    pub mtu: u16,
    /// IFF_VNET_HDR with TSO/USO (GSO split and GRO coalesce in user space).
    pub offload: bool,
}

/// A TUN interface, up and configured, its descriptor non-blocking (the VPN's packet thread
/// waits on it with epoll; writes to a TUN never wait). Dropping it deletes the interface
/// and its routes.
pub struct Tun {
    pub dev: SyncDevice,
    pub name: String,
    pub offload: bool,
}

/// Checks an interface name the way the kernel will (so the error is ours, not EINVAL).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.%".contains(c))
}

impl Tun {
    /// Creates the interface, sets its addresses and MTU, and brings it up.
    pub fn create(cfg: &TunConfig) -> Result<Tun, TunError> {
        let name = cfg
            .name
            .clone()
            .unwrap_or_else(|| DEFAULT_TUN_NAME.to_string());
        if !valid_ifname(&name) {
            return Err(TunError::BadName(name));
        }
        let mut b = DeviceBuilder::new()
            .name(name.clone())
            .mtu(cfg.mtu)
            .offload(cfg.offload);
        for a in &cfg.addresses {
            b = match a.addr {
                IpAddr::V4(v4) => b.ipv4(v4, a.len, None),
                IpAddr::V6(v6) => b.ipv6(v6, a.len),
            };
        }
        let dev = b
            .enable(true)
            .build_sync()
            .map_err(|e| classify(e, &name))?;
        dev.set_nonblocking(true)
            .map_err(|source| TunError::Configure {
                name: name.clone(),
                what: "make it non-blocking".into(),
                source,
            })?;
        let name = dev.name().map_err(|source| TunError::Configure {
            name: name.clone(),
            what: "read its name".into(),
            source,
        })?;
        Ok(Tun {
            dev,
            name,
            offload: cfg.offload,
        })
    }

    /// Routes `route` through this interface (`ip route replace ROUTE dev NAME`).
    pub fn add_route(&self, route: &Prefix) -> Result<(), TunError> {
        let family = if route.addr.is_ipv4() { "-4" } else { "-6" };
        let net = route.network().to_string();
        let out = Command::new("ip")
            .args([family, "route", "replace", &net, "dev", &self.name])
            .output()
            .map_err(|e| TunError::Route {
                route: *route,
                name: self.name.clone(),
                reason: format!("cannot run `ip` (install iproute2): {e}"),
            })?;
        if !out.status.success() {
            return Err(TunError::Route {
                route: *route,
                name: self.name.clone(),
                reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }
}

fn classify(e: io::Error, name: &str) -> TunError {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => TunError::Permission,
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => TunError::NoDevice,
        Some(libc::EBUSY) | Some(libc::EEXIST) => TunError::Busy {
            name: name.to_string(),
        },
        _ => TunError::Create(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        for ok in ["qvpn%d", "tun0", "wg-home_1", "a", "x.y"] {
            assert!(valid_ifname(ok), "{ok}");
        }
        for bad in ["", ".", "..", "sixteen-chars-xx", "a b", "a/b", "ä"] {
            assert!(!valid_ifname(bad), "{bad}");
        }
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = classify(io::Error::from_raw_os_error(libc::EPERM), "x");
        assert!(e.to_string().contains("CAP_NET_ADMIN"));
        let e = classify(io::Error::from_raw_os_error(libc::ENOENT), "x");
        assert!(e.to_string().contains("/dev/net/tun"));
        let e = classify(io::Error::from_raw_os_error(libc::EBUSY), "tun7");
        assert!(e.to_string().contains("--tun-name"));
        assert!(!e.to_string().contains('\n'));
    }
}
