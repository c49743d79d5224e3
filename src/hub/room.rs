//! A room: its members, its history ring, its presence and its message rate.
//!
//! Rooms fan events out to members' sessions: each event is encoded once by the caller and
//! the shared bytes are pushed to every member. The hub holds the chat lock around every
//! call, so all members see a room's events in the same order.
//!
//! Presence is a snapshot plus coalesced changes (as Phoenix's `presence_state` and
//! `presence_diff`). Members know the room as it was *published*: a joiner gets that snapshot
//! right after the room's history, and joins, leaves and typing since then wait in the room
//! until [`Room::flush`] turns them into one `presence_diff` (and one `typing`) for every
//! member. The hub flushes at once in a quiet room and at most once per presence interval in
//! a busy one, so filling a room of N costs O(N) events, not O(N²). Because the snapshot is
//! the published state, never the live one, a diff always applies to what its recipient
//! knows: the joiner learns of its own join from the next diff, like everyone else.
//!
//! Up to `list_limit` members, everyone knows every name. Past it, members know the count
//! and a sample of names: a list of ten thousand names per join is what made large rooms
//! impossible.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::protocol::{EncodedEvent, Event, Message};

use super::fanout::Shards;
use super::session::{Session, TokenBucket};

/// Names a snapshot or diff carries for a room past the list limit, and the most typers one
/// `typing` event names.
pub const PRESENCE_SAMPLE: usize = 50;
/// Typers named in one `typing` event.
pub const TYPERS_NAMED: usize = 10;

/// Where a member is in its shard's list, and when it joined (to rebuild the name list in
/// join order).
#[derive(Debug, Clone, Copy)]
struct Place {
    at: usize,
    joined_at: u64,
}

/// Presence changes not yet told to the members, and what they were last told.
#[derive(Debug)]
struct Presence {
    /// Whether members know every name (the room was at most the list limit at the last
    /// flush); otherwise they know the count and a sample.
    exact: bool,
    /// The names members were last told, in join order (empty unless `exact`).
    published: Vec<Arc<str>>,
    /// The count members were last told.
    published_count: usize,
    /// Joins and leaves since, in order (at most [`PRESENCE_SAMPLE`] each unless `exact`).
    joined: Vec<Arc<str>>,
    left: Vec<Arc<str>>,
    /// Whether a change waits to be flushed (the lists may be capped).
    changed: bool,
    /// Typers since the last flush, each once, at most [`TYPERS_NAMED`].
    typers: Vec<Arc<str>>,
    /// The snapshot for joiners, encoded once per published state.
    snapshot: Option<EncodedEvent>,
}

/// One chat room.
#[derive(Debug)]
pub(crate) struct Room {
    /// Members split by fan-out shard. A broadcast shares the lists as they are; a join or
    /// leave copies a list only while a queued broadcast still holds it.
    shards: Vec<Arc<Vec<Arc<Session>>>>,
    /// Each member's place, by session address.
    index: HashMap<usize, Place>,
    /// Sessions per authenticated user: a user with several sessions (tabs) in the room is one
    /// member of its presence, who joins with the first and leaves with the last.
    /// Each user's session count and the name presence announced for them (a user's tokens
    /// may carry different names; the one announced is the one taken back).
    users: HashMap<Arc<str>, (usize, Arc<str>)>,
    /// Members as presence counts them: users, and sessions without one.
    present: usize,
    joins: u64,
    history: VecDeque<Arc<Message>>,
    /// The `history` event, encoded once until the history changes.
    history_event: Option<EncodedEvent>,
    presence: Presence,
    /// The room's message rate, when `--room-rate-limit` is set.
    limiter: Option<TokenBucket>,
    /// Hub-wide tick of the last join/leave/send, to drop the least recently used empty room.
    pub(crate) last_used: u64,
    /// When presence was last flushed (µs on the hub's timeline; `None`: never), to coalesce
    /// within an interval.
    pub(crate) last_flush: Option<u64>,
}

/// A room as a snapshot holds it: every field the events after the snapshot depend on. The
/// `history` event is not kept: it is encoded from the history alone.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RoomImage {
    /// Members' session ids with their join numbers, in join order.
    members: Vec<(String, u64)>,
    /// Each user's session count and announced name.
    users: Vec<(String, usize, String)>,
    present: usize,
    joins: u64,
    history: Vec<Message>,
    exact: bool,
    published: Vec<String>,
    published_count: usize,
    joined: Vec<String>,
    left: Vec<String>,
    changed: bool,
    typers: Vec<String>,
    /// The cached presence snapshot's body: when the room is past its list limit, it names
    /// a sample of the members as they were when it was first asked for, which the members
    /// now may no longer give.
    snapshot: Option<String>,
    last_used: u64,
    last_flush: Option<u64>,
}

impl RoomImage {
    /// The room's history, oldest first.
    pub(crate) fn history(&self) -> &[Message] {
        &self.history
    }
}

fn names(names: &[Arc<str>]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn shared(names: Vec<String>) -> Vec<Arc<str>> {
    names.into_iter().map(Arc::from).collect()
}

/// An encoded event's body as text (serde_json wrote it: UTF-8).
pub(crate) fn body(event: &EncodedEvent) -> String {
    String::from_utf8_lossy(&event.body).into_owned()
}

fn key(session: &Arc<Session>) -> usize {
    Arc::as_ptr(session) as usize
}

/// Removes one occurrence of `name` (names need not be unique).
fn remove_name(names: &mut Vec<Arc<str>>, name: &str) {
    if let Some(at) = names.iter().position(|n| &**n == name) {
        names.remove(at);
    }
}

impl Room {
    /// An empty room for `shards` fan-out shards, with its newest messages from the history
    /// store; `rate` is the message rate `(per_sec, burst)`, if limited.
    pub fn new(shards: usize, rate: Option<(f64, f64)>, history: Vec<Arc<Message>>) -> Self {
        Room {
            shards: (0..shards.max(1)).map(|_| Arc::new(Vec::new())).collect(),
            index: HashMap::new(),
            users: HashMap::new(),
            present: 0,
            joins: 0,
            history: history.into(),
            history_event: None,
            presence: Presence {
                exact: true,
                published: Vec::new(),
                published_count: 0,
                joined: Vec::new(),
                left: Vec::new(),
                changed: false,
                typers: Vec::new(),
                snapshot: None,
            },
            limiter: rate.map(|(per_sec, burst)| TokenBucket::new(per_sec, burst)),
            last_used: 0,
            last_flush: None,
        }
    }

    /// Whether the room has no members.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The members, for a broadcast.
    pub fn members(&self) -> Shards {
        Arc::from(self.shards.as_slice())
    }

    fn shard_of(&mut self, session: &Session) -> &mut Vec<Arc<Session>> {
        let n = self.shards.len();
        Arc::make_mut(&mut self.shards[session.shard % n])
    }

    /// Every member, shard by shard.
    fn each_member(&self) -> impl Iterator<Item = &Arc<Session>> {
        self.shards.iter().flat_map(|shard| shard.iter())
    }

    /// Adds a member (the caller checked it was not one) and records its join.
    pub fn add(&mut self, session: Arc<Session>) {
        self.joins += 1;
        let joined_at = self.joins;
        let name = session.name.clone();
        let list = self.shard_of(&session);
        let place = Place {
            at: list.len(),
            joined_at,
        };
        list.push(session.clone());
        self.index.insert(key(&session), place);
        self.announce_join(name, session.user.as_ref());
    }

    /// Records a join in presence: a user's first session announces it.
    fn announce_join(&mut self, name: Arc<str>, user: Option<&Arc<str>>) {
        let first = match user {
            Some(user) => {
                let (sessions, _) = self.users.entry(user.clone()).or_insert((0, name.clone()));
                *sessions += 1;
                *sessions == 1
            }
            None => true,
        };
        if !first {
            return;
        }
        self.present += 1;
        self.presence.changed = true;
        if self.presence.exact || self.presence.joined.len() < PRESENCE_SAMPLE {
            self.presence.joined.push(name);
        }
    }

    /// Records a leave in presence: a user's last session announces it, with the name its
    /// join was announced with.
    fn announce_leave(&mut self, name: &Arc<str>, user: Option<&Arc<str>>) {
        let (last, name) = match user {
            Some(user) => match self.users.get_mut(user) {
                Some((sessions, _)) if *sessions > 1 => {
                    *sessions -= 1;
                    (false, name.clone())
                }
                _ => {
                    let announced = self.users.remove(user).map(|(_, name)| name);
                    (true, announced.unwrap_or_else(|| name.clone()))
                }
            },
            None => (true, name.clone()),
        };
        if !last {
            return;
        }
        self.present -= 1;
        self.presence.changed = true;
        if self.presence.exact || self.presence.left.len() < PRESENCE_SAMPLE {
            self.presence.left.push(name);
        }
    }

    /// Removes a member and records its leave; returns whether it was one.
    pub fn remove(&mut self, session: &Arc<Session>) -> bool {
        let Some(place) = self.index.remove(&key(session)) else {
            return false;
        };
        let list = self.shard_of(session);
        list.swap_remove(place.at);
        let moved = list.get(place.at).map(key);
        if let Some(moved) = moved.and_then(|k| self.index.get_mut(&k)) {
            moved.at = place.at;
        }
        if self.index.is_empty() {
            // An empty room holds no per-member state.
            self.index = HashMap::new();
            for shard in &mut self.shards {
                *shard = Arc::new(Vec::new());
            }
        }
        self.announce_leave(&session.name, session.user.as_ref());
        true
    }

    /// Records that a member is typing.
    pub fn typing(&mut self, name: &Arc<str>) {
        let typers = &mut self.presence.typers;
        if typers.len() < TYPERS_NAMED && !typers.iter().any(|t| t == name) {
            typers.push(name.clone());
        }
    }

    /// Whether presence or typing changes wait to be flushed.
    pub fn has_pending(&self) -> bool {
        self.presence.changed || !self.presence.typers.is_empty()
    }

    /// Takes a token from the room's message rate; `Err` with the wait until the next one.
    pub fn admit_message(&mut self) -> Result<(), std::time::Duration> {
        match &mut self.limiter {
            Some(limiter) => {
                if limiter.try_take() {
                    Ok(())
                } else {
                    Err(limiter.retry_after())
                }
            }
            None => Ok(()),
        }
    }

    /// Appends a message to the history, keeping the last `keep`.
    pub fn record(&mut self, message: Arc<Message>, keep: usize) {
        self.history.push_back(message);
        while self.history.len() > keep {
            self.history.pop_front();
        }
        self.history_event = None;
    }

    /// The `history` event for this room at `now` (µs since the Unix epoch), encoded once
    /// until a message is recorded or ages out: messages older than `max_age` are dropped
    /// first.
    pub fn history_event(
        &mut self,
        room: &str,
        max_age: std::time::Duration,
        now: u64,
    ) -> EncodedEvent {
        let oldest = now.saturating_sub(max_age.as_micros().min(u64::MAX as u128) as u64);
        while self.history.front().is_some_and(|m| m.ts < oldest) {
            self.history.pop_front();
            self.history_event = None;
        }
        let history = &self.history;
        let cached = self.history_event.get_or_insert_with(|| {
            Event::History {
                room,
                messages: history.iter().map(|m| m.as_ref()).collect(),
            }
            .encode()
        });
        cached.reissue()
    }

    /// The `presence` snapshot for a joiner: the published state, encoded once per flush.
    pub fn snapshot_event(&mut self, room: &str) -> EncodedEvent {
        if self.presence.snapshot.is_none() {
            let presence = &self.presence;
            let sample;
            let online: Vec<&str> = if presence.exact {
                presence.published.iter().map(|n| &**n).collect()
            } else {
                sample = self.names_in_join_order(PRESENCE_SAMPLE);
                sample.iter().map(|n| &**n).collect()
            };
            let encoded = Event::Presence {
                room,
                count: presence.published_count,
                online,
                complete: presence.exact,
            }
            .encode();
            self.presence.snapshot = Some(encoded);
        }
        let cached = self.presence.snapshot.as_ref().expect("encoded above");
        cached.reissue()
    }

    /// Turns the changes since the last flush into the events every member gets: a
    /// `presence_diff` (or, when a large room becomes small again, a full `presence`) and a
    /// `typing`. Rooms past `list_limit` members publish a count and a sample of names.
    pub fn flush(&mut self, room: &str, list_limit: usize) -> Vec<EncodedEvent> {
        let mut events = Vec::new();
        let count = self.present;
        let rebuilt = (!self.presence.exact && count <= list_limit)
            .then(|| self.names_in_join_order(usize::MAX));
        let presence = &mut self.presence;
        if presence.changed {
            let small = count <= list_limit;
            let joined = std::mem::take(&mut presence.joined);
            let left = std::mem::take(&mut presence.left);
            if presence.exact || !small {
                let sample = |names: &[Arc<str>]| -> Vec<Arc<str>> {
                    let keep = if small { names.len() } else { PRESENCE_SAMPLE };
                    names.iter().take(keep).cloned().collect()
                };
                let (joined_named, left_named) = (sample(&joined), sample(&left));
                events.push(
                    Event::PresenceDiff {
                        room,
                        count,
                        joined: joined_named.iter().map(|n| &**n).collect(),
                        left: left_named.iter().map(|n| &**n).collect(),
                        complete: small,
                    }
                    .encode(),
                );
                if small {
                    presence.published.extend(joined);
                    for name in &left {
                        remove_name(&mut presence.published, name);
                    }
                } else {
                    presence.published = Vec::new();
                }
            } else {
                // Members knew only a count: tell them every name again, in join order.
                presence.published = rebuilt.unwrap_or_default();
                events.push(
                    Event::Presence {
                        room,
                        count,
                        online: presence.published.iter().map(|n| &**n).collect(),
                        complete: true,
                    }
                    .encode(),
                );
            }
            presence.exact = small;
            presence.published_count = count;
            presence.changed = false;
            presence.snapshot = None;
        }
        if !presence.typers.is_empty() {
            let typers = std::mem::take(&mut presence.typers);
            events.push(
                Event::Typing {
                    room,
                    users: typers.iter().map(|n| &**n).collect(),
                }
                .encode(),
            );
        }
        events
    }

    /// The room as a snapshot holds it, its members named by `id` (docs/cluster.md,
    /// section 3).
    pub fn image(&self, id: impl Fn(&Session) -> String) -> RoomImage {
        let mut members: Vec<(String, u64)> = self
            .each_member()
            .map(|m| (id(m), self.index[&key(m)].joined_at))
            .collect();
        members.sort_unstable_by_key(|(_, joined_at)| *joined_at);
        let presence = &self.presence;
        RoomImage {
            members,
            users: self
                .users
                .iter()
                .map(|(user, (sessions, name))| (user.to_string(), *sessions, name.to_string()))
                .collect(),
            present: self.present,
            joins: self.joins,
            history: self.history.iter().map(|m| Message::clone(m)).collect(),
            exact: presence.exact,
            published: names(&presence.published),
            published_count: presence.published_count,
            joined: names(&presence.joined),
            left: names(&presence.left),
            changed: presence.changed,
            typers: names(&presence.typers),
            snapshot: presence.snapshot.as_ref().map(body),
            last_used: self.last_used,
            last_flush: self.last_flush,
        }
    }

    /// A room from its image, for `shards` fan-out shards; `member` finds a member's session
    /// by id. `Err` names what does not fit.
    pub fn from_image(
        image: RoomImage,
        shards: usize,
        member: impl Fn(&str) -> Option<Arc<Session>>,
    ) -> Result<Room, String> {
        let snapshot = image
            .snapshot
            .map(|body| {
                EncodedEvent::from_body(body.into()).ok_or("a presence snapshot that is no event")
            })
            .transpose()?;
        let mut room = Room::new(
            shards,
            None,
            image.history.into_iter().map(Arc::new).collect(),
        );
        for (id, joined_at) in image.members {
            let session = member(&id).ok_or_else(|| format!("member {id} is no session"))?;
            let list = room.shard_of(&session);
            let at = list.len();
            list.push(session.clone());
            if room
                .index
                .insert(key(&session), Place { at, joined_at })
                .is_some()
            {
                return Err(format!("member {id} is listed twice"));
            }
        }
        room.users = image
            .users
            .into_iter()
            .map(|(user, sessions, name)| (Arc::from(user), (sessions, Arc::from(name))))
            .collect();
        room.present = image.present;
        room.joins = image.joins;
        room.presence = Presence {
            exact: image.exact,
            published: shared(image.published),
            published_count: image.published_count,
            joined: shared(image.joined),
            left: shared(image.left),
            changed: image.changed,
            typers: shared(image.typers),
            snapshot,
        };
        room.last_used = image.last_used;
        room.last_flush = image.last_flush;
        Ok(room)
    }

    /// Names online as members were last told, in join order (everyone while the room is
    /// small).
    #[cfg(test)]
    pub fn published_names(&self) -> Vec<&str> {
        self.presence.published.iter().map(|n| &**n).collect()
    }

    /// The first `limit` names of the members as presence counts them (a user's first
    /// session, every session without a user), in join order: the same on every node that
    /// applied the same joins, whatever its fan-out shards.
    fn names_in_join_order(&self, limit: usize) -> Vec<Arc<str>> {
        let mut members: Vec<_> = self
            .each_member()
            .map(|m| (self.index[&key(m)].joined_at, &m.name, m.user.as_ref()))
            .collect();
        members.sort_unstable_by_key(|(joined_at, _, _)| *joined_at);
        let mut seen = std::collections::HashSet::new();
        members
            .into_iter()
            .filter(|(_, _, user)| user.is_none_or(|u| seen.insert(u.clone())))
            .map(|(_, name, _)| name.clone())
            .take(limit)
            .collect()
    }
}
