//! The on-disk state, laid out like `~/.ssh`.
//!
//! ```text
//! $QSSH_HOME (default ~/.qssh), mode 0700
//! ├── identity          binary, mode 0600: our long-term signing key (see `Identity::encode`)
//! ├── known_peers       text, mode 0644: addresses we connected to and the peer IDs they had
//! └── authorized_peers  text, written by the user: peers allowed to connect to us
//! ```
//!
//! `known_peers`, one entry per line (blank lines and `#` comments allowed, a host may appear
//! on several lines, as in `known_hosts`):
//!
//! ```text
//! HOST:PORT PEERID [# comment]
//! ```
//!
//! `authorized_peers`, one peer per line:
//!
//! ```text
//! PEERID [OPTION[,OPTION...]] [# comment]
//! ```
//!
//! Addresses are normalised by [`normalize_host_port`] before they are written or compared:
//! the port is always explicit (default [`DEFAULT_PORT`]), IPv6 addresses are bracketed and
//! in canonical form, names are lowercase.
//!
//! Nothing here prints: failures are [`StoreError`]s whose `Display` is the one line the user
//! sees, and the only other output is `tracing` (a warning for a group/other-accessible home).

use crate::core::crypto::{random_array, OsRandom};
use crate::core::identity::{Algorithm, Identity, IdentityError, PeerId};
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;
use zeroize::Zeroizing;

/// Environment variable naming the qssh directory.
pub const HOME_ENV: &str = "QSSH_HOME";
/// The qssh directory's name inside `$HOME` when `$QSSH_HOME` is not set.
pub const DEFAULT_HOME_DIR: &str = ".qssh";
/// File holding our identity.
pub const IDENTITY_FILE: &str = "identity";
/// File pinning the peer IDs of the addresses we connect to.
pub const KNOWN_PEERS_FILE: &str = "known_peers";
/// File listing the peers allowed to connect to us.
pub const AUTHORIZED_PEERS_FILE: &str = "authorized_peers";

/// Largest state file we read; anything larger is refused, not truncated.
pub const MAX_FILE_SIZE: u64 = 1 << 20;
/// Port assumed when an address has none; always written explicitly to `known_peers`.
pub const DEFAULT_PORT: u16 = 22222;
/// Longest host name (RFC 1035 limit on a name's text form).
pub const MAX_HOST_NAME_LEN: usize = 253;
/// Longest IPv6 zone (interface) name accepted after `%`.
pub const MAX_ZONE_LEN: usize = 64;

/// Mode of a qssh directory we create.
pub const HOME_DIR_MODE: u32 = 0o700;
/// Mode of the identity file, from its creation on.
pub const IDENTITY_FILE_MODE: u32 = 0o600;
/// Mode of a `known_peers` file we create (public data, like OpenSSH's `known_hosts`).
pub const KNOWN_PEERS_FILE_MODE: u32 = 0o644;
/// Permission bits that make the identity file unusable (OpenSSH refuses keys with any of
/// these: "UNPROTECTED PRIVATE KEY FILE").
pub const IDENTITY_FORBIDDEN_BITS: u32 = 0o077;
/// Permission bits on the qssh directory that earn a warning.
pub const HOME_WARN_BITS: u32 = 0o077;
/// Permission bits that make `authorized_peers` unusable: if others can write it, they can
/// authorise themselves (sshd's StrictModes).
pub const AUTHORIZED_FORBIDDEN_BITS: u32 = 0o022;
/// Attempts at finding an unused temporary file name before giving up.
const TEMP_NAME_ATTEMPTS: usize = 16;

/// Command the user runs to create an identity (named in error messages).
pub const KEYGEN_COMMAND: &str = "qssh keygen";
/// Command the user runs to drop a host's `known_peers` entries (named in the mismatch
/// error); it is expected to call [`Home::remove_known`].
pub const FORGET_COMMAND: &str = "qssh forget";

/// Everything that can go wrong with the on-disk state. `Display` is one line: what failed,
/// why, and what to do.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error(
        "cannot find the qssh directory: neither ${HOME_ENV} nor $HOME is set (set one of them)"
    )]
    NoHome,
    #[error("{} is not a directory: point ${HOME_ENV} at a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a regular file: move it away", .0.display())]
    NotAFile(PathBuf),
    #[error("{} is {size} bytes, more than the {MAX_FILE_SIZE}-byte limit: is it the right file?", .path.display())]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{}: not valid UTF-8 on line {line}: fix or remove that line", .path.display())]
    NotUtf8 { path: PathBuf, line: usize },
    #[error(
        "UNPROTECTED PRIVATE KEY FILE: permissions {mode:04o} for identity {} are too open \
         (it must not be accessible by others), so it was not used: run `chmod 600 {}`",
        .path.display(), .path.display()
    )]
    UnprotectedIdentity { path: PathBuf, mode: u32 },
    #[error(
        "{} is writable by group or others (mode {mode:04o}), so anyone could authorise \
         themselves; it was not used: run `chmod go-w {}`",
        .path.display(), .path.display()
    )]
    InsecureAuthorizedPeers { path: PathBuf, mode: u32 },
    #[error("no identity at {}: run `{KEYGEN_COMMAND}` to create one", .0.display())]
    NoIdentity(PathBuf),
    #[error("identity already exists at {}: use --force to replace it (this changes your peer ID)", .0.display())]
    IdentityExists(PathBuf),
    #[error(
        "cannot use identity {}: {source}; the file was left untouched: restore it from a \
         backup, or move it away and run `{KEYGEN_COMMAND}` (this creates a new peer ID)",
        .path.display()
    )]
    BadIdentity {
        path: PathBuf,
        #[source]
        source: IdentityError,
    },
    #[error("{}:{line}: {message}", .path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("invalid address {input:?}: {reason} (expected HOST, HOST:PORT, IPv6 or [IPv6]:PORT)")]
    BadAddress { input: String, reason: &'static str },
    #[error(
        "WARNING: PEER IDENTITY FOR {host} HAS CHANGED! Someone could be eavesdropping on you \
         (man-in-the-middle attack), or the peer got a new identity. It presented peer ID \
         {presented}, but {}:{line} expects {expected}. If you trust the change, remove the \
         old entry with `{FORGET_COMMAND} {host}` and connect again",
        .file.display()
    )]
    PeerChanged {
        host: String,
        presented: PeerId,
        expected: PeerId,
        file: PathBuf,
        line: usize,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The qssh directory.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

/// An identity and whether [`Home::load_or_create_identity`] had to create it.
#[derive(Debug)]
pub struct LoadedIdentity {
    pub identity: Identity,
    /// True if no identity existed and this one was generated and saved just now.
    pub created: bool,
}

impl Home {
    /// `$QSSH_HOME` if set and not empty, else `$HOME/.qssh`; created if missing.
    pub fn from_env() -> Result<Self, StoreError> {
        Self::open(home_dir_from(
            std::env::var_os(HOME_ENV),
            std::env::var_os("HOME"),
        )?)
    }

    /// Opens the qssh directory at `path`, creating it (and missing parents) with mode 0700.
    /// An existing directory that group or others can access is used, with a warning.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = path.into();
        match fs::metadata(&dir) {
            Ok(meta) if !meta.is_dir() => return Err(StoreError::NotADirectory(dir)),
            Ok(meta) => {
                let mode = meta.mode() & 0o7777;
                if mode & HOME_WARN_BITS != 0 {
                    tracing::warn!(
                        "qssh directory {} is accessible by group or others (mode {mode:04o}): \
                         run `chmod 700 {}`",
                        dir.display(),
                        dir.display()
                    );
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                DirBuilder::new()
                    .recursive(true)
                    .mode(HOME_DIR_MODE)
                    .create(&dir)
                    .map_err(io_err("create directory", &dir))?;
            }
            Err(e) => return Err(io_err("open directory", &dir)(e)),
        }
        Ok(Home { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
    pub fn identity_path(&self) -> PathBuf {
        self.dir.join(IDENTITY_FILE)
    }
    pub fn known_peers_path(&self) -> PathBuf {
        self.dir.join(KNOWN_PEERS_FILE)
    }
    pub fn authorized_peers_path(&self) -> PathBuf {
        self.dir.join(AUTHORIZED_PEERS_FILE)
    }

    // ----- identity -----

    /// Loads the identity; a missing file is [`StoreError::NoIdentity`].
    pub fn load_identity(&self) -> Result<Identity, StoreError> {
        let path = self.identity_path();
        self.read_identity()?.ok_or(StoreError::NoIdentity(path))
    }

    /// Loads the identity, or generates one of algorithm `alg` and saves it if none exists
    /// (an existing identity is returned whatever its algorithm). A file that exists but
    /// cannot be used is an error: it is never replaced.
    pub fn load_or_create_identity(&self, alg: Algorithm) -> Result<LoadedIdentity, StoreError> {
        if let Some(identity) = self.read_identity()? {
            return Ok(LoadedIdentity {
                identity,
                created: false,
            });
        }
        let identity = Identity::generate(alg, &mut OsRandom);
        if self.write_identity(&identity, false)? {
            tracing::debug!(peer = %identity.peer_id(), "created identity");
            return Ok(LoadedIdentity {
                identity,
                created: true,
            });
        }
        // Another process created one between our read and our write: use theirs.
        let path = self.identity_path();
        let identity = self.read_identity()?.ok_or(StoreError::NoIdentity(path))?;
        Ok(LoadedIdentity {
            identity,
            created: false,
        })
    }

    /// Generates and saves a new identity. Refuses to replace an existing one unless
    /// `force`; with `force` the old file is replaced atomically.
    pub fn keygen(&self, alg: Algorithm, force: bool) -> Result<Identity, StoreError> {
        let path = self.identity_path();
        if !force && exists(&path)? {
            return Err(StoreError::IdentityExists(path));
        }
        let identity = Identity::generate(alg, &mut OsRandom);
        if !self.write_identity(&identity, force)? {
            return Err(StoreError::IdentityExists(path));
        }
        Ok(identity)
    }

    /// Reads and validates the identity file; `None` if there is none.
    fn read_identity(&self) -> Result<Option<Identity>, StoreError> {
        let path = self.identity_path();
        let Some(bytes) = read_bounded(&path, ModeCheck::PrivateKey)? else {
            return Ok(None);
        };
        Identity::decode(&bytes)
            .map(Some)
            .map_err(|source| StoreError::BadIdentity { path, source })
    }

    /// Writes the identity atomically with mode 0600 from creation on. With `replace`, an
    /// existing file is replaced; without, an existing file is kept and `false` returned.
    fn write_identity(&self, identity: &Identity, replace: bool) -> Result<bool, StoreError> {
        let path = self.identity_path();
        let tmp = TempFile::create(&self.dir, IDENTITY_FILE, IDENTITY_FILE_MODE)?;
        tmp.write_all(&identity.encode())?;
        let written = if replace {
            tmp.rename_to(&path)?;
            true
        } else {
            tmp.link_to(&path)?
        };
        if written {
            sync_dir(&self.dir)?;
        }
        Ok(written)
    }

    // ----- known_peers -----

    /// All `known_peers` entries (none if the file does not exist).
    pub fn known_peers(&self) -> Result<Vec<KnownPeer>, StoreError> {
        let path = self.known_peers_path();
        match read_text(&path, ModeCheck::Any)? {
            Some(text) => parse_known_peers(&text, &path),
            None => Ok(Vec::new()),
        }
    }

    /// Looks `host_port` up: `Known` if any of its entries has `peer`, `Mismatch` (naming the
    /// first entry) if it has entries but none with `peer`, `Unknown` if it has none.
    pub fn check_known(&self, host_port: &str, peer: &PeerId) -> Result<KnownStatus, StoreError> {
        let key = normalize_host_port(host_port)?;
        let mut mismatch = None;
        for entry in self
            .known_peers()?
            .into_iter()
            .filter(|e| e.host_port == key)
        {
            if entry.peer == *peer {
                return Ok(KnownStatus::Known);
            }
            mismatch.get_or_insert(KnownStatus::Mismatch {
                file: self.known_peers_path(),
                line: entry.line,
                expected: entry.peer,
            });
        }
        Ok(mismatch.unwrap_or(KnownStatus::Unknown))
    }

    /// Appends `HOST:PORT PEERID` to `known_peers` (created with mode 0644), unless that exact
    /// entry is already there; returns whether a line was added. Other entries for the same
    /// host stay: a host may have several accepted peers. To replace, [`Home::remove_known`]
    /// first.
    pub fn add_known(&self, host_port: &str, peer: &PeerId) -> Result<bool, StoreError> {
        let key = normalize_host_port(host_port)?;
        let path = self.known_peers_path();
        let existing = read_text(&path, ModeCheck::Any)?;
        let mut line = String::new();
        if let Some(text) = &existing {
            let entries = parse_known_peers(text, &path)?;
            if entries
                .iter()
                .any(|e| e.host_port == key && e.peer == *peer)
            {
                return Ok(false);
            }
            if !text.is_empty() && !text.ends_with('\n') {
                line.push('\n');
            }
        }
        line.push_str(&format!("{key} {peer}\n"));
        let size = existing.as_ref().map_or(0, |t| t.len()) + line.len();
        if size as u64 > MAX_FILE_SIZE {
            return Err(StoreError::TooLarge {
                path,
                size: size as u64,
            });
        }
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(KNOWN_PEERS_FILE_MODE)
            .open(&path)
            .map_err(io_err("open", &path))?;
        // One write of one short line: with O_APPEND, concurrent writers do not interleave.
        file.write_all(line.as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(io_err("write", &path))?;
        Ok(true)
    }

    /// Removes every `known_peers` entry for `host_port` (comments and other lines are kept
    /// verbatim, the file is rewritten atomically with its mode); returns how many went.
    pub fn remove_known(&self, host_port: &str) -> Result<usize, StoreError> {
        let key = normalize_host_port(host_port)?;
        let path = self.known_peers_path();
        let Some(text) = read_text(&path, ModeCheck::Any)? else {
            return Ok(0);
        };
        let mut kept = String::with_capacity(text.len());
        let mut removed = 0;
        for raw in text.split_inclusive('\n') {
            match parse_known_line(raw) {
                Ok(Some((host, _))) if host == key => removed += 1,
                // Lines that do not parse are kept for the user to fix.
                _ => kept.push_str(raw),
            }
        }
        if removed > 0 {
            let mode = fs::metadata(&path).map_err(io_err("read", &path))?.mode() & 0o777;
            let tmp = TempFile::create(&self.dir, KNOWN_PEERS_FILE, mode)?;
            tmp.write_all(kept.as_bytes())?;
            tmp.rename_to(&path)?;
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    // ----- authorized_peers -----

    /// All `authorized_peers` entries (none if the file does not exist). The file is refused
    /// if group or others can write it.
    pub fn authorized_peers(&self) -> Result<Vec<Authorized>, StoreError> {
        let path = self.authorized_peers_path();
        match read_text(&path, ModeCheck::NotWritableByOthers)? {
            Some(text) => parse_authorized_peers(&text, &path),
            None => Ok(Vec::new()),
        }
    }

    /// The `authorized_peers` entry for `peer`, if any.
    pub fn find_authorized(&self, peer: &PeerId) -> Result<Option<Authorized>, StoreError> {
        Ok(self
            .authorized_peers()?
            .into_iter()
            .find(|a| a.peer == *peer))
    }
}

/// Where the qssh directory is, given `$QSSH_HOME` and `$HOME` (empty counts as unset).
pub fn home_dir_from(
    qssh_home: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf, StoreError> {
    match (qssh_home, home) {
        (Some(q), _) if !q.is_empty() => Ok(PathBuf::from(q)),
        (_, Some(h)) if !h.is_empty() => Ok(PathBuf::from(h).join(DEFAULT_HOME_DIR)),
        _ => Err(StoreError::NoHome),
    }
}

fn exists(path: &Path) -> Result<bool, StoreError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// What a file's permissions must satisfy before it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModeCheck {
    Any,
    /// No [`IDENTITY_FORBIDDEN_BITS`].
    PrivateKey,
    /// No [`AUTHORIZED_FORBIDDEN_BITS`].
    NotWritableByOthers,
}

/// Reads a whole file of at most [`MAX_FILE_SIZE`] bytes into zeroizing memory; `None` if
/// it does not exist. Refuses non-regular files and files failing `check`; the checks use
/// the opened file, so they hold for what is read.
fn read_bounded(path: &Path, check: ModeCheck) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let meta = file.metadata().map_err(io_err("read", path))?;
    if !meta.is_file() {
        return Err(StoreError::NotAFile(path.to_path_buf()));
    }
    let mode = meta.mode() & 0o7777;
    match check {
        ModeCheck::PrivateKey if mode & IDENTITY_FORBIDDEN_BITS != 0 => {
            return Err(StoreError::UnprotectedIdentity {
                path: path.to_path_buf(),
                mode,
            })
        }
        ModeCheck::NotWritableByOthers if mode & AUTHORIZED_FORBIDDEN_BITS != 0 => {
            return Err(StoreError::InsecureAuthorizedPeers {
                path: path.to_path_buf(),
                mode,
            })
        }
        _ => {}
    }
    if meta.len() > MAX_FILE_SIZE {
        return Err(StoreError::TooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
        });
    }
    // Sized up front so the buffer is not reallocated (leaving unwiped copies) while reading.
    let mut buf = Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut buf)
        .map_err(io_err("read", path))?;
    if buf.len() as u64 > MAX_FILE_SIZE {
        return Err(StoreError::TooLarge {
            path: path.to_path_buf(),
            size: buf.len() as u64,
        });
    }
    Ok(Some(buf))
}

/// [`read_bounded`] for UTF-8 text.
fn read_text(path: &Path, check: ModeCheck) -> Result<Option<String>, StoreError> {
    let Some(bytes) = read_bounded(path, check)? else {
        return Ok(None);
    };
    match std::str::from_utf8(&bytes) {
        Ok(s) => Ok(Some(s.to_string())),
        Err(e) => Err(StoreError::NotUtf8 {
            path: path.to_path_buf(),
            line: 1 + bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count(),
        }),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

/// A temporary file next to its destination, created exclusively with its final mode and
/// removed on drop unless it was moved into place.
struct TempFile {
    path: PathBuf,
    file: File,
    placed: bool,
}

impl TempFile {
    fn create(dir: &Path, name: &str, mode: u32) -> Result<Self, StoreError> {
        let mut last = None;
        for _ in 0..TEMP_NAME_ATTEMPTS {
            let suffix = u64::from_be_bytes(random_array(&mut OsRandom));
            let path = dir.join(format!(".{name}.tmp-{suffix:016x}"));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(TempFile {
                        path,
                        file,
                        placed: false,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(io_err("create a file in", dir)(e)),
            }
        }
        let e = last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists));
        Err(io_err("create a file in", dir)(e))
    }

    fn write_all(&self, bytes: &[u8]) -> Result<(), StoreError> {
        (&self.file)
            .write_all(bytes)
            .and_then(|()| self.file.sync_all())
            .map_err(io_err("write", &self.path))
    }

    /// Atomically replaces `dest`.
    fn rename_to(mut self, dest: &Path) -> Result<(), StoreError> {
        fs::rename(&self.path, dest).map_err(io_err("replace", dest))?;
        self.placed = true;
        Ok(())
    }

    /// Atomically creates `dest` unless it exists (then returns `false`). Falls back to a
    /// rename after a fresh existence check on file systems without hard links. After a
    /// link, dropping `self` removes only the temporary name.
    fn link_to(self, dest: &Path) -> Result<bool, StoreError> {
        match fs::hard_link(&self.path, dest) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(_) if !exists(dest)? => self.rename_to(dest).map(|()| true),
            Err(_) => Ok(false),
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.placed {
            // Best effort: a leftover is mode-protected and has an obviously temporary name.
            let _ = fs::remove_file(&self.path);
        }
    }
}

// ----- addresses -----

/// Normalises an address for `known_peers`: `HOST`, `HOST:PORT`, a bare IPv6 address or
/// `[IPv6]:PORT` become `name:port`, `a.b.c.d:port` or `[ipv6]:port`, with the port always
/// explicit ([`DEFAULT_PORT`] if none), names lowercased without a trailing dot, IP addresses
/// in canonical form and IPv4-mapped IPv6 addresses as IPv4. Names are not resolved: as with
/// `known_hosts`, the entry is for the name the user typed.
pub fn normalize_host_port(input: &str) -> Result<String, StoreError> {
    let bad = |reason| StoreError::BadAddress {
        input: input.chars().take(MAX_HOST_NAME_LEN + 16).collect(),
        reason,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(bad("empty address"));
    }
    let (host, port, bracketed) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| bad("missing ']'"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| bad("expected ':' after ']'"))?,
            ),
        };
        (host, port, true)
    } else if s.matches(':').count() > 1 {
        (s, None, true)
    } else if let Some((host, port)) = s.split_once(':') {
        (host, Some(port), false)
    } else {
        (s, None, false)
    };
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(bad("port must be 1 to 65535")),
                Ok(n) => n,
            }
        }
        Some(_) => return Err(bad("port must be 1 to 65535")),
    };
    if bracketed {
        let (addr, zone) = match host.split_once('%') {
            Some((a, z)) => (a, Some(z)),
            None => (host, None),
        };
        let ip: Ipv6Addr = addr.parse().map_err(|_| bad("invalid IPv6 address"))?;
        return match (ip.to_ipv4_mapped(), zone) {
            (Some(v4), None) => Ok(format!("{v4}:{port}")),
            (_, None) => Ok(format!("[{ip}]:{port}")),
            (_, Some(z))
                if !z.is_empty()
                    && z.len() <= MAX_ZONE_LEN
                    && z.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
            {
                Ok(format!("[{ip}%{z}]:{port}"))
            }
            _ => Err(bad("invalid IPv6 zone")),
        };
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let ip: Ipv4Addr = host.parse().map_err(|_| bad("invalid IPv4 address"))?;
        return Ok(format!("{ip}:{port}"));
    }
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && !l.starts_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || name.len() > MAX_HOST_NAME_LEN || !name.split('.').all(label_ok) {
        return Err(bad("invalid host name"));
    }
    Ok(format!("{name}:{port}"))
}

// ----- known_peers -----

/// One `known_peers` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownPeer {
    /// Normalised address (see [`normalize_host_port`]).
    pub host_port: String,
    pub peer: PeerId,
    /// 1-based line number in the file.
    pub line: usize,
}

/// What `known_peers` says about an address and the peer it presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KnownStatus {
    /// An entry for the address has this peer ID.
    Known,
    /// No entry for the address: trust on first use is the caller's decision.
    Unknown,
    /// The address has entries, none with this peer ID; `line` is the first of them.
    Mismatch {
        file: PathBuf,
        line: usize,
        expected: PeerId,
    },
}

impl KnownStatus {
    /// `Known` and `Unknown` pass through; a mismatch becomes the loud
    /// [`StoreError::PeerChanged`] the user must see.
    pub fn into_result(
        self,
        host_port: &str,
        presented: &PeerId,
    ) -> Result<KnownStatus, StoreError> {
        match self {
            KnownStatus::Mismatch {
                file,
                line,
                expected,
            } => Err(StoreError::PeerChanged {
                host: normalize_host_port(host_port).unwrap_or_else(|_| host_port.to_string()),
                presented: *presented,
                expected,
                file,
                line,
            }),
            other => Ok(other),
        }
    }
}

/// Splits a line into its content and its comment (after the first `#`).
fn split_comment(raw: &str) -> (&str, Option<&str>) {
    match raw.split_once('#') {
        Some((content, comment)) => (content, Some(comment.trim())),
        None => (raw, None),
    }
}

/// Parses one `known_peers` line: `None` for blank and comment lines.
fn parse_known_line(raw: &str) -> Result<Option<(String, PeerId)>, String> {
    let mut fields = split_comment(raw).0.split_whitespace();
    let (Some(host), peer, extra) = (fields.next(), fields.next(), fields.next()) else {
        return Ok(None);
    };
    let (Some(peer), None) = (peer, extra) else {
        return Err("expected `HOST:PORT PEERID [# comment]`".into());
    };
    let host = normalize_host_port(host).map_err(|e| e.to_string())?;
    let peer = peer.parse::<PeerId>().map_err(|e| e.to_string())?;
    Ok(Some((host, peer)))
}

/// Parses a `known_peers` file; errors name `path` and the line.
pub fn parse_known_peers(text: &str, path: &Path) -> Result<Vec<KnownPeer>, StoreError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let parsed = parse_known_line(raw).map_err(|message| StoreError::Syntax {
            path: path.to_path_buf(),
            line: i + 1,
            message: format!("{message}: fix or remove the line"),
        })?;
        if let Some((host_port, peer)) = parsed {
            out.push(KnownPeer {
                host_port,
                peer,
                line: i + 1,
            });
        }
    }
    Ok(out)
}

// ----- authorized_peers -----

/// Restrictions on an authorised peer. Everything except the VPN is allowed unless an option
/// forbids it; the VPN must be granted explicitly (like sshd's `PermitTunnel no` default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PeerOptions {
    /// `no-shell`: no interactive shell.
    pub no_shell: bool,
    /// `no-exec`: no remote commands.
    pub no_exec: bool,
    /// `no-forward`: no port forwarding.
    pub no_forward: bool,
    /// `vpn`: may bring up the VPN.
    pub vpn: bool,
    /// `chat-only`: chat and nothing else (implies the three `no-` options; excludes `vpn`).
    pub chat_only: bool,
}

impl PeerOptions {
    /// Option names accepted in `authorized_peers`.
    pub const NAMES: [&'static str; 5] = ["no-shell", "no-exec", "no-forward", "vpn", "chat-only"];

    /// Parses a comma-separated list (empty items are ignored).
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut o = PeerOptions::default();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let flag = match name {
                "no-shell" => &mut o.no_shell,
                "no-exec" => &mut o.no_exec,
                "no-forward" => &mut o.no_forward,
                "vpn" => &mut o.vpn,
                "chat-only" => &mut o.chat_only,
                _ => {
                    return Err(format!(
                        "unknown option {:?} (known: {}; comments start with #)",
                        name.chars().take(40).collect::<String>(),
                        Self::NAMES.join(", ")
                    ))
                }
            };
            *flag = true;
        }
        if o.chat_only && o.vpn {
            return Err("options chat-only and vpn contradict each other".into());
        }
        Ok(o)
    }

    pub fn allows_shell(&self) -> bool {
        !self.no_shell && !self.chat_only
    }
    pub fn allows_exec(&self) -> bool {
        !self.no_exec && !self.chat_only
    }
    pub fn allows_forward(&self) -> bool {
        !self.no_forward && !self.chat_only
    }
    pub fn allows_vpn(&self) -> bool {
        self.vpn && !self.chat_only
    }
}

/// Canonical comma-separated form, in [`PeerOptions::NAMES`] order (empty if none).
impl fmt::Display for PeerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = [
            self.no_shell,
            self.no_exec,
            self.no_forward,
            self.vpn,
            self.chat_only,
        ];
        let names: Vec<&str> = Self::NAMES
            .iter()
            .zip(set)
            .filter_map(|(n, on)| on.then_some(*n))
            .collect();
        f.write_str(&names.join(","))
    }
}

/// One `authorized_peers` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    pub peer: PeerId,
    pub options: PeerOptions,
    /// The text after `#`, if any (typically who the peer is).
    pub comment: Option<String>,
    /// 1-based line number in the file.
    pub line: usize,
}

/// Parses an `authorized_peers` file; errors name `path` and the line. Options may be
/// separated by commas and/or spaces. A peer listed twice is an error (which line's options
/// would apply would be a guess).
pub fn parse_authorized_peers(text: &str, path: &Path) -> Result<Vec<Authorized>, StoreError> {
    let mut out: Vec<Authorized> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let syntax = |message: String| StoreError::Syntax {
            path: path.to_path_buf(),
            line,
            message,
        };
        let (content, comment) = split_comment(raw);
        let mut fields = content.split_whitespace();
        let Some(peer) = fields.next() else {
            continue;
        };
        let peer = peer
            .parse::<PeerId>()
            .map_err(|e| syntax(format!("{e}: expected `PEERID [options] [# comment]`")))?;
        let options = PeerOptions::parse(&fields.collect::<Vec<_>>().join(",")).map_err(syntax)?;
        if let Some(first) = out.iter().find(|a| a.peer == peer) {
            return Err(syntax(format!(
                "peer {peer} is already listed on line {}: merge the two lines",
                first.line
            )));
        }
        out.push(Authorized {
            peer,
            options,
            comment: comment.filter(|c| !c.is_empty()).map(str::to_string),
            line,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::crypto::DeterministicRandom;
    use std::os::unix::fs::PermissionsExt;

    fn home() -> (tempfile::TempDir, Home) {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::open(tmp.path().join("qssh")).unwrap();
        (tmp, home)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    fn peer(seed: u64) -> PeerId {
        Identity::generate(Algorithm::Falcon512, &mut DeterministicRandom::new(seed)).peer_id()
    }

    fn leftovers(home: &Home) -> Vec<String> {
        fs::read_dir(home.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn home_location_from_environment() {
        let q = |s: &str| Some(OsString::from(s));
        assert_eq!(
            home_dir_from(q("/x/q"), q("/h")).unwrap(),
            Path::new("/x/q")
        );
        assert_eq!(
            home_dir_from(q(""), q("/h")).unwrap(),
            Path::new("/h/.qssh")
        );
        assert_eq!(home_dir_from(None, q("/h")).unwrap(), Path::new("/h/.qssh"));
        assert!(matches!(
            home_dir_from(None, q("")),
            Err(StoreError::NoHome)
        ));
        assert!(matches!(home_dir_from(None, None), Err(StoreError::NoHome)));
    }

    #[test]
    fn home_is_created_0700_and_a_file_is_refused() {
        let (tmp, home) = home();
        assert_eq!(mode(home.path()), HOME_DIR_MODE);
        // An existing, too-open directory still works (with a warning).
        let open_dir = tmp.path().join("open");
        fs::create_dir(&open_dir).unwrap();
        fs::set_permissions(&open_dir, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(Home::open(&open_dir).unwrap().path(), open_dir);
        assert_eq!(
            mode(&open_dir),
            0o755,
            "an existing directory is not changed"
        );
        let file = tmp.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            Home::open(&file),
            Err(StoreError::NotADirectory(_))
        ));
    }

    #[test]
    fn identity_is_created_0600_once_and_reloaded() {
        let (_tmp, home) = home();
        assert!(matches!(
            home.load_identity(),
            Err(StoreError::NoIdentity(_))
        ));
        let first = home.load_or_create_identity(Algorithm::Falcon512).unwrap();
        assert!(first.created);
        assert_eq!(mode(&home.identity_path()), IDENTITY_FILE_MODE);
        // A second call loads the same identity, whatever algorithm it asks for.
        let again = home
            .load_or_create_identity(Algorithm::SlhDsaSha2_128f)
            .unwrap();
        assert!(!again.created);
        assert_eq!(again.identity.peer_id(), first.identity.peer_id());
        assert_eq!(
            home.load_identity().unwrap().peer_id(),
            first.identity.peer_id()
        );
        assert!(leftovers(&home).is_empty());
    }

    #[test]
    fn keygen_refuses_to_overwrite_without_force() {
        let (_tmp, home) = home();
        let first = home.keygen(Algorithm::Falcon512, false).unwrap();
        assert_eq!(mode(&home.identity_path()), IDENTITY_FILE_MODE);
        let err = home.keygen(Algorithm::Falcon512, false).unwrap_err();
        assert!(matches!(err, StoreError::IdentityExists(_)));
        assert_eq!(
            err.to_string(),
            format!(
                "identity already exists at {}: use --force to replace it (this changes your peer ID)",
                home.identity_path().display()
            )
        );
        assert_eq!(home.load_identity().unwrap().peer_id(), first.peer_id());

        let second = home.keygen(Algorithm::SlhDsaSha2_128f, true).unwrap();
        assert_ne!(second.peer_id(), first.peer_id());
        let loaded = home.load_identity().unwrap();
        assert_eq!(loaded.peer_id(), second.peer_id());
        assert_eq!(loaded.public().algorithm(), Algorithm::SlhDsaSha2_128f);
        assert_eq!(mode(&home.identity_path()), IDENTITY_FILE_MODE);
        assert!(leftovers(&home).is_empty());
    }

    #[test]
    fn corrupt_or_foreign_identity_is_an_error_and_never_replaced() {
        let (_tmp, home) = home();
        let path = home.identity_path();
        let id = home.keygen(Algorithm::Falcon512, false).unwrap();
        let mut corrupt = id.encode().to_vec();
        // A byte of the public-key hash at the end of the fn-dsa secret key.
        let hash_byte = IDENTITY_MAGIC_LEN + 1 + 2 + Algorithm::Falcon512.secret_key_len() - 1;
        corrupt[hash_byte] ^= 1;
        let cases: [(&[u8], &str); 3] = [
            (b"-----BEGIN OPENSSH PRIVATE KEY-----\n", "bad magic"),
            (&corrupt, "do not match"),
            (&corrupt[..100], "truncated"),
        ];
        for (bytes, why) in cases {
            fs::write(&path, bytes).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = home
                .load_or_create_identity(Algorithm::Falcon512)
                .unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, StoreError::BadIdentity { .. }), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(why), "{msg}");
            assert!(!msg.contains('\n'));
            assert!(home.load_identity().is_err());
            assert_eq!(
                fs::read(&path).unwrap(),
                bytes,
                "file must be left untouched"
            );
        }
    }

    const IDENTITY_MAGIC_LEN: usize = crate::core::identity::IDENTITY_MAGIC.len();

    #[test]
    fn identity_readable_by_others_is_refused() {
        let (_tmp, home) = home();
        let path = home.identity_path();
        let id = home.keygen(Algorithm::Falcon512, false).unwrap();
        for bad in [0o644, 0o640, 0o604, 0o610] {
            fs::set_permissions(&path, fs::Permissions::from_mode(bad)).unwrap();
            let err = home.load_identity().unwrap_err();
            assert!(
                matches!(err, StoreError::UnprotectedIdentity { mode, .. } if mode == bad),
                "{err}"
            );
            let msg = err.to_string();
            assert!(msg.contains("UNPROTECTED PRIVATE KEY FILE"), "{msg}");
            assert!(
                msg.contains(&format!("chmod 600 {}", path.display())),
                "{msg}"
            );
            // ... and it is not replaced by a new identity either.
            assert!(home.load_or_create_identity(Algorithm::Falcon512).is_err());
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(home.load_identity().unwrap().peer_id(), id.peer_id());
    }

    #[test]
    fn oversized_files_are_refused() {
        let (_tmp, home) = home();
        let big = vec![b'#'; MAX_FILE_SIZE as usize + 1];
        fs::write(home.known_peers_path(), &big).unwrap();
        let err = home.check_known("h", &peer(1)).unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
        assert!(matches!(
            home.add_known("h", &peer(1)),
            Err(StoreError::TooLarge { .. })
        ));
        fs::write(home.identity_path(), &big).unwrap();
        fs::set_permissions(home.identity_path(), fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            home.load_or_create_identity(Algorithm::Falcon512),
            Err(StoreError::TooLarge { .. })
        ));
        // Exactly at the limit is fine.
        fs::write(home.known_peers_path(), &big[1..]).unwrap();
        assert_eq!(
            home.check_known("h", &peer(1)).unwrap(),
            KnownStatus::Unknown
        );
    }

    #[test]
    fn addresses_are_normalised() {
        let n = |s: &str| normalize_host_port(s).unwrap();
        assert_eq!(n("127.0.0.1"), "127.0.0.1:22222");
        assert_eq!(n("127.0.0.1:22"), "127.0.0.1:22");
        assert_eq!(n("::1"), "[::1]:22222");
        assert_eq!(n("[::1]"), "[::1]:22222");
        assert_eq!(n("[0:0:0:0:0:0:0:1]:2222"), "[::1]:2222");
        assert_eq!(n("[::ffff:10.0.0.1]:7"), "10.0.0.1:7");
        assert_eq!(n("[fe80::1%eth0]:22"), "[fe80::1%eth0]:22");
        assert_eq!(n("Example.COM."), "example.com:22222");
        assert_eq!(n(" host-1.lan:65535 "), "host-1.lan:65535");
        for bad in [
            "",
            "host:",
            "host:0",
            "host:65536",
            "host:+22",
            "[::1",
            "[::1]22",
            "[nothost]:22",
            "1.2.3",
            "1.2.3.256",
            "a..b",
            "-a",
            "a b",
            "a#b",
            "a,b",
            "[fe80::1%]:22",
        ] {
            let err = normalize_host_port(bad).unwrap_err();
            assert!(matches!(err, StoreError::BadAddress { .. }), "{bad:?}");
        }
    }

    #[test]
    fn known_peers_add_check_and_mismatch_line() {
        let (_tmp, home) = home();
        let (a, b, c) = (peer(1), peer(2), peer(3));
        assert_eq!(home.check_known("h", &a).unwrap(), KnownStatus::Unknown);
        assert!(home.add_known("127.0.0.1", &a).unwrap());
        assert_eq!(mode(&home.known_peers_path()), KNOWN_PEERS_FILE_MODE);
        assert!(
            !home.add_known("127.0.0.1:22222", &a).unwrap(),
            "no duplicate"
        );
        assert!(home.add_known("[::1]:2222", &b).unwrap());
        assert_eq!(
            fs::read_to_string(home.known_peers_path()).unwrap(),
            format!("127.0.0.1:22222 {a}\n[::1]:2222 {b}\n")
        );
        assert_eq!(
            home.check_known("127.0.0.1:22222", &a).unwrap(),
            KnownStatus::Known
        );
        assert_eq!(
            home.check_known("127.0.0.1:22", &a).unwrap(),
            KnownStatus::Unknown,
            "another port is another host"
        );
        let status = home.check_known("[0::1]:2222", &c).unwrap();
        assert_eq!(
            status,
            KnownStatus::Mismatch {
                file: home.known_peers_path(),
                line: 2,
                expected: b
            }
        );
        let err = status.into_result("[0::1]:2222", &c).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("HAS CHANGED"), "{msg}");
        assert!(
            msg.contains(&format!(
                "{}:2 expects {b}",
                home.known_peers_path().display()
            )),
            "{msg}"
        );
        assert!(msg.contains(&c.to_string()), "{msg}");
        assert!(msg.contains("`qssh forget [::1]:2222`"), "{msg}");
        assert!(!msg.contains('\n'));
        assert_eq!(
            KnownStatus::Known.into_result("h", &c).unwrap(),
            KnownStatus::Known
        );
    }

    #[test]
    fn known_peers_comments_blank_lines_and_several_entries_per_host() {
        let (_tmp, home) = home();
        let (a, b, c) = (peer(1), peer(2), peer(3));
        let text = format!(
            "# my peers\n\n   \nexample.com {a}   # old key\r\n\tEXAMPLE.com:22222\t{b}\nother:1 {c}"
        );
        fs::write(home.known_peers_path(), &text).unwrap();
        let entries = home.known_peers().unwrap();
        assert_eq!(
            entries
                .iter()
                .map(|e| (e.host_port.as_str(), e.line))
                .collect::<Vec<_>>(),
            [
                ("example.com:22222", 4),
                ("example.com:22222", 5),
                ("other:1", 6)
            ]
        );
        assert_eq!(
            home.check_known("example.com", &a).unwrap(),
            KnownStatus::Known
        );
        assert_eq!(
            home.check_known("example.com", &b).unwrap(),
            KnownStatus::Known
        );
        match home.check_known("example.com", &c).unwrap() {
            KnownStatus::Mismatch { line, expected, .. } => assert_eq!((line, expected), (4, a)),
            other => panic!("{other:?}"),
        }
        // Appending after a last line without newline starts a new line.
        home.add_known("new", &a).unwrap();
        assert!(fs::read_to_string(home.known_peers_path())
            .unwrap()
            .ends_with(&format!("other:1 {c}\nnew:22222 {a}\n")));
        // Removing keeps comments and other hosts.
        assert_eq!(home.remove_known("Example.com:22222").unwrap(), 2);
        assert_eq!(home.remove_known("example.com").unwrap(), 0);
        assert_eq!(
            fs::read_to_string(home.known_peers_path()).unwrap(),
            format!("# my peers\n\n   \nother:1 {c}\nnew:22222 {a}\n")
        );
        assert_eq!(mode(&home.known_peers_path()), KNOWN_PEERS_FILE_MODE);
        assert_eq!(
            home.check_known("example.com", &c).unwrap(),
            KnownStatus::Unknown
        );
        assert!(leftovers(&home).is_empty());
    }

    #[test]
    fn known_peers_syntax_errors_name_file_and_line() {
        let (_tmp, home) = home();
        let a = peer(1);
        let path = home.known_peers_path();
        for (text, line, needle) in [
            (format!("h {a}\nh2\n"), 2, "expected `HOST:PORT PEERID"),
            (
                format!("# c\nh {a} extra\n"),
                2,
                "expected `HOST:PORT PEERID",
            ),
            (format!("h:0 {a}\n"), 1, "port must be 1 to 65535"),
            ("h nopeer\n".to_string(), 1, "invalid peer ID"),
        ] {
            fs::write(&path, &text).unwrap();
            let msg = home.check_known("h", &a).unwrap_err().to_string();
            assert!(
                msg.starts_with(&format!("{}:{line}: ", path.display())),
                "{msg}"
            );
            assert!(msg.contains(needle), "{msg}");
        }
        fs::write(&path, b"h \xff\n").unwrap();
        assert!(matches!(
            home.check_known("h", &a),
            Err(StoreError::NotUtf8 { line: 1, .. })
        ));
    }

    #[test]
    fn authorized_peers_parse_options_and_comments() {
        let (a, b, c, d) = (peer(1), peer(2), peer(3), peer(4));
        let text = format!(
            "# who may connect\n\n{a}\n{b} no-shell,no-forward # bob's laptop\n\
             {c} vpn, no-exec\n{d} chat-only#\n"
        );
        let list = parse_authorized_peers(&text, Path::new("ap")).unwrap();
        assert_eq!(list.len(), 4);
        assert_eq!(
            (list[0].peer, list[0].options, list[0].line),
            (a, PeerOptions::default(), 3)
        );
        assert!(list[0].options.allows_shell() && !list[0].options.allows_vpn());
        assert_eq!(list[1].comment.as_deref(), Some("bob's laptop"));
        assert_eq!(list[1].options.to_string(), "no-shell,no-forward");
        assert!(!list[1].options.allows_shell() && list[1].options.allows_exec());
        assert_eq!(list[2].options.to_string(), "no-exec,vpn");
        assert!(list[2].options.allows_vpn() && !list[2].options.allows_exec());
        let chat = list[3].options;
        assert_eq!(list[3].comment, None);
        assert!(!chat.allows_shell() && !chat.allows_exec());
        assert!(!chat.allows_forward() && !chat.allows_vpn());
        assert_eq!(PeerOptions::parse(&chat.to_string()).unwrap(), chat);
    }

    #[test]
    fn authorized_peers_errors_name_file_and_line() {
        let (a, b) = (peer(1), peer(2));
        let path = Path::new("/h/.qssh/authorized_peers");
        for (text, line, needle) in [
            (
                format!("{a}\n{b} no-shell,sudo\n"),
                2,
                "unknown option \"sudo\"",
            ),
            (format!("{a} laptop\n"), 1, "comments start with #"),
            (format!("{a} chat-only,vpn\n"), 1, "contradict"),
            (
                format!("# x\n\n{}\n", &a.to_string()[1..]),
                3,
                "invalid peer ID",
            ),
            (
                format!("{a}\n{b}\n{a} vpn\n"),
                3,
                "already listed on line 1",
            ),
        ] {
            let msg = parse_authorized_peers(&text, path).unwrap_err().to_string();
            assert!(
                msg.starts_with(&format!("/h/.qssh/authorized_peers:{line}: ")),
                "{msg}"
            );
            assert!(msg.contains(needle), "{msg}");
        }
    }

    #[test]
    fn authorized_peers_file_lookup_and_permissions() {
        let (_tmp, home) = home();
        let (a, b) = (peer(1), peer(2));
        assert!(home.authorized_peers().unwrap().is_empty());
        let path = home.authorized_peers_path();
        fs::write(&path, format!("{a} no-exec # alice\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let found = home.find_authorized(&a).unwrap().unwrap();
        assert!(found.options.no_exec);
        assert_eq!(home.find_authorized(&b).unwrap(), None);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o664)).unwrap();
        let err = home.find_authorized(&a).unwrap_err();
        assert!(
            matches!(err, StoreError::InsecureAuthorizedPeers { mode: 0o664, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod go-w"));
    }
}
