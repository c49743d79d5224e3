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
use crate::protocol::EncodedEvent;

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

/// A snapshot as [`Hub::capture`] took it, to encode ([`Capture::encode`]) without holding
/// the hub's locks.
pub struct Capture {
    tick: u64,
    last_message_id: u64,
    pending: Vec<String>,
    /// Each session, and the events it keeps.
    sessions: Vec<(SessionImage, Vec<EncodedEvent>)>,
    rooms: Vec<(String, RoomImage)>,
}

impl Capture {
    /// What a node writes back to a Redis that lost the cluster's state, from this capture:
    /// every session (identity and rooms) and every room's history, in id and name order.
    pub(crate) fn seed(&self) -> crate::cluster::sequencer::Seed {
        let mut seed = crate::cluster::sequencer::Seed {
            last_message_id: self.last_message_id,
            sessions: self
                .sessions
                .iter()
                .map(|(image, _)| {
                    let identity = image.identity.as_ref().map(IdentityImage::identity);
                    (
                        image.id.clone(),
                        image.name.clone(),
                        identity,
                        image.rooms.clone(),
                    )
                })
                .collect(),
            rooms: self
                .rooms
                .iter()
                .map(|(name, room)| (name.clone(), room.history().to_vec()))
                .collect(),
        };
        seed.sessions.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        seed.rooms.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        seed
    }

    /// The snapshot's JSON, which [`Hub::restore`] reads: each event body once.
    pub fn encode(self) -> Vec<u8> {
        let mut events = Vec::new();
        // By the bytes they share: a cached `history` or `presence` sent to many sessions is
        // reissued (an `Encoded` of its own per send) over the same bytes.
        let mut places: HashMap<(*const u8, usize), usize> = HashMap::new();
        let mut sessions: Vec<SessionImage> = self
            .sessions
            .into_iter()
            .map(|(mut image, kept)| {
                image.events = kept
                    .iter()
                    .map(|event| {
                        let bytes = (event.body.as_ptr(), event.body.len());
                        *places.entry(bytes).or_insert_with(|| {
                            events.push(body(event));
                            events.len() - 1
                        })
                    })
                    .collect();
                image
            })
            .collect();
        sessions.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let mut rooms = self.rooms;
        rooms.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut pending = self.pending;
        pending.sort_unstable();
        let image = Image {
            version: VERSION,
            tick: self.tick,
            last_message_id: self.last_message_id,
            pending,
            events,
            sessions,
            rooms,
        };
        serde_json::to_vec(&image).expect("a snapshot serializes")
    }
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

    fn identity(&self) -> Identity {
        Identity {
            user: Arc::from(self.user.as_str()),
            name: self.name.clone(),
            rooms: self.rooms.as_deref().map(Arc::from),
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
        self.capture().encode()
    }

    /// What a snapshot holds, taken under the hub's locks (the events as pointers to what the
    /// sessions keep): the node's replica waits only for this, not for the encoding.
    pub fn capture(&self) -> Capture {
        let chat = lock(&self.inner.chat);
        chat.fanout.settle();
        let sessions = lock(&self.inner.sessions);
        let sessions = sessions
            .values()
            .map(|session| {
                let state = session.lock();
                let (first_seq, kept) = state.replay.image();
                let image = SessionImage {
                    id: session.id.clone(),
                    name: session.name.to_string(),
                    identity: state.identity.as_ref().map(IdentityImage::of),
                    first_seq,
                    events: Vec::new(),
                    rooms: state.rooms.clone(),
                };
                (image, kept.cloned().collect())
            })
            .collect();
        let rooms = chat
            .rooms
            .iter()
            .map(|(name, room)| (name.clone(), room.image(|s| s.id.clone())))
            .collect();
        Capture {
            tick: chat.tick,
            last_message_id: chat.last_message_id,
            pending: chat.pending_presence.iter().cloned().collect(),
            sessions,
            rooms,
        }
    }

    /// Takes the sessions and rooms of a [`Hub::snapshot`]: a node that starts restores one
    /// into an empty hub, and after Redis lost the cluster's state every node takes the one
    /// of the node that restored it (a `reseed` entry). A session this hub holds already
    /// must be at or behind the snapshot's (both replicas of one log): it gets the events it
    /// lacks, through its attached transport if any, and keeps that transport. Sessions the
    /// snapshot does not hold have ended; rooms are the snapshot's. Returns how many sessions
    /// it holds. `Err` says why the snapshot cannot be taken: this hub is then left as it was
    /// if nothing in it was wrong, and otherwise cannot be trusted (the replica stops).
    pub fn restore(&self, snapshot: &[u8]) -> Result<usize, String> {
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
        chat.fanout.settle();
        let mut sessions = lock(&self.inner.sessions);
        // Checked before anything changes.
        let mut kept_events = Vec::with_capacity(image.sessions.len());
        for image in &image.sessions {
            let kept = image
                .events
                .iter()
                .map(|&at| events.get(at).cloned())
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| format!("session {} keeps an event not listed", image.id))?;
            let last = image.first_seq.max(1) + kept.len() as u64 - 1;
            if let Some(local) = sessions.get(&image.id) {
                let here = local.lock().replay.last_seq();
                if here > last {
                    return Err(format!(
                        "session {} is at seq {here} here, past the snapshot's {last}",
                        image.id
                    ));
                }
            }
            kept_events.push(kept);
        }
        let listed: std::collections::HashSet<&str> =
            image.sessions.iter().map(|s| s.id.as_str()).collect();
        sessions.retain(|id, session| {
            let gone = !listed.contains(id.as_str());
            if gone {
                let mut state = session.lock();
                state.ended = true;
                state.close_attached(super::CloseReason::Expired);
            }
            !gone
        });
        for (image, kept) in image.sessions.into_iter().zip(kept_events) {
            let identity = image.identity.as_ref().map(IdentityImage::identity);
            let session = match sessions.get(&image.id) {
                Some(session) => session.clone(),
                None => self.insert_session(&mut sessions, image.id, &image.name, identity.clone()),
            };
            let mut state = session.lock();
            let here = state.replay.last_seq();
            let first = image.first_seq.max(1);
            if here + 1 >= first {
                // What it lacks, pushed as any event: a transport attached here gets it.
                let lacking = (here + 1 - first) as usize;
                for event in kept.into_iter().skip(lacking) {
                    state.push_keeping(event, session.outbox, here + 1);
                }
            } else {
                // It lags past what the snapshot keeps: its transport resumes from its seq,
                // and gets a `reset` if that is too old now.
                state.close_attached(super::CloseReason::SlowConsumer);
                state.replay.restore(first, kept);
            }
            state.identity = identity;
            state.rooms = image.rooms;
            drop(state);
            session.wake();
        }
        let shards = chat.fanout.shards();
        chat.rooms.clear();
        for (name, room) in image.rooms {
            let room = Room::from_image(room, shards, |id| sessions.get(id).cloned())
                .map_err(|e| format!("room {name:?}: {e}"))?;
            chat.rooms.insert(name, room);
        }
        chat.pending_presence = image.pending.into_iter().collect();
        chat.tick = image.tick;
        chat.last_message_id = chat.last_message_id.max(image.last_message_id);
        Ok(sessions.len())
    }
}
