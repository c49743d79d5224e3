//! History backends behind the hub's [`HistoryStore`] seam, and the one place that picks one
//! from the configuration. The memory store is the hub's own ([`MemoryStore`]); the embedded
//! SQLite store is [`sqlite::SqliteStore`] and the Redis one [`redis::RedisStore`]; both are
//! written by a [`QueuedStore`].

mod queue;
pub mod redis;
pub mod sqlite;

pub use queue::QueuedStore;

use std::sync::Arc;

use crate::config::{Config, HistoryStoreKind};
use crate::hub::{HistoryStore, MemoryStore};
use crate::metrics::Metrics;

/// Opens the history store `config` asks for. `Err` is a one-line message for the user,
/// naming the path and the cause.
pub fn open(config: &Config, metrics: &Metrics) -> Result<Arc<dyn HistoryStore>, String> {
    if let Some(cluster) = &config.cluster {
        return Ok(Arc::new(redis::RedisStore::shared(
            &cluster.redis,
            redis::Settings {
                keep: config.history_keep,
                max_age: config.history_max_age,
            },
            metrics.history().clone(),
        )?));
    }
    Ok(match &config.history_store {
        HistoryStoreKind::Memory => {
            Arc::new(MemoryStore::new(config.history_len, config.history_max_age))
        }
        HistoryStoreKind::Sqlite => Arc::new(sqlite::SqliteStore::open(
            &config.data_dir,
            sqlite::Settings {
                keep: config.history_keep,
                max_age: config.history_max_age,
                durability: config.durability,
            },
            metrics.history().clone(),
        )?),
        HistoryStoreKind::Redis(url) => Arc::new(redis::RedisStore::open(
            url,
            redis::Settings {
                keep: config.history_keep,
                max_age: config.history_max_age,
            },
            metrics.history().clone(),
        )?),
    })
}
