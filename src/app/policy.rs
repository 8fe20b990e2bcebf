//! Who may open which channel on a listener.
//!
//! Chat is open to every authenticated peer. Shell, exec and forwarding are served only to
//! peers listed in `$QSSH_HOME/authorized_peers` (read at every request, like sshd reads
//! `authorized_keys`, so an edit takes effect without a restart) or given with `--allow`,
//! and only as far as that peer's options and the listener's switches allow. The VPN is
//! opt-in: offered only with `listen --vpn`, and only to `--allow` peers or peers whose
//! authorized_peers line has the `vpn` option.

use super::store::{Home, PeerOptions};
use crate::core::frame::ChannelKind;
use crate::core::identity::PeerId;
use thiserror::Error;

/// Why a channel was refused. The text is what the peer is shown (and what is logged).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    #[error("{what} is disabled on this listener")]
    Disabled { what: &'static str },
    #[error("peer {peer} is not authorized for {what} on this listener")]
    NotAuthorized { peer: PeerId, what: &'static str },
    #[error("{what} is not allowed for peer {peer} (authorized_peers option {option})")]
    Option {
        peer: PeerId,
        what: &'static str,
        option: &'static str,
    },
    #[error("{what} is not offered by this listener")]
    NotOffered { what: &'static str },
    #[error("peer {peer} is not authorized for the VPN (no `vpn` option in the listener's authorized_peers)")]
    NoVpnOption { peer: PeerId },
    #[error("the listener cannot read its authorized_peers file")]
    Unreadable,
}

/// The listener's authorization policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// `--no-shell`: no shell and no exec for anyone (exec can start an interactive shell
    /// with `-t`, so turning off one without the other would be no protection).
    pub no_shell: bool,
    /// `--no-forward`: no `-L` or `-R` forwarding for anyone.
    pub no_forward: bool,
    /// `--vpn`: the listener serves VPN channels (to peers with the `vpn` option or
    /// `--allow`).
    pub vpn: bool,
    /// `--allow PEERID` (repeatable): authorized with no restrictions, unless
    /// `authorized_peers` lists the same peer with options, which then apply.
    pub allow: Vec<PeerId>,
    /// Where `authorized_peers` lives (`None`: only `--allow` counts).
    pub home: Option<Home>,
}

/// What a channel kind is called in messages, and the option that can forbid it.
fn describe(kind: ChannelKind) -> (&'static str, &'static str) {
    match kind {
        ChannelKind::Chat => ("chat", ""),
        ChannelKind::Shell => ("shell", "no-shell"),
        ChannelKind::Exec => ("exec", "no-exec"),
        ChannelKind::ForwardTcp | ChannelKind::ReverseForward => ("port forwarding", "no-forward"),
        ChannelKind::Vpn => ("the VPN", "vpn"),
    }
}

impl Policy {
    /// The options that apply to `peer`, or `None` if it is not authorized at all.
    fn options_of(&self, peer: &PeerId) -> Result<Option<PeerOptions>, Refusal> {
        if let Some(home) = &self.home {
            match home.find_authorized(peer) {
                Ok(Some(entry)) => return Ok(Some(entry.options)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("authorized_peers: {e}");
                    return Err(Refusal::Unreadable);
                }
            }
        }
        // --allow on the command line authorizes everything offered, the VPN included.
        Ok(self.allow.contains(peer).then_some(PeerOptions {
            vpn: true,
            ..PeerOptions::default()
        }))
    }

    /// `Ok` if `peer` may open a channel of `kind`.
    pub fn authorize(&self, peer: &PeerId, kind: ChannelKind) -> Result<(), Refusal> {
        let (what, option) = describe(kind);
        let allowed: fn(&PeerOptions) -> bool = match kind {
            ChannelKind::Chat => return Ok(()),
            ChannelKind::Vpn if !self.vpn => return Err(Refusal::NotOffered { what }),
            ChannelKind::Vpn => PeerOptions::allows_vpn,
            ChannelKind::Shell | ChannelKind::Exec if self.no_shell => {
                return Err(Refusal::Disabled { what })
            }
            ChannelKind::ForwardTcp | ChannelKind::ReverseForward if self.no_forward => {
                return Err(Refusal::Disabled { what })
            }
            ChannelKind::Shell => PeerOptions::allows_shell,
            ChannelKind::Exec => PeerOptions::allows_exec,
            ChannelKind::ForwardTcp | ChannelKind::ReverseForward => PeerOptions::allows_forward,
        };
        let Some(options) = self.options_of(peer)? else {
            return Err(Refusal::NotAuthorized { peer: *peer, what });
        };
        if !allowed(&options) {
            if kind == ChannelKind::Vpn {
                return Err(Refusal::NoVpnOption { peer: *peer });
            }
            let option = if options.chat_only {
                "chat-only"
            } else {
                option
            };
            return Err(Refusal::Option {
                peer: *peer,
                what,
                option,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const KINDS: [ChannelKind; 4] = [
        ChannelKind::Shell,
        ChannelKind::Exec,
        ChannelKind::ForwardTcp,
        ChannelKind::ReverseForward,
    ];

    #[test]
    fn strangers_get_chat_only() {
        let p = Policy::default();
        let stranger = PeerId([7; 32]);
        assert_eq!(p.authorize(&stranger, ChannelKind::Chat), Ok(()));
        for k in KINDS {
            assert!(matches!(
                p.authorize(&stranger, k),
                Err(Refusal::NotAuthorized { .. })
            ));
        }
        assert!(matches!(
            p.authorize(&stranger, ChannelKind::Vpn),
            Err(Refusal::NotOffered { .. })
        ));
    }

    #[test]
    fn allow_list_and_switches() {
        let friend = PeerId([1; 32]);
        let mut p = Policy {
            allow: vec![friend],
            ..Default::default()
        };
        for k in KINDS {
            assert_eq!(p.authorize(&friend, k), Ok(()), "{k:?}");
        }
        p.no_shell = true;
        assert!(matches!(
            p.authorize(&friend, ChannelKind::Shell),
            Err(Refusal::Disabled { .. })
        ));
        assert!(p.authorize(&friend, ChannelKind::Exec).is_err());
        assert_eq!(p.authorize(&friend, ChannelKind::ForwardTcp), Ok(()));
        p.no_forward = true;
        assert!(p.authorize(&friend, ChannelKind::ForwardTcp).is_err());
        assert!(p.authorize(&friend, ChannelKind::ReverseForward).is_err());
        assert_eq!(p.authorize(&friend, ChannelKind::Chat), Ok(()));
    }

    #[test]
    fn authorized_peers_options_apply_and_file_errors_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::open(dir.path().join("h")).unwrap();
        let (shell_less, chat_only, listed_and_allowed) =
            (PeerId([2; 32]), PeerId([3; 32]), PeerId([4; 32]));
        std::fs::write(
            home.authorized_peers_path(),
            format!(
                "# friends\n{shell_less} no-shell\n{chat_only} chat-only # bot\n{listed_and_allowed} no-forward\n"
            ),
        )
        .unwrap();
        let p = Policy {
            home: Some(home.clone()),
            allow: vec![listed_and_allowed],
            ..Default::default()
        };
        assert!(matches!(
            p.authorize(&shell_less, ChannelKind::Shell),
            Err(Refusal::Option {
                option: "no-shell",
                ..
            })
        ));
        assert_eq!(p.authorize(&shell_less, ChannelKind::Exec), Ok(()));
        for k in KINDS {
            assert!(matches!(
                p.authorize(&chat_only, k),
                Err(Refusal::Option {
                    option: "chat-only",
                    ..
                })
            ));
        }
        // The file's options win over --allow.
        assert!(p
            .authorize(&listed_and_allowed, ChannelKind::ForwardTcp)
            .is_err());
        assert_eq!(p.authorize(&listed_and_allowed, ChannelKind::Shell), Ok(()));
        // A file others can write is refused, and so is everyone it would have authorized.
        std::fs::set_permissions(
            home.authorized_peers_path(),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        assert_eq!(
            p.authorize(&shell_less, ChannelKind::Exec),
            Err(Refusal::Unreadable)
        );
    }
}
