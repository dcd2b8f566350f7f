//! The Responses API's store: recent finished responses by id, for
//! `previous_response_id` and `GET`/`DELETE /v1/responses/{id}`. Bounded
//! by count and by bytes of conversation text, least recently used first
//! out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::chat::ChatMessage;

/// Responses kept for `previous_response_id` and `GET /v1/responses/{id}`.
pub const STORED_RESPONSES: usize = 256;

/// Most bytes of conversation text the store holds, all responses together.
pub const STORED_BYTES: usize = 64 << 20;

/// One finished response: the object `GET` returns, and the conversation
/// a continuation starts from (its input without the instructions, then
/// its output as an assistant turn).
pub struct StoredResponse {
    pub object: Value,
    pub messages: Arc<Vec<ChatMessage>>,
}

/// Bounded, least-recently-used store of recent responses, by id.
pub struct ResponseStore {
    inner: Mutex<StoreInner>,
    capacity: usize,
    max_bytes: usize,
}

struct StoreInner {
    map: HashMap<String, (Arc<StoredResponse>, usize, u64)>,
    bytes: usize,
    tick: u64,
}

impl ResponseStore {
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        ResponseStore {
            inner: Mutex::new(StoreInner {
                map: HashMap::new(),
                bytes: 0,
                tick: 0,
            }),
            capacity,
            max_bytes,
        }
    }

    /// Keep a response; the least recently used go when the store is full.
    pub fn insert(&self, id: String, stored: StoredResponse) {
        if self.capacity == 0 {
            return;
        }
        let size = stored.object.to_string().len()
            + stored.messages.iter().map(message_bytes).sum::<usize>();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.tick += 1;
        let tick = inner.tick;
        if let Some((_, old, _)) = inner.map.insert(id, (Arc::new(stored), size, tick)) {
            inner.bytes -= old;
        }
        inner.bytes += size;
        while inner.map.len() > self.capacity
            || (inner.bytes > self.max_bytes && inner.map.len() > 1)
        {
            let Some(oldest) = inner
                .map
                .iter()
                .min_by_key(|(_, (_, _, t))| *t)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((_, size, _)) = inner.map.remove(&oldest) {
                inner.bytes -= size;
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<StoredResponse>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.tick += 1;
        let tick = inner.tick;
        let entry = inner.map.get_mut(id)?;
        entry.2 = tick;
        Some(entry.0.clone())
    }

    /// Forget a response; whether it was there.
    pub fn remove(&self, id: &str) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match inner.map.remove(id) {
            Some((_, size, _)) => {
                inner.bytes -= size;
                true
            }
            None => false,
        }
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

fn message_bytes(m: &ChatMessage) -> usize {
    m.content.len()
        + m.reasoning.as_ref().map_or(0, String::len)
        + m.tool_calls
            .iter()
            .map(|c| c.id.len() + c.name.len() + c.arguments.len())
            .sum::<usize>()
        + 64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Role;
    use serde_json::json;

    #[test]
    fn the_store_forgets_the_least_recently_used() {
        let store = ResponseStore::new(2, 1 << 20);
        let entry = || StoredResponse {
            object: json!({}),
            messages: Arc::new(vec![]),
        };
        store.insert("a".into(), entry());
        store.insert("b".into(), entry());
        assert!(store.get("a").is_some());
        store.insert("c".into(), entry());
        assert!(store.get("b").is_none());
        assert!(store.get("a").is_some() && store.get("c").is_some());
        let small = ResponseStore::new(10, 100);
        let big = || StoredResponse {
            object: json!({}),
            messages: Arc::new(vec![ChatMessage::new(Role::User, "x".repeat(80))]),
        };
        small.insert("a".into(), big());
        small.insert("b".into(), big());
        assert_eq!(small.len(), 1);
        assert!(small.get("b").is_some());
    }
}
