//! A room: its members in join order and its history ring.
//!
//! Rooms fan events out to members' sessions: each event is encoded once by the caller and
//! the shared bytes are pushed to every member. The hub holds the chat lock around every
//! call, so all members see a room's events in the same order.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::protocol::{EncodedEvent, Event, Message, PresenceAction};

use super::session::Session;

/// One chat room.
#[derive(Debug, Default)]
pub struct Room {
    members: Vec<Arc<Session>>,
    history: VecDeque<Arc<Message>>,
    /// Hub-wide tick of the last join/leave/send, to drop the least recently used empty room.
    pub(crate) last_used: u64,
}

impl Room {
    /// Whether a session is a member.
    pub fn contains(&self, session: &Session) -> bool {
        self.members.iter().any(|m| m.id == session.id)
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the room has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Adds a member (the caller checked it was not one).
    pub fn add(&mut self, session: Arc<Session>) {
        self.members.push(session);
    }

    /// Removes a member; returns whether it was one.
    pub fn remove(&mut self, session: &Session) -> bool {
        let before = self.members.len();
        self.members.retain(|m| m.id != session.id);
        before != self.members.len()
    }

    /// Member names in join order.
    pub fn online(&self) -> Vec<&str> {
        self.members.iter().map(|m| m.name.as_str()).collect()
    }

    /// Appends a message to the history, keeping the last `keep`.
    pub fn record(&mut self, message: Arc<Message>, keep: usize) {
        self.history.push_back(message);
        while self.history.len() > keep {
            self.history.pop_front();
        }
    }

    /// The `history` event for this room.
    pub fn history_event(&self, room: &str) -> EncodedEvent {
        Event::History {
            room,
            messages: self.history.iter().map(|m| m.as_ref()).collect(),
        }
        .encode()
    }

    /// The `presence` event after `user` joined or left.
    pub fn presence_event(&self, room: &str, user: &str, action: PresenceAction) -> EncodedEvent {
        Event::Presence {
            room,
            user,
            action,
            online: self.online(),
        }
        .encode()
    }

    /// Pushes an event to every member except `skip` (by session id).
    pub fn broadcast(&self, event: &EncodedEvent, skip: Option<&str>) {
        for member in &self.members {
            if Some(member.id.as_str()) != skip {
                member.push(event.clone());
            }
        }
    }
}
