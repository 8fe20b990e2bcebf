//! The command-line front end shared by the `qssh` binary and `examples/p2p_demo.rs`.
//!
//! Errors reach the user as one line, `qssh: what failed: why`, with a hint where there is
//! something to do. Connection and authentication failures exit with 255, as ssh does.

use crate::app::forward::ForwardSpec;
use crate::app::keys::describe_identity;
use crate::app::listener::{self, ListenOn, ListenOptions, Policy};
use crate::app::pty;
use crate::app::shell::{self, Mode, RemoteOptions};
use crate::app::store::Home;
use crate::app::vpn::{VpnOptions, VpnSetupError};
use crate::core::crypto::Secret32;
use crate::core::identity::{Algorithm, PeerId};
use crate::core::limits::PSK_LEN;
use crate::core::vpn::Prefix;
use crate::net::discovery::{discover, DiscoverOptions};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Default TCP port of a listener.
pub const DEFAULT_PORT: u16 = 22222;
/// Longest `discover --timeout`.
pub const MAX_DISCOVER_SECS: f64 = 600.0;
/// Exit status for connection and authentication failures (as ssh).
pub const EXIT_CONNECT: i32 = 255;
/// Default UDP port of `qssh relay`.
/// (22223 is LAN discovery's port.)
pub const DEFAULT_RELAY_PORT: u16 = 22224;
/// Public STUN servers `qssh netcheck` uses when none are given (README).
pub const DEFAULT_STUN_SERVERS: &[&str] = &["stun.l.google.com:19302", "stun.cloudflare.com:3478"];

#[derive(Parser, Debug)]
#[command(
    name = "qssh",
    version,
    about = "Quantum-safe peer-to-peer shell, chat and tunnels. Every invocation is a full peer."
)]
pub struct Cli {
    /// More logging on stderr (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// State directory (default: $QSSH_HOME or ~/.qssh).
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create this peer's identity (refuses to replace one without --force).
    Keygen {
        /// Signature algorithm: falcon512 (default) or slh-dsa-sha2-128f.
        #[arg(long, default_value = "falcon512")]
        alg: String,
        /// Replace an existing identity (this changes your peer ID).
        #[arg(long)]
        force: bool,
    },
    /// Print this peer's ID (first line, alone), algorithm, fingerprint and key sizes.
    Id,
    /// Wait for peers: chat with everyone who connects; serve shell, exec and forwarding to
    /// authorized peers ($QSSH_HOME/authorized_peers or --allow).
    Listen {
        /// Address to bind (default: all IPv4 and IPv6 addresses).
        #[arg(long, value_name = "IP")]
        bind: Option<IpAddr>,
        /// TCP port.
        #[arg(short, long, default_value_t = DEFAULT_PORT)]
        port: u16,
        /// Name shown to peers (default: user@host).
        #[arg(long)]
        name: Option<String>,
        /// Mix this 32-byte pre-shared key (raw or 64 hex digits) into every handshake.
        #[arg(long, value_name = "FILE")]
        psk_file: Option<PathBuf>,
        #[command(flatten)]
        vpn: VpnArgs,
        /// Do not announce this listener on the LAN (broadcast and mDNS).
        #[arg(long)]
        no_announce: bool,
        /// Authorize this peer for shell, exec and forwarding (repeatable), besides
        /// authorized_peers.
        #[arg(long = "allow", value_name = "PEERID")]
        allow: Vec<PeerId>,
        /// No shell and no exec for anyone.
        #[arg(long)]
        no_shell: bool,
        /// No port forwarding for anyone.
        #[arg(long)]
        no_forward: bool,
        /// Register at this rendezvous/relay peer so others can connect by peer ID from
        /// behind NATs (qssh relay; default port 22224).
        #[arg(long, value_name = "HOST:PORT")]
        relay: Option<String>,
        /// STUN server for our public address (repeatable).
        #[arg(long, value_name = "HOST:PORT")]
        stun: Vec<String>,
    },
    /// List peers announcing themselves on the LAN (broadcast and mDNS).
    Discover {
        /// Seconds to listen.
        #[arg(long, default_value_t = 3.0)]
        timeout: f64,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Only mDNS.
        #[arg(long)]
        no_broadcast: bool,
        /// Only broadcast.
        #[arg(long)]
        no_mdns: bool,
    },
    /// Connect to a peer: chat, or run CMD like ssh (`qssh connect TARGET -- CMD ARGS`), or
    /// only forward ports with -N. TARGET: host, host:port, PEERID@host:port, or a name,
    /// peer ID or ID prefix (8+ characters) found by LAN discovery.
    Connect {
        #[command(flatten)]
        peer: PeerArgs,
        #[command(flatten)]
        forwards: ForwardArgs,
        /// Forward ports only: no command, no chat.
        #[arg(short = 'N')]
        no_command: bool,
        #[command(flatten)]
        io: IoArgs,
        #[command(flatten)]
        vpn: VpnArgs,
        /// Route this network through the tunnel (with --vpn; repeatable).
        #[arg(long, value_name = "CIDR")]
        route: Vec<String>,
        #[command(flatten)]
        link: LinkArgs,
        /// Remote command: the words are joined by spaces and run by the peer user's shell,
        /// as with ssh.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<OsString>,
    },
    /// Open an interactive login shell on the peer, as the user who runs its listener.
    Shell {
        #[command(flatten)]
        peer: PeerArgs,
        #[command(flatten)]
        forwards: ForwardArgs,
        #[command(flatten)]
        link: LinkArgs,
        /// -tt: a terminal even when stdin is not one.
        #[arg(short = 't', action = clap::ArgAction::Count)]
        tty: u8,
    },
    /// Run CMD on the peer (`qssh exec TARGET -- CMD ARGS`); its exit status becomes ours.
    Exec {
        #[command(flatten)]
        peer: PeerArgs,
        #[command(flatten)]
        forwards: ForwardArgs,
        #[command(flatten)]
        link: LinkArgs,
        #[command(flatten)]
        io: IoArgs,
        /// The command: the words are joined by spaces and run by the peer user's shell, as
        /// with ssh.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<OsString>,
    },
    /// Round-trip times to a peer, and whether the path is direct or relayed.
    Ping {
        /// host[:port], PEERID@host:port, or PEERID with --relay.
        target: String,
        #[arg(long, value_name = "HOST:PORT")]
        relay: Option<String>,
        /// QUIC over UDP instead of TCP (without --relay).
        #[arg(long)]
        udp: bool,
        #[arg(long, value_name = "HOST:PORT")]
        stun: Vec<String>,
        /// Number of pings.
        #[arg(short, long, default_value_t = 5)]
        count: u32,
        /// Seconds between pings.
        #[arg(short, long, default_value_t = 1.0)]
        interval: f64,
        /// Trust and remember a peer seen for the first time without asking.
        #[arg(long)]
        accept_new: bool,
        #[arg(short, long)]
        port: Option<u16>,
    },
    /// Check this network: local address, public address per STUN server, NAT mapping and
    /// filtering behaviour (RFC 5780), whether UDP works, latency.
    Netcheck {
        /// STUN server (repeatable; default: $QSSH_HOME/stun_servers, else public servers).
        #[arg(long, value_name = "HOST:PORT")]
        stun: Vec<String>,
        /// Local UDP port to test from (0: any).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
    /// Be a rendezvous and relay peer: listeners register by peer ID, connectors are
    /// introduced for hole punching, and end-to-end encrypted traffic is relayed when no
    /// direct path exists.
    Relay {
        /// UDP port.
        #[arg(short, long, default_value_t = DEFAULT_RELAY_PORT)]
        port: u16,
        /// Address to bind (default: all IPv4 and IPv6 addresses).
        #[arg(long, value_name = "IP")]
        bind: Option<IpAddr>,
    },
    /// Forget the remembered peer ID of HOST[:PORT] in known_peers (after a legitimate key change).
    Forget {
        /// host, host:port or [v6]:port, as given to connect.
        target: String,
    },
    /// Run a listener and a connector over loopback and show the handshake and a chat.
    Demo,
}

/// How to reach a peer (connect, shell, exec).
#[derive(Args, Debug)]
pub struct PeerArgs {
    /// host, host:port, [v6]:port or PEERID@host:port.
    pub target: String,
    /// Trust and remember a peer seen for the first time without asking.
    #[arg(long)]
    pub accept_new: bool,
    /// Name shown to the peer (default: user@host).
    #[arg(long)]
    pub name: Option<String>,
    /// Mix this 32-byte pre-shared key (raw or 64 hex digits) into the handshake.
    #[arg(long, value_name = "FILE")]
    pub psk_file: Option<PathBuf>,
    /// Port, when TARGET does not name one.
    #[arg(short, long)]
    pub port: Option<u16>,
}

/// Port forwards, as ssh's -L and -R.
#[derive(Args, Debug)]
pub struct ForwardArgs {
    /// Listen on local [BIND:]PORT (default bind: loopback) and forward each connection
    /// through the peer to HOST:HOSTPORT (repeatable).
    #[arg(short = 'L', value_name = "[BIND:]PORT:HOST:HOSTPORT")]
    pub local: Vec<ForwardSpec>,
    /// Ask the peer to listen on its loopback [BIND:]PORT (0: any free port) and forward
    /// each connection back to HOST:HOSTPORT from here (repeatable).
    #[arg(short = 'R', value_name = "[BIND:]PORT:HOST:HOSTPORT")]
    pub remote: Vec<ForwardSpec>,
}

/// Terminal and stdin of a remote command.
#[derive(Args, Debug)]
pub struct IoArgs {
    /// Ask for a terminal (-t: if stdin is one; -tt: always).
    #[arg(short = 't', action = clap::ArgAction::Count)]
    pub tty: u8,
    /// Read nothing from stdin (as ssh -n).
    #[arg(short = 'n')]
    pub stdin_null: bool,
}

/// VPN flags shared by `listen` and `connect`.
#[derive(clap::Args, Debug)]
pub struct VpnArgs {
    /// Bring up a VPN with these tunnel addresses (IPv4 and/or IPv6 with prefix, comma
    /// separated or repeated), e.g. --vpn 10.200.0.1/24,fd00:200::1/64.
    #[arg(long, value_name = "ADDR/PREFIX", value_delimiter = ',')]
    vpn: Vec<String>,
    /// Name of the TUN interface (default: qvpnN, the first free N).
    #[arg(long, value_name = "NAME", requires = "vpn")]
    tun_name: Option<String>,
    /// Tunnel MTU.
    #[arg(long, default_value_t = crate::core::vpn::DEFAULT_VPN_MTU, requires = "vpn")]
    mtu: u16,
    /// Carry VPN packets only over the session's TCP link (no UDP path).
    #[arg(long, requires = "vpn")]
    no_udp: bool,
    /// Do not use TUN offloads (IFF_VNET_HDR segmentation/coalescing).
    #[arg(long, requires = "vpn")]
    no_offload: bool,
    /// Rotate datagram keys after this many packets (lower than the protocol's 2^24; for
    /// tests and benchmarks).
    #[arg(long, hide = true, value_name = "N")]
    rekey_packets: Option<u64>,
}

impl VpnArgs {
    fn options(&self, routes: &[String]) -> Result<Option<VpnOptions>> {
        if self.vpn.is_empty() {
            if !routes.is_empty() {
                bail!("--route needs --vpn");
            }
            return Ok(None);
        }
        let parse = |v: &[String]| -> Result<Vec<Prefix>> {
            v.iter()
                .filter(|a| !a.trim().is_empty())
                .map(|a| a.parse::<Prefix>().map_err(anyhow::Error::from))
                .collect()
        };
        let opts = VpnOptions {
            addresses: parse(&self.vpn)?,
            tun_name: self.tun_name.clone(),
            routes: parse(routes)?,
            mtu: self.mtu,
            udp: !self.no_udp,
            offload: !self.no_offload,
            rekey: self
                .rekey_packets
                .map(|n| (n, crate::core::limits::DATAGRAM_REKEY_INTERVAL)),
        };
        opts.validate()?;
        Ok(Some(opts))
    }
}

/// How to reach the peer, for connect, shell and exec: TCP (default), QUIC over UDP, or a
/// peer ID through a rendezvous/relay peer.
#[derive(Debug, Args)]
pub struct LinkArgs {
    /// QUIC over UDP instead of TCP.
    #[arg(long)]
    udp: bool,
    /// Reach the peer ID TARGET through this rendezvous/relay peer: relayed at once, direct
    /// as soon as hole punching succeeds, without interrupting the session.
    #[arg(long, value_name = "HOST:PORT")]
    relay: Option<String>,
    /// STUN server for our public address (repeatable; with --relay).
    #[arg(long, value_name = "HOST:PORT")]
    stun: Vec<String>,
}

impl LinkArgs {
    fn transport(self) -> crate::app::dial::Transport {
        transport(self.udp, self.relay, self.stun)
    }
}

/// The async runtime for `command`. Servers of many peers (`listen` without `--vpn`,
/// `relay`) run on two worker threads (and a listener gives each TCP session a thread and
/// runtime of its own: `app::listener`). Everything else is one peer talking to one peer and
/// runs on a single-threaded runtime, like ssh's and boringtun's single event loop: every
/// wakeup stays on one thread, with no cross-CPU hand-off per record or packet. Measured on
/// 2 cores, same build: VPN 2.42 vs 1.61 Gbit/s iperf3 and 8.3 vs 10.7 ms to the first
/// reply (bench/vpn.sh); `exec cat` of 1 GiB both ways 8% less CPU (bench/README.md).
fn runtime_builder(command: &Command) -> tokio::runtime::Builder {
    let server = match command {
        Command::Listen { vpn, .. } => vpn.vpn.is_empty(),
        Command::Relay { .. } => true,
        _ => false,
    };
    if server {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    }
}

/// Runs the CLI with `args`; returns the process exit status.
pub fn run<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    // The PTY helper (see app::pty) runs before anything else: no runtime, no logging.
    if args.get(1).is_some_and(|a| a == pty::PTY_HELPER) {
        return pty::helper_main(&args[2..]);
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    init_logging(cli.verbose);
    let rt = match runtime_builder(&cli.command).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qssh: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let code = match rt.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            let remote = e.downcast_ref::<crate::app::dial::ConnectError>().is_some()
                || e.downcast_ref::<crate::app::shell::RemoteError>().is_some()
                || matches!(
                    e.downcast_ref::<VpnSetupError>(),
                    Some(VpnSetupError::Refused(_) | VpnSetupError::Protocol(_))
                );
            let code = if remote { EXIT_CONNECT } else { 1 };
            eprintln!("qssh: {}", one_line(&e));
            code
        }
    };
    // Do not wait for a blocking stdin reader thread.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

/// `a: b: c` from an error chain, on one line.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("QSSH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("qssh={level}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn open_home(cli_home: &Option<PathBuf>) -> Result<Home> {
    Ok(match cli_home {
        Some(p) => Home::open(p)?,
        None => Home::from_env()?,
    })
}

/// Reads a pre-shared key file: exactly 32 raw bytes, or 64 hex digits (whitespace ignored).
pub fn read_psk(path: &Path) -> Result<Secret32> {
    let data = zeroize::Zeroizing::new(
        std::fs::read(path).with_context(|| format!("cannot read PSK file {}", path.display()))?,
    );
    let mut key = [0u8; PSK_LEN];
    if data.len() == PSK_LEN {
        key.copy_from_slice(&data);
        return Ok(Secret32::from_bytes(key));
    }
    let hex: Vec<u8> = data
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if hex.len() != 2 * PSK_LEN {
        bail!(
            "PSK file {} must hold exactly {PSK_LEN} bytes or {} hex digits (try: head -c 32 /dev/urandom > FILE)",
            path.display(),
            2 * PSK_LEN
        );
    }
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok();
        key[i] = s
            .and_then(|s| u8::from_str_radix(s, 16).ok())
            .with_context(|| format!("PSK file {} is not valid hex", path.display()))?;
    }
    Ok(Secret32::from_bytes(key))
}

/// The default display name: user@host.
pub fn default_name() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "qssh".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{user}@{host}")
}

async fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Keygen { alg, force } => {
            let alg: Algorithm = alg.parse()?;
            let home = open_home(&cli.home)?;
            let id = home.keygen(alg, force)?;
            eprintln!("created identity {}", home.identity_path().display());
            print_identity(&describe_identity(&id));
            Ok(0)
        }
        Command::Id => {
            let home = open_home(&cli.home)?;
            let loaded = home.load_or_create_identity(Algorithm::Falcon512)?;
            if loaded.created {
                eprintln!("created identity {}", home.identity_path().display());
            }
            print_identity(&describe_identity(&loaded.identity));
            Ok(0)
        }
        Command::Listen {
            bind,
            port,
            name,
            psk_file,
            no_announce,
            allow,
            no_shell,
            no_forward,
            vpn,
            relay,
            stun,
        } => {
            let home = open_home(&cli.home)?;
            let psk = psk_file.as_deref().map(read_psk).transpose()?;
            let vpn = vpn.options(&[])?;
            listener::listen(
                &home,
                ListenOptions {
                    listen: Some(ListenOn {
                        bind,
                        port,
                        announce: !no_announce,
                        relay: relay.map(|r| with_default_port(&r, DEFAULT_RELAY_PORT)),
                        stun,
                    }),
                    dial: None,
                    default_port: DEFAULT_PORT,
                    accept_new: false,
                    name: name.unwrap_or_else(default_name),
                    psk,
                    policy: Policy {
                        no_shell,
                        no_forward,
                        vpn: vpn.is_some(),
                        allow,
                        home: Some(home.clone()),
                    },
                    vpn,
                    transport: crate::app::dial::Transport::Tcp,
                },
            )
            .await
        }
        Command::Connect {
            peer,
            forwards,
            no_command,
            io,
            vpn,
            route,
            link,
            command,
        } => {
            let home = open_home(&cli.home)?;
            if let Some(opts) = vpn.options(&route)? {
                if !command.is_empty() || no_command {
                    bail!("--vpn runs the tunnel until interrupted: drop the command or -N");
                }
                let psk = peer.psk_file.as_deref().map(read_psk).transpose()?;
                return crate::app::vpn::connect(
                    &home,
                    &peer.target,
                    peer.port.unwrap_or(DEFAULT_PORT),
                    (peer.accept_new, peer.name.unwrap_or_else(default_name), psk),
                    link.transport(),
                    opts,
                )
                .await;
            }
            let mode = match (no_command, command.is_empty()) {
                (true, false) => bail!("-N runs no command: drop -N or the command"),
                (true, true) => Mode::ForwardOnly,
                (false, false) => Mode::Exec(command),
                (false, true) => {
                    if !forwards.local.is_empty() || !forwards.remote.is_empty() {
                        bail!("port forwarding needs -N or a command (chat carries no forwards); for a shell use `qssh shell`");
                    }
                    let psk = peer.psk_file.as_deref().map(read_psk).transpose()?;
                    return listener::listen(
                        &home,
                        ListenOptions {
                            listen: None,
                            dial: Some(peer.target),
                            default_port: peer.port.unwrap_or(DEFAULT_PORT),
                            accept_new: peer.accept_new,
                            name: peer.name.unwrap_or_else(default_name),
                            psk,
                            policy: Policy::default(),
                            vpn: None,
                            transport: link.transport(),
                        },
                    )
                    .await;
                }
            };
            remote(&home, peer, forwards, mode, io, link.transport()).await
        }
        Command::Shell {
            peer,
            forwards,
            link,
            tty,
        } => {
            let home = open_home(&cli.home)?;
            let io = IoArgs {
                tty,
                stdin_null: false,
            };
            remote(&home, peer, forwards, Mode::Shell, io, link.transport()).await
        }
        Command::Exec {
            peer,
            forwards,
            link,
            io,
            command,
        } => {
            let home = open_home(&cli.home)?;
            remote(
                &home,
                peer,
                forwards,
                Mode::Exec(command),
                io,
                link.transport(),
            )
            .await
        }
        Command::Ping {
            target,
            relay,
            udp,
            stun,
            count,
            interval,
            accept_new,
            port,
        } => {
            let home = open_home(&cli.home)?;
            crate::app::netcmd::ping(
                &home,
                crate::app::netcmd::PingOptions {
                    target,
                    default_port: port.unwrap_or(DEFAULT_PORT),
                    transport: transport(udp, relay, stun),
                    count,
                    interval: std::time::Duration::from_secs_f64(interval.clamp(0.01, 60.0)),
                    accept_new,
                    name: default_name(),
                },
            )
            .await
        }
        Command::Netcheck { stun, port } => {
            let home = open_home(&cli.home)?;
            let servers = if stun.is_empty() {
                configured_stun_servers(&home)
            } else {
                stun
            };
            crate::app::netcmd::netcheck(&servers, port).await
        }
        Command::Relay { port, bind } => crate::app::netcmd::relay(bind, port).await,
        Command::Discover {
            timeout,
            json,
            no_broadcast,
            no_mdns,
        } => {
            if !(0.0..=MAX_DISCOVER_SECS).contains(&timeout) {
                bail!("--timeout must be between 0 and {MAX_DISCOVER_SECS} seconds");
            }
            let home = open_home(&cli.home)?;
            let own = home.load_identity().ok().map(|i| i.peer_id());
            let d = discover(&DiscoverOptions {
                timeout: std::time::Duration::from_secs_f64(timeout),
                broadcast: !no_broadcast,
                mdns: !no_mdns,
                exclude: own.into_iter().collect(),
                ..DiscoverOptions::default()
            })
            .await
            .context("discovery failed")?;
            for p in &d.peers {
                println!("{}", if json { p.to_json() } else { p.line() });
            }
            for c in &d.conflicts {
                eprintln!("warning: {c}");
            }
            if d.peers.is_empty() {
                eprintln!("no peers found");
            }
            Ok(0)
        }
        Command::Forget { target } => {
            let home = open_home(&cli.home)?;
            let n = home.remove_known(&target)?;
            if n == 0 {
                eprintln!("{target} is not in {}", home.known_peers_path().display());
                return Ok(1);
            }
            eprintln!(
                "removed {n} entr{} for {target} from {}",
                if n == 1 { "y" } else { "ies" },
                home.known_peers_path().display()
            );
            Ok(0)
        }
        Command::Demo => crate::app::demo::run().await,
    }
}

/// `HOST` → `HOST:PORT` with the default port; `HOST:PORT` and `[v6]:PORT` unchanged.
fn with_default_port(s: &str, port: u16) -> String {
    let has_port = if let Some(rest) = s.strip_prefix('[') {
        rest.contains("]:")
    } else {
        s.matches(':').count() == 1
    };
    if has_port {
        s.to_string()
    } else if s.contains(':') && !s.starts_with('[') {
        format!("[{s}]:{port}")
    } else {
        format!("{s}:{port}")
    }
}

fn transport(udp: bool, relay: Option<String>, stun: Vec<String>) -> crate::app::dial::Transport {
    use crate::app::dial::Transport;
    match relay {
        Some(r) => Transport::Relay {
            relay: with_default_port(&r, DEFAULT_RELAY_PORT),
            stun,
        },
        None if udp => Transport::Udp,
        None => Transport::Tcp,
    }
}

/// STUN servers from `$QSSH_HOME/stun_servers` (one HOST:PORT a line, `#` comments), else
/// [`DEFAULT_STUN_SERVERS`].
fn configured_stun_servers(home: &Home) -> Vec<String> {
    let path = home.path().join("stun_servers");
    let from_file: Vec<String> = std::fs::read_to_string(&path)
        .map(|t| {
            t.lines()
                .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
                .filter(|l| !l.is_empty())
                .take(crate::core::limits::MAX_CANDIDATES)
                .collect()
        })
        .unwrap_or_default();
    if from_file.is_empty() {
        DEFAULT_STUN_SERVERS.iter().map(|s| s.to_string()).collect()
    } else {
        from_file
    }
}

/// shell, exec, and connect with a command or -N.
async fn remote(
    home: &Home,
    peer: PeerArgs,
    forwards: ForwardArgs,
    mode: Mode,
    io: IoArgs,
    transport: crate::app::dial::Transport,
) -> Result<i32> {
    let psk = peer.psk_file.as_deref().map(read_psk).transpose()?;
    Ok(shell::run(
        home,
        RemoteOptions {
            target: peer.target,
            default_port: peer.port.unwrap_or(DEFAULT_PORT),
            accept_new: peer.accept_new,
            name: peer.name.unwrap_or_else(default_name),
            psk,
            mode,
            tty: io.tty,
            stdin_null: io.stdin_null,
            local_forwards: forwards.local,
            remote_forwards: forwards.remote,
            transport,
        },
    )
    .await?)
}

fn print_identity(info: &crate::app::keys::IdentityInfo) {
    use std::io::Write;
    // Ignore a closed pipe (`qssh id | head -1`): the first line already went out.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", info.peer_id)
        .and_then(|()| writeln!(out, "algorithm:   {}", info.algorithm_name))
        .and_then(|()| writeln!(out, "fingerprint: {}", info.fingerprint))
        .and_then(|()| {
            writeln!(
                out,
                "sizes:       public key {} bytes, signature {} bytes",
                info.public_key_len, info.signature_len
            )
        });
}
