//! Exact replay of past tool-call turns.
//!
//! A client sends an assistant's tool calls back as structure (name and
//! arguments), and re-rendering them rarely reproduces the bytes the model
//! wrote (spacing, key order, the text around the call). Those bytes are
//! what the KV cache holds, so a re-rendered turn would miss the cache from
//! that point on. The store remembers, per call id, the exact text of the
//! reply that made the call; `prompt` renders that text instead when every
//! call of a history message is known.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Bounded, least-recently-used map from tool-call id to the raw reply.
pub struct ReplayStore {
    inner: Mutex<Inner>,
    capacity: usize,
}

struct Inner {
    map: HashMap<String, (Arc<str>, u64)>,
    tick: u64,
}

impl ReplayStore {
    pub fn new(capacity: usize) -> Self {
        ReplayStore {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                tick: 0,
            }),
            capacity,
        }
    }

    /// Remember the reply `raw` that made the calls `ids`.
    pub fn remember<'a>(&self, ids: impl IntoIterator<Item = &'a str>, raw: &str) {
        if self.capacity == 0 {
            return;
        }
        let raw: Arc<str> = Arc::from(raw);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            inner.tick += 1;
            let tick = inner.tick;
            inner.map.insert(id.to_string(), (raw.clone(), tick));
        }
        while inner.map.len() > self.capacity {
            let oldest = inner
                .map
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => inner.map.remove(&k),
                None => break,
            };
        }
    }

    /// The raw reply that made all of `ids`, if one reply made them all.
    pub fn lookup<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> Option<Arc<str>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.tick += 1;
        let tick = inner.tick;
        let mut found: Option<Arc<str>> = None;
        for id in ids {
            let entry = inner.map.get_mut(id)?;
            entry.1 = tick;
            match &found {
                Some(f) if !Arc::ptr_eq(f, &entry.0) => return None,
                _ => found = Some(entry.0.clone()),
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_reply_by_all_its_calls() {
        let s = ReplayStore::new(8);
        s.remember(["a", "b"], "raw1");
        s.remember(["c"], "raw2");
        assert_eq!(s.lookup(["a", "b"]).as_deref(), Some("raw1"));
        assert_eq!(s.lookup(["c"]).as_deref(), Some("raw2"));
        // Calls from two different replies: no single text to replay.
        assert_eq!(s.lookup(["a", "c"]), None);
        assert_eq!(s.lookup(["zzz"]), None);
    }

    #[test]
    fn evicts_the_least_recently_used() {
        let s = ReplayStore::new(2);
        s.remember(["a"], "1");
        s.remember(["b"], "2");
        assert!(s.lookup(["a"]).is_some());
        s.remember(["c"], "3");
        assert_eq!(s.len(), 2);
        assert!(s.lookup(["b"]).is_none());
        assert!(s.lookup(["a"]).is_some());
    }
}
