//! Who a session belongs to when the server authenticates users, and the seam that checks a
//! token for the hub (`refresh`). The hub knows nothing of JWTs: the server verifies tokens
//! (`crate::auth`) and hands the hub an [`Identity`].

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use crate::protocol::ErrorBody;

/// A verified user: from a token's `sub`, `name`, `rooms` and `exp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id (`sub`): sessions of one user are one member of a room's presence.
    pub user: Arc<str>,
    /// The display name (`name`, or `sub`).
    pub name: String,
    /// The rooms the user may join, if limited: exact names, or prefixes ending in `*`.
    pub rooms: Option<Arc<[String]>>,
    /// When the token expires; the session ends then unless refreshed.
    pub expires_at: SystemTime,
}

impl Identity {
    /// Whether the user may join `room`.
    pub fn may_join(&self, room: &str) -> bool {
        self.rooms.as_deref().is_none_or(|rules| {
            rules.iter().any(|rule| match rule.strip_suffix('*') {
                Some(prefix) => room.starts_with(prefix),
                None => rule == room,
            })
        })
    }
}

/// Checks a token and says whose it is; `Err` carries the documented `token_*` code.
pub trait TokenVerifier: Send + Sync + fmt::Debug {
    /// The identity a token proves.
    fn verify(&self, token: &str) -> Result<Identity, ErrorBody>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_rules_are_exact_names_or_prefixes() {
        let identity = Identity {
            user: Arc::from("alice"),
            name: "Alice".into(),
            rooms: Some(Arc::from(vec!["lobby".to_owned(), "support.*".to_owned()])),
            expires_at: SystemTime::now(),
        };
        assert!(identity.may_join("lobby"));
        assert!(identity.may_join("support.eu"));
        assert!(!identity.may_join("lobby2"));
        assert!(!identity.may_join("support"));
        let anywhere = Identity {
            rooms: None,
            ..identity
        };
        assert!(anywhere.may_join("anything"));
    }
}
