//! The KV cache beyond the live sequence: snapshots in RAM and on disk.
//!
//! Every token prefilled is an asset: no prefix is prefilled twice while a
//! copy of its KV can be kept. The live
//! sequence in the context is the first place a request's prefix is looked
//! for; before it is replaced, it is copied out (llama.cpp per-sequence
//! state) into a bounded RAM store, so two sessions that alternate do not
//! evict each other; long prefixes also go to disk ([`disk`]), where they
//! survive restarts. A request takes whichever source covers the longest
//! prefix of its prompt, by tokens or by rendered text ([`sequence`]).

pub mod cli;
pub mod disk;
pub mod sequence;

use std::sync::Arc;
use std::time::Instant;

use super::llama::Token;
use sequence::Sequence;

/// How much of a prompt a cached sequence covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Match {
    /// Leading tokens of the cached sequence that can be reused.
    pub tokens: usize,
    /// The match was found on the rendered text, past where the token ids
    /// diverge: the prompt must be re-tokenized after `text_bytes`.
    pub by_text: bool,
    pub text_bytes: usize,
}

/// Match a cached sequence against a prompt: token ids first, then the
/// rendered text when that reaches further.
pub fn match_prompt(seq: &Sequence, prompt: &[Token], prompt_text: Option<&str>) -> Match {
    let by_tokens = seq.common_tokens(prompt);
    if let Some(text) = prompt_text {
        let (k, bytes) = seq.text_match(text);
        if k > by_tokens {
            return Match {
                tokens: k,
                by_text: true,
                text_bytes: bytes,
            };
        }
    }
    Match {
        tokens: by_tokens,
        by_text: false,
        text_bytes: 0,
    }
}

/// One sequence's KV state, kept in memory.
pub struct RamSnapshot {
    pub seq: Sequence,
    pub state: Arc<Vec<u8>>,
    pub created: Instant,
    pub last_used: Instant,
    pub hits: u64,
}

/// Recent sequences' KV states, least recently used evicted first, within
/// a byte budget.
///
/// For memory that can be cut back, a snapshot that another extends adds
/// nothing. For memory that cannot (recurrent and hybrid models), each
/// snapshot is a checkpoint: the only way back to its position, so shorter
/// ones are kept beside longer ones, at most `checkpoints` of one
/// conversation (those that are prefixes of one another), spread out.
pub struct RamStore {
    budget: usize,
    items: Vec<RamSnapshot>,
    /// Some(n): keep prefixes, at most n per conversation (checkpoints).
    checkpoints: Option<usize>,
}

/// Which checkpoint of a full line goes (its index in `kept`, given as
/// (length, created)) when one of `new_len` tokens comes: the one whose
/// loss leaves the smallest gap between the lengths left, the oldest of
/// equals. The line stays spread over the whole conversation, so a client
/// that rewrites an early message still finds one close before it, while
/// the newest stays for the next turn.
fn spaced_out(new_len: usize, kept: impl Iterator<Item = (usize, Instant)>) -> usize {
    let mut line: Vec<(usize, Option<(usize, Instant)>)> = kept
        .enumerate()
        .map(|(i, (len, created))| (len, Some((i, created))))
        .collect();
    line.push((new_len, None));
    line.sort_by_key(|&(len, _)| len);
    (0..line.len())
        .filter_map(|k| {
            let (len, (i, created)) = (line[k].0, line[k].1?);
            let before = if k == 0 { 0 } else { line[k - 1].0 };
            let after = line.get(k + 1).map_or(len, |n| n.0);
            Some(((after - before, created), i))
        })
        .min()
        .map(|(_, i)| i)
        .expect("a full line is not empty")
}

impl RamStore {
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget: budget_bytes,
            items: Vec::new(),
            checkpoints: None,
        }
    }

    /// Keep snapshots as checkpoints, at most `per_conversation` of one
    /// conversation (memory that cannot be cut back).
    pub fn keep_checkpoints(&mut self, per_conversation: usize) {
        self.checkpoints = Some(per_conversation.max(1));
    }

    pub fn is_enabled(&self) -> bool {
        self.budget > 0
    }

    /// Whether prompts keep checkpoints here (memory that cannot be cut
    /// back, with a budget to keep them in).
    pub fn keeps_checkpoints(&self) -> bool {
        self.checkpoints.is_some() && self.is_enabled()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The snapshots kept, oldest first.
    pub fn items(&self) -> &[RamSnapshot] {
        &self.items
    }

    pub fn bytes(&self) -> usize {
        self.items.iter().map(|s| s.state.len()).sum()
    }

    /// Keep a snapshot. One whose tokens another already extends adds
    /// nothing and is dropped; ones it extends are replaced.
    pub fn insert(&mut self, seq: Sequence, state: Arc<Vec<u8>>) {
        if state.len() > self.budget {
            return;
        }
        if let Some(limit) = self.checkpoints {
            self.insert_checkpoint(seq, state, limit);
            return;
        }
        if self
            .items
            .iter()
            .any(|s| s.seq.len() >= seq.len() && s.seq.common_tokens(seq.tokens()) == seq.len())
        {
            return;
        }
        self.items
            .retain(|s| seq.common_tokens(s.seq.tokens()) < s.seq.len());
        self.push(seq, state);
    }

    /// Keep `seq` beside its shorter and longer checkpoints; the same
    /// tokens again only refresh the one kept.
    fn insert_checkpoint(&mut self, seq: Sequence, state: Arc<Vec<u8>>, limit: usize) {
        let is_prefix = |a: &Sequence, b: &Sequence| a.common_tokens(b.tokens()) == a.len();
        if let Some(same) = self
            .items
            .iter_mut()
            .find(|s| s.seq.len() == seq.len() && is_prefix(&s.seq, &seq))
        {
            same.last_used = Instant::now();
            return;
        }
        loop {
            let line: Vec<usize> = (0..self.items.len())
                .filter(|&i| {
                    let s = &self.items[i].seq;
                    is_prefix(s, &seq) || is_prefix(&seq, s)
                })
                .collect();
            if line.len() < limit {
                break;
            }
            let victim = spaced_out(
                seq.len(),
                line.iter()
                    .map(|&i| (self.items[i].seq.len(), self.items[i].created)),
            );
            self.items.remove(line[victim]);
        }
        self.push(seq, state);
    }

    fn push(&mut self, seq: Sequence, state: Arc<Vec<u8>>) {
        let now = Instant::now();
        self.items.push(RamSnapshot {
            seq,
            state,
            created: now,
            last_used: now,
            hits: 0,
        });
        self.evict_to_budget();
    }

    /// Drop the least recently used snapshots until the budget holds.
    fn evict_to_budget(&mut self) {
        while self.bytes() > self.budget {
            let oldest = self
                .items
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => {
                    self.items.remove(i);
                }
                None => break,
            }
        }
    }

    /// The snapshot covering the longest prefix of the prompt.
    pub fn best(&self, prompt: &[Token], prompt_text: Option<&str>) -> Option<(usize, Match)> {
        self.best_with(prompt, prompt_text, |_, m| m)
    }

    /// The same, each match first passed through `adjust` with the
    /// snapshot's length (which may refuse it: `Match::default()`).
    pub fn best_with(
        &self,
        prompt: &[Token],
        prompt_text: Option<&str>,
        adjust: impl Fn(usize, Match) -> Match,
    ) -> Option<(usize, Match)> {
        self.items
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    i,
                    adjust(s.seq.len(), match_prompt(&s.seq, prompt, prompt_text)),
                )
            })
            .max_by_key(|(_, m)| m.tokens)
            .filter(|(_, m)| m.tokens > 0)
    }

    /// Use a snapshot: mark it recent and count the hit.
    pub fn take_hit(&mut self, i: usize) -> Option<(Sequence, Arc<Vec<u8>>)> {
        let s = self.items.get_mut(i)?;
        s.last_used = Instant::now();
        s.hits += 1;
        Some((s.seq.clone(), s.state.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(tokens: &[Token]) -> Sequence {
        let mut s = Sequence::default();
        for &t in tokens {
            s.push(t, format!("<{t}>").as_bytes());
        }
        s
    }

    #[test]
    fn text_match_wins_only_when_it_reaches_further() {
        let s = seq(&[1, 2, 3]);
        assert_eq!(
            match_prompt(&s, &[1, 2, 3, 4], Some("<1><2><3><4>")).tokens,
            3
        );
        assert!(!match_prompt(&s, &[1, 2, 3, 4], Some("<1><2><3><4>")).by_text);
        // Same text, tokenized differently after the first token.
        let m = match_prompt(&s, &[1, 99], Some("<1><2><3>rest"));
        assert_eq!(
            m,
            Match {
                tokens: 3,
                by_text: true,
                text_bytes: 9
            }
        );
    }

    #[test]
    fn ram_store_keeps_the_longest_and_evicts_least_recent() {
        let mut r = RamStore::new(10);
        r.insert(seq(&[1, 2]), Arc::new(vec![0; 4]));
        r.insert(seq(&[1, 2, 3]), Arc::new(vec![0; 4]));
        assert_eq!(r.len(), 1, "an extension replaces its prefix");
        r.insert(seq(&[1]), Arc::new(vec![0; 4]));
        assert_eq!(r.len(), 1, "a prefix of a kept one adds nothing");
        r.insert(seq(&[7, 8]), Arc::new(vec![0; 4]));
        assert_eq!(r.len(), 2);
        let (i, m) = r.best(&[1, 2, 3, 4], None).unwrap();
        assert_eq!(m.tokens, 3);
        r.take_hit(i);
        r.insert(seq(&[5]), Arc::new(vec![0; 4]));
        // Over budget: [7, 8] was used least recently.
        assert!(r.best(&[7, 8], None).is_none());
        assert!(r.best(&[1, 2, 3], None).is_some());
        r.insert(seq(&[9]), Arc::new(vec![0; 11]));
        assert!(r.best(&[9], None).is_none(), "larger than the whole budget");
    }

    #[test]
    fn a_full_line_of_checkpoints_stays_spread_over_the_conversation() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        // 500, 1000, 1020, 2000 kept; 3000 comes: one of the close pair
        // goes (1000: 500..1020 is the smallest gap left), not the oldest.
        let kept = [(500, at(0)), (1000, at(1)), (1020, at(2)), (2000, at(3))];
        assert_eq!(spaced_out(3000, kept.into_iter()), 1);
        // Equal gaps: the oldest.
        let even = [(1000, at(5)), (2000, at(1))];
        assert_eq!(spaced_out(3000, even.into_iter()), 1);
        // A newcomer between the kept ones counts in the gaps.
        let kept = [(1000, at(0)), (1100, at(1))];
        assert_eq!(spaced_out(1050, kept.into_iter()), 1);
    }

    #[test]
    fn checkpoints_keep_prefixes_up_to_a_limit_per_conversation() {
        let mut r = RamStore::new(100);
        r.keep_checkpoints(2);
        r.insert(seq(&[1, 2]), Arc::new(vec![0; 4]));
        r.insert(seq(&[1, 2, 3, 4]), Arc::new(vec![0; 4]));
        assert_eq!(r.len(), 2, "a shorter checkpoint stays beside a longer one");
        r.insert(seq(&[1, 2]), Arc::new(vec![0; 4]));
        assert_eq!(r.len(), 2, "the same tokens again add nothing");
        r.insert(seq(&[7, 8]), Arc::new(vec![0; 4]));
        assert_eq!(r.len(), 3, "another conversation has its own");
        r.insert(seq(&[1, 2, 3, 4, 5, 6]), Arc::new(vec![0; 4]));
        assert_eq!(r.len(), 3, "past the limit one of the line goes");
        assert!(
            r.items().iter().all(|s| s.seq.tokens() != [1, 2]),
            "of equal gaps, the oldest"
        );
        // Only whole matches: a prompt that leaves at [1, 2, 3, 4, 9].
        let whole = |len: usize, m: Match| if m.tokens == len { m } else { Match::default() };
        let (_, m) = r.best_with(&[1, 2, 3, 4, 9], None, whole).unwrap();
        assert_eq!(m.tokens, 4);
        assert!(r.best_with(&[1, 2, 3, 9], None, whole).is_none());
    }
}
