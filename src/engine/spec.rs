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
    /// Fewest tokens drafted per step, whatever drafts are measured to
    /// cost (0: as many as pay, possibly none).
    pub draft_min: usize,
    /// Longest and shortest n-gram looked up.
    pub ngram_max: usize,
    pub ngram_min: usize,
}

impl Default for SpecConfig {
    fn default() -> Self {
        Self {
            draft_max: 8,
            draft_min: 0,
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

/// Acceptance assumed for a sequence before any of its drafts was judged.
const PRIOR: f64 = 0.6;
/// Weight of each newly judged drafted token in the moving acceptance.
const ALPHA_WEIGHT: f64 = 0.1;
/// Steps a sequence goes without drafting when no draft pays for its rows;
/// doubles each time it happens again, up to `MAX_COOLDOWN`.
const COOLDOWN: u32 = 16;
const MAX_COOLDOWN: u32 = 256;
/// Tokens drafted to probe again after a cooldown.
const PROBE: usize = 2;

/// One sequence's drafting record.
#[derive(Debug, Clone)]
pub struct SpecState {
    pub drafted: u32,
    pub accepted: u32,
    /// The chance that a drafted token is accepted, given the ones before
    /// it were (moving, per judged token).
    alpha: f64,
    /// Steps left without drafting.
    cooldown: u32,
    /// The next cooldown's length.
    next_cooldown: u32,
    /// The cooldown just ended: draft a little to measure again.
    probe: bool,
}

impl Default for SpecState {
    fn default() -> Self {
        Self {
            drafted: 0,
            accepted: 0,
            alpha: PRIOR,
            cooldown: 0,
            next_cooldown: COOLDOWN,
            probe: false,
        }
    }
}

/// Expected accepted tokens of a `k`-token draft when each is accepted with
/// chance `alpha` once the ones before it were.
fn expected(alpha: f64, k: usize) -> f64 {
    (1..=k as i32).map(|i| alpha.powi(i)).sum()
}

impl SpecState {
    /// How many tokens to draft this step, at most `max`: the length that
    /// gives the most tokens per second for a step of `sequences` decoding
    /// sequences, with steps costing `cost` = (base, per row) seconds (None:
    /// not measured yet; rows are then taken as free) and each drafted
    /// token `price` seconds to draft (a draft model's step; 0 for prompt
    /// lookup). 0: do not draft.
    pub fn draft_len(
        &mut self,
        max: usize,
        sequences: usize,
        cost: Option<(f64, f64)>,
        price: f64,
    ) -> usize {
        if max == 0 {
            return 0;
        }
        if self.cooldown > 0 {
            self.cooldown -= 1;
            self.probe = self.cooldown == 0;
            return 0;
        }
        if std::mem::take(&mut self.probe) {
            return PROBE.min(max);
        }
        let Some((base, per_row)) = cost else {
            return max;
        };
        let n = sequences.max(1) as f64;
        let step = base + per_row * n;
        let rate = |k: usize| (n + expected(self.alpha, k)) / (step + (per_row + price) * k as f64);
        let best = (0..=max)
            .max_by(|&a, &b| rate(a).total_cmp(&rate(b)))
            .unwrap_or(0);
        if best == 0 {
            self.cooldown = self.next_cooldown;
            self.next_cooldown = (self.next_cooldown * 2).min(MAX_COOLDOWN);
        }
        best
    }

    /// A verified step: the first `accepted` of `drafted` tokens were kept.
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.drafted += drafted as u32;
        self.accepted += accepted as u32;
        for _ in 0..accepted {
            self.alpha += ALPHA_WEIGHT * (1.0 - self.alpha);
        }
        if accepted < drafted {
            self.alpha -= ALPHA_WEIGHT * self.alpha;
        }
        if accepted * 2 >= drafted {
            // Drafts pay again: a later cooldown starts short.
            self.next_cooldown = COOLDOWN;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SpecConfig {
        SpecConfig {
            draft_max: 8,
            draft_min: 0,
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

    /// Steps cost 7 ms plus 4 ms a row: a small model on two CPU cores.
    const CPU: Option<(f64, f64)> = Some((0.007, 0.004));

    #[test]
    fn the_draft_length_follows_acceptance_and_cost() {
        let mut s = SpecState::default();
        // Not measured yet: rows are free, draft all.
        assert_eq!(s.draft_len(8, 1, None, 0.0), 8);
        // Acceptance 0.6 on a CPU: one token pays, more do not.
        assert_eq!(s.draft_len(8, 1, CPU, 0.0), 1);
        // Acceptance about 0.8: a few tokens pay.
        for _ in 0..20 {
            s.record(5, 4);
        }
        let some = s.draft_len(8, 1, CPU, 0.0);
        assert!((2..=5).contains(&some), "{some}");
        // Copying text: everything accepted, the longest draft pays most.
        for _ in 0..40 {
            s.record(4, 4);
        }
        assert_eq!(s.draft_len(8, 1, CPU, 0.0), 8);
        // On a GPU, rows are nearly free: the whole draft.
        assert_eq!(s.draft_len(8, 1, Some((0.010, 0.00001)), 0.0), 8);
        // Four sequences already fill the step well: a 0.6 draft does not pay.
        let mut four = SpecState::default();
        assert_eq!(four.draft_len(8, 4, CPU, 0.0), 0);
    }

    #[test]
    fn a_draft_model_that_costs_as_much_as_a_row_drafts_less() {
        let mut s = SpecState::default();
        for _ in 0..20 {
            s.record(5, 4);
        }
        let free = s.draft_len(8, 1, CPU, 0.0);
        let priced = s.draft_len(8, 1, CPU, 0.004);
        assert!(priced < free, "{priced} vs {free}");
        // Guesses as dear as the target's own step never pay.
        assert_eq!(s.draft_len(8, 1, CPU, 0.011), 0);
    }

    #[test]
    fn failing_drafts_cool_down_then_probe() {
        let mut s = SpecState::default();
        for _ in 0..10 {
            s.record(2, 0);
        }
        assert_eq!(s.draft_len(8, 1, CPU, 0.0), 0);
        let skipped = (0..COOLDOWN)
            .filter(|_| s.draft_len(8, 1, CPU, 0.0) == 0)
            .count();
        assert_eq!(skipped as u32, COOLDOWN);
        assert_eq!(s.draft_len(8, 1, CPU, 0.0), PROBE);
        s.record(2, 0);
        // Still failing: twice as long a pause.
        assert_eq!(s.draft_len(8, 1, CPU, 0.0), 0);
        assert_eq!(
            (0..2 * COOLDOWN)
                .filter(|_| s.draft_len(8, 1, CPU, 0.0) == 0)
                .count() as u32,
            2 * COOLDOWN
        );
        assert_eq!((s.drafted, s.accepted), (22, 0));
    }
}
