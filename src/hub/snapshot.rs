//! A snapshot of a node's chat: every session (its name, identity, replay buffer and rooms)
//! and every room (members in join order, history, presence as published and as pending), at
//! one point of the cluster's log. A node that starts while others run loads one taken by a
//! running node at a `snapshot` entry, then applies the log after that entry
//! (docs/cluster.md, section 3). It holds everything the events after that point depend on,
//! so the new node gives every session the bytes the others give, with the same seqs, and
//! can serve a resume from any point the others can.
//!
//! What it leaves out is what each node keeps for itself: attached transports, fan-out
//! shards, the retry tables and rate limits (decided in Redis), and when sessions were last
//! seen (their deadlines are in Redis too).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::room::{body, Room, RoomImage};
use super::{lock, Hub, Identity};
use crate::protocol::{Encoded, EncodedEvent};

/// The format's version: a node refuses a snapshot of another.
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Image {
    version: u32,
    /// The chat's count of applied entries (rooms' `last_used` is on it).
    tick: u64,
    last_message_id: u64,
    /// Rooms with changes waiting for a flush, in name order.
    pending: Vec<String>,
    /// Every event some session keeps, each once: the sessions' buffers point into it.
    events: Vec<String>,
    sessions: Vec<SessionImage>,
    rooms: Vec<(String, RoomImage)>,
}

#[derive(Serialize, Deserialize)]
struct SessionImage {
    id: String,
    name: String,
    identity: Option<IdentityImage>,
    /// Seq of the first event kept (of the next one when none is).
    first_seq: u64,
    /// Its events, as places in [`Image::events`].
    events: Vec<usize>,
    /// Rooms joined, in join order.
    rooms: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct IdentityImage {
    user: String,
    name: String,
    rooms: Option<Vec<String>>,
    /// ms since the Unix epoch.
    expires: u64,
}

impl IdentityImage {
    fn of(identity: &Identity) -> IdentityImage {
        let expires = identity.expires_at.duration_since(UNIX_EPOCH);
        IdentityImage {
            user: identity.user.to_string(),
            name: identity.name.clone(),
            rooms: identity.rooms.as_deref().map(<[String]>::to_vec),
            expires: expires.map_or(0, |d| d.as_millis().min(u64::MAX as u128) as u64),
        }
    }

    fn identity(self) -> Identity {
        Identity {
            user: Arc::from(self.user),
            name: self.name,
            rooms: self.rooms.map(Arc::from),
            expires_at: UNIX_EPOCH
                .checked_add(Duration::from_millis(self.expires))
                .unwrap_or(UNIX_EPOCH),
        }
    }
}

impl Hub {
    /// This hub's sessions and rooms as they are now, once every event decided so far is in
    /// its sessions' buffers: JSON, which [`Hub::restore`] reads. A cluster node takes one
    /// when it applies a `snapshot` entry addressed to it.
    pub fn snapshot(&self) -> Vec<u8> {
        let chat = lock(&self.inner.chat);
        chat.fanout.settle();
        let sessions = lock(&self.inner.sessions);
        let mut events = Vec::new();
        let mut places: HashMap<*const Encoded, usize> = HashMap::new();
        let mut images: Vec<SessionImage> = sessions
            .values()
            .map(|session| {
                let state = session.lock();
                let (first_seq, kept) = state.replay.image();
                let kept = kept
                    .map(|event| {
                        *places.entry(&**event as *const Encoded).or_insert_with(|| {
                            events.push(body(event));
                            events.len() - 1
                        })
                    })
                    .collect();
                SessionImage {
                    id: session.id.clone(),
                    name: session.name.to_string(),
                    identity: state.identity.as_ref().map(IdentityImage::of),
                    first_seq,
                    events: kept,
                    rooms: state.rooms.clone(),
                }
            })
            .collect();
        images.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let mut rooms: Vec<(String, RoomImage)> = chat
            .rooms
            .iter()
            .map(|(name, room)| (name.clone(), room.image(|s| s.id.clone())))
            .collect();
        rooms.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut pending: Vec<String> = chat.pending_presence.iter().cloned().collect();
        pending.sort_unstable();
        let image = Image {
            version: VERSION,
            tick: chat.tick,
            last_message_id: chat.last_message_id,
            pending,
            events,
            sessions: images,
            rooms,
        };
        serde_json::to_vec(&image).expect("a snapshot serializes")
    }

    /// Takes the sessions and rooms of a [`Hub::snapshot`]; this hub must hold none yet.
    /// `Err` says why a snapshot cannot be read; the hub is then left as it was.
    pub fn restore(&self, snapshot: &[u8]) -> Result<(), String> {
        let image: Image = serde_json::from_slice(snapshot)
            .map_err(|e| format!("a snapshot that cannot be read: {e}"))?;
        if image.version != VERSION {
            return Err(format!(
                "a snapshot of format {} (this node reads {VERSION})",
                image.version
            ));
        }
        let events = image
            .events
            .into_iter()
            .map(|body| EncodedEvent::from_body(Bytes::from(body)))
            .collect::<Option<Vec<_>>>()
            .ok_or("a snapshot holding an event of an unknown type")?;
        let mut chat = lock(&self.inner.chat);
        let mut sessions = lock(&self.inner.sessions);
        if !sessions.is_empty() || !chat.rooms.is_empty() {
            return Err("a snapshot is restored into a hub that holds nothing".into());
        }
        let restored = (|| {
            for image in image.sessions {
                let kept = image
                    .events
                    .iter()
                    .map(|&at| events.get(at).cloned())
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| format!("session {} keeps an event not listed", image.id))?;
                let identity = image.identity.map(IdentityImage::identity);
                let session = self.insert_session(&mut sessions, image.id, &image.name, identity);
                let mut state = session.lock();
                state.replay.restore(image.first_seq, kept);
                state.rooms = image.rooms;
            }
            let shards = chat.fanout.shards();
            for (name, room) in image.rooms {
                let room = Room::from_image(room, shards, |id| sessions.get(id).cloned())
                    .map_err(|e| format!("room {name:?}: {e}"))?;
                chat.rooms.insert(name, room);
            }
            Ok(())
        })();
        if let Err(error) = restored {
            sessions.clear();
            chat.rooms.clear();
            return Err(error);
        }
        chat.pending_presence = image.pending.into_iter().collect();
        chat.tick = image.tick;
        chat.last_message_id = chat.last_message_id.max(image.last_message_id);
        Ok(())
    }
}
