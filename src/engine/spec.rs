//! Speculative decoding by prompt lookup: what a coding agent writes is
//! often text it has seen (the file it rewrites, the lines it quotes, paths
//! and identifiers), so the tokens that followed the last occurrence of the
//! sequence's latest n-gram are a good guess at what comes next.
//!
//! A decoding sequence's draft rides in the same step as its pending token,
//! as extra rows of its sequence; the step verifies them by sampling each
//! row in turn (`Running::sample`) and keeps the drafted tokens for as long
//! as the sampled ones equal them. For a draft that is one fixed guess,
//! "sample from the target distribution and compare" is the speculative
//! sampling rule itself (accept with probability p(draft), else draw from p
//! without it), so sampled output keeps the model's distribution and greedy
//! output its tokens; grammars, stops and budgets see every token as they
//! do without speculation.
//!
//! Pure functions: the lookup and the per-sequence adaptive state.

use super::llama::Token;

/// How drafting is set up (`--draft-max`, `--no-spec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecConfig {
    /// Most tokens drafted per step.
    pub draft_max: usize,
    /// Longest and shortest n-gram looked up.
    pub ngram_max: usize,
    pub ngram_min: usize,
}

impl Default for SpecConfig {
    fn default() -> Self {
        Self {
            draft_max: 8,
            ngram_max: 4,
            ngram_min: 2,
        }
    }
}

/// Only this many most recent tokens are searched: a lookup is a linear
/// scan per step.
pub(super) const LOOKBACK: usize = 16384;

/// The tokens that followed the most recent earlier occurrence of the
/// longest suffix n-gram of `tokens` (n from `ngram_max` down to
/// `ngram_min`), at most `max` of them.
pub fn propose(tokens: &[Token], cfg: &SpecConfig, max: usize) -> Vec<Token> {
    let len = tokens.len();
    if max == 0 {
        return Vec::new();
    }
    let from = len.saturating_sub(LOOKBACK);
    for n in (cfg.ngram_min.max(1)..=cfg.ngram_max).rev() {
        if len <= n {
            continue;
        }
        let suffix = &tokens[len - n..];
        // The most recent earlier occurrence, ending before the suffix.
        let found = (from..len - n).rev().find(|&i| &tokens[i..i + n] == suffix);
        if let Some(i) = found {
            let start = i + n;
            let end = (start + max).min(len);
            if end > start {
                return tokens[start..end].to_vec();
            }
        }
    }
    Vec::new()
}

/// After this many drafted tokens with low acceptance, a sequence stops
/// drafting for a while.
const JUDGE_AFTER: u32 = 16;
/// Acceptance below this (accepted / drafted, moving) means the drafts do
/// not pay for their rows.
const MIN_ACCEPTANCE: f64 = 0.35;
/// Steps a sequence goes without drafting after its drafts kept failing;
/// doubles each time it happens again, up to `MAX_COOLDOWN`.
const COOLDOWN: u32 = 16;
const MAX_COOLDOWN: u32 = 256;
/// Weight of the newest step in the moving acceptance.
const EMA: f64 = 0.25;

/// One sequence's drafting record.
#[derive(Debug, Clone, Default)]
pub struct SpecState {
    pub drafted: u32,
    pub accepted: u32,
    /// Moving acceptance over recent drafts.
    acceptance: Option<f64>,
    /// Drafted tokens since the last judgement.
    since_judged: u32,
    /// Steps left without drafting.
    cooldown: u32,
    /// The next cooldown's length.
    next_cooldown: u32,
}

impl SpecState {
    /// Whether to look for a draft this step.
    pub fn wants_draft(&mut self) -> bool {
        if self.cooldown > 0 {
            self.cooldown -= 1;
            return false;
        }
        true
    }

    /// A verified step: `accepted` of `drafted` tokens were kept.
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.drafted += drafted as u32;
        self.accepted += accepted as u32;
        let rate = accepted as f64 / drafted as f64;
        self.acceptance = Some(match self.acceptance {
            Some(a) => a + EMA * (rate - a),
            None => rate,
        });
        self.since_judged += drafted as u32;
        if self.since_judged >= JUDGE_AFTER {
            self.since_judged = 0;
            if self.acceptance.unwrap_or(1.0) < MIN_ACCEPTANCE {
                let next = self.next_cooldown.max(COOLDOWN);
                self.cooldown = next;
                self.next_cooldown = (next * 2).min(MAX_COOLDOWN);
                self.acceptance = None;
            } else {
                self.next_cooldown = COOLDOWN;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SpecConfig {
        SpecConfig {
            draft_max: 8,
            ngram_max: 3,
            ngram_min: 1,
        }
    }

    #[test]
    fn the_longest_recent_ngram_proposes_what_followed_it() {
        // "a b c d e ... a b c" -> "d e"
        let t = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3];
        assert_eq!(propose(&t, &cfg(), 2), vec![4, 5]);
        assert_eq!(propose(&t, &cfg(), 8), vec![4, 5, 9, 9, 1, 2, 3]);
        // The most recent occurrence wins.
        let t = [1, 2, 7, 1, 2, 8, 1, 2];
        assert_eq!(propose(&t, &cfg(), 1), vec![8]);
    }

    #[test]
    fn shorter_ngrams_are_tried_when_longer_ones_miss() {
        let t = [5, 6, 1, 7, 8, 1];
        assert_eq!(propose(&t, &cfg(), 2), vec![7, 8]);
        let two = SpecConfig {
            ngram_min: 2,
            ..cfg()
        };
        assert!(propose(&t, &two, 2).is_empty());
        assert!(propose(&[1, 2, 3], &cfg(), 4).is_empty());
        assert!(propose(&[], &cfg(), 4).is_empty());
        assert!(propose(&[1, 1, 1], &cfg(), 0).is_empty());
    }

    #[test]
    fn failing_drafts_cool_down_and_good_ones_keep_going() {
        let mut s = SpecState::default();
        for _ in 0..4 {
            assert!(s.wants_draft());
            s.record(4, 0);
        }
        let skipped = (0..COOLDOWN).filter(|_| !s.wants_draft()).count();
        assert_eq!(skipped as u32, COOLDOWN);
        assert!(s.wants_draft());
        // Failing again doubles the pause.
        for _ in 0..4 {
            s.record(4, 0);
        }
        assert_eq!(
            (0..2 * COOLDOWN).filter(|_| !s.wants_draft()).count() as u32,
            2 * COOLDOWN
        );
        let mut good = SpecState::default();
        for _ in 0..20 {
            assert!(good.wants_draft());
            good.record(4, 3);
        }
        assert_eq!((good.drafted, good.accepted), (80, 60));
    }
}
