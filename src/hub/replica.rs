//! A node of a cluster applies the log: each [`Record`] the sequencer wrote becomes an
//! [`Entry`], applied as the single-node hub applies it. Every node keeps every session (its
//! seq and its recent events, a pointer each), and writes to the transports attached to it
//! only; so a session resumes on any node at once, with the seqs it had (docs/cluster.md,
//! section 3). Nothing here decides: the sequencer did.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::entry::Entry;
use super::history::Page;
use super::{lock, Hub, Identity, Session, RESET_STATE_LOST};
use crate::cluster::sequencer::{Ending, Record};
use crate::protocol::{CloseReason, Event};

/// How a node names its attachments in the cluster: `NODE:ID`.
pub fn attachment_name(node: &str, id: u64) -> String {
    format!("{node}:{id}")
}

impl Hub {
    /// Applies one record of the log. `node` is this node's id, which names its attachments
    /// ([`attachment_name`]). A room this node does not hold yet is read from the history
    /// store first, up to the message the record says the room had. `Err` if that read
    /// fails: going on without the room's history would make this node's events differ from
    /// the others'.
    pub async fn replicate(&self, record: Record, node: &str) -> Result<(), String> {
        let config = &self.inner.config;
        let local = |id: &str| lock(&self.inner.sessions).get(id).cloned();
        // The time of an entry that changes presence: whether its room was quiet is measured
        // on the log's clock, so every replica decides the same.
        let mut at = None;
        let entry = match record {
            Record::Create {
                session,
                name,
                user,
                rules,
                expires,
            } => {
                let identity = user.map(|user| Identity {
                    user: Arc::from(user),
                    name: name.clone(),
                    rooms: rules.map(Arc::from),
                    expires_at: UNIX_EPOCH
                        .checked_add(Duration::from_millis(expires.unwrap_or_default()))
                        .unwrap_or(UNIX_EPOCH),
                });
                // The sequencer created it: no limit of this node's applies.
                let mut sessions = lock(&self.inner.sessions);
                if !sessions.contains_key(&session) {
                    self.insert_session(&mut sessions, session, &name, identity);
                }
                return Ok(());
            }
            Record::Send { message, .. } => {
                let mut chat = lock(&self.inner.chat);
                chat.last_message_id = chat.last_message_id.max(message.id);
                // The sequencer keeps the retry table: no echo is kept here.
                Entry::Send {
                    sender: None,
                    message: Arc::new(message),
                }
            }
            Record::Retry { session, message } => {
                let Some(sender) = local(&session) else {
                    return Ok(());
                };
                Entry::Retry {
                    sender,
                    echo: Event::Message(&message).encode(),
                }
            }
            Record::Join {
                session,
                room,
                last,
                ts,
            } => {
                at = Some(ts);
                let Some(session) = local(&session) else {
                    return Ok(());
                };
                self.hold_room(&room, last).await?;
                Entry::Join { session, room, ts }
            }
            Record::Leave { session, room, ts } => {
                at = Some(ts);
                let Some(session) = local(&session) else {
                    return Ok(());
                };
                Entry::Leave { session, room }
            }
            Record::Typing { session, room, ts } => {
                at = Some(ts);
                let Some(session) = local(&session) else {
                    return Ok(());
                };
                Entry::Typing {
                    name: session.name.clone(),
                    room,
                }
            }
            Record::Flush { ts } => {
                let mut chat = lock(&self.inner.chat);
                let rooms = chat.due_rooms(ts, config);
                chat.apply(Entry::Flush { rooms, at: ts }, config);
                return Ok(());
            }
            Record::Page {
                session,
                room,
                before,
                more,
                messages,
            } => {
                let Some(session) = local(&session) else {
                    return Ok(());
                };
                let messages = messages.into_iter().map(Arc::new).collect();
                Entry::Page {
                    session,
                    room,
                    before,
                    page: Page { messages, more },
                }
            }
            Record::Error {
                session,
                error,
                client_id,
            } => {
                let Some(session) = local(&session) else {
                    return Ok(());
                };
                Entry::Error {
                    session,
                    error,
                    client_id,
                }
            }
            Record::Attach {
                session,
                superseded,
                ..
            } => {
                if let Some(session) = local(&session) {
                    let mut state = session.lock();
                    let holds = state
                        .attached
                        .as_ref()
                        .is_some_and(|slot| attachment_name(node, slot.id) == superseded);
                    if holds {
                        state.close_attached(CloseReason::Superseded);
                    }
                }
                return Ok(());
            }
            Record::Snapshot { node: asked, key } => {
                if asked == node {
                    self.serve_snapshot(key);
                }
                return Ok(());
            }
            Record::Reseed { key, ts, .. } => return self.reseeded(&key, ts).await,
            Record::End {
                session, why, ts, ..
            } => {
                if let Some(session) = local(&session) {
                    self.replicate_end(&session, why, ts);
                }
                return Ok(());
            }
        };
        let mut chat = lock(&self.inner.chat);
        match at {
            Some(at) => chat.commit_at(entry, config, at),
            // Changes nothing a flush depends on.
            None => chat.commit(entry, config),
        }
        Ok(())
    }

    /// Makes sure the node holds `room`, reading its history (up to message `last`) from the
    /// store if it does not, trying for about a second.
    async fn hold_room(&self, room: &str, last: u64) -> Result<(), String> {
        if lock(&self.inner.chat).rooms.contains_key(room) {
            return Ok(());
        }
        let config = &self.inner.config;
        let mut tries = 0;
        let history = loop {
            let reply = self
                .inner
                .store
                .page(room, Some(last + 1), config.history_len);
            let error = match reply.await {
                Ok(Ok(page)) => break page.messages,
                Ok(Err(error)) => error.to_string(),
                Err(_) => "the history store is closed".to_owned(),
            };
            tries += 1;
            if tries == 5 {
                return Err(format!(
                    "the history of room {room:?} could not be read: {error}"
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        let mut chat = lock(&self.inner.chat);
        // The least recently used empty room (by log position, so every node drops the same)
        // makes way; with none, the node holds one more than `max_rooms` (the node that let
        // the join in found room: another node's join was decided first).
        let _ = chat.make_room_for_one_more(config.max_rooms, &*self.inner.store);
        let shards = chat.fanout.shards();
        chat.rooms
            .entry(room.to_owned())
            .or_insert_with(|| super::Room::new(shards, None, history));
        Ok(())
    }

    /// Redis lost its data, and with it every session and room the log had built, and a new
    /// cluster started instead of the nodes restoring it: every session ends (its transport
    /// is closed `expired`) and every room is dropped. Returns how many sessions ended.
    pub(crate) fn forget_all(&self) -> usize {
        let mut chat = lock(&self.inner.chat);
        chat.fanout.settle();
        let sessions: Vec<Arc<Session>> = lock(&self.inner.sessions)
            .drain()
            .map(|(_, session)| session)
            .collect();
        for session in &sessions {
            let mut state = session.lock();
            state.ended = true;
            state.close_attached(CloseReason::Expired);
        }
        chat.rooms.clear();
        chat.pending_presence.clear();
        sessions.len()
    }

    /// Gives every session a `reset` (reason `state_lost`) with its rooms' histories as of
    /// `at` (µs on Redis's clock), the same on every node.
    pub(super) fn reset_every_session(&self, at: u64) {
        let max_age = self.inner.config.history_max_age;
        let mut chat = lock(&self.inner.chat);
        chat.fanout.settle();
        let sessions: Vec<Arc<Session>> = lock(&self.inner.sessions).values().cloned().collect();
        for session in sessions {
            let mut state = session.lock();
            super::push_reset(
                &mut chat,
                &mut state,
                &session,
                RESET_STATE_LOST,
                max_age,
                at,
            );
            drop(state);
            session.wake();
        }
    }

    /// A session ended: its transport is told why, it leaves its rooms, and it is gone.
    fn replicate_end(&self, session: &Arc<Session>, why: Ending, at: u64) {
        let config = &self.inner.config;
        let mut chat = lock(&self.inner.chat);
        let rooms = {
            let mut state = session.lock();
            state.ended = true;
            state.close_attached(match why {
                Ending::Deleted | Ending::Idle => CloseReason::Expired,
                Ending::TokenExpired => CloseReason::TokenExpired,
            });
            state.rooms.clone()
        };
        for room in rooms {
            let leave = Entry::Leave {
                session: session.clone(),
                room,
            };
            chat.commit_at(leave, config, at);
        }
        lock(&self.inner.sessions).remove(&session.id);
    }
}
