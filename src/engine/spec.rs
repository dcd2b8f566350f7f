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
    /// Longest match measured, and the shortest n-gram looked up.
    pub ngram_max: usize,
    pub ngram_min: usize,
}

impl Default for SpecConfig {
    fn default() -> Self {
        Self {
            draft_max: 12,
            draft_min: 0,
            ngram_max: 24,
            ngram_min: 2,
        }
    }
}

/// Only this many most recent tokens are searched: a lookup is a linear
/// scan per step.
pub(super) const LOOKBACK: usize = 16384;

/// How deep the places that vote are compared with the end of the tokens
/// (a longer match counts as this long). A shallow vote lets the many
/// places that repeat a pattern (the functions of a file the reply
/// rewrites, the lines it has written so far) outvote one longer match
/// that differs from them (the prompt's own version of those lines, when
/// the reply changes them all). A deep vote (up to `ngram_max`) follows
/// the one place that matches longest (when the reply copies the prompt
/// faithfully, numbers and all). Each sequence drafts with the one that
/// has been paying better ([`SpecState::lookup`]).
pub const VOTE_DEPTHS: [usize; 2] = [8, usize::MAX];

/// Places that vote at most: once this many of the most recent ones
/// matched as deep as a vote counts, no earlier place can outrank them,
/// and the scan stops (text that repeats itself, a run of one token,
/// would otherwise compare every place as deep as it goes).
const VOTERS: u32 = 32;

/// Prompt lookup's guess at the token after `tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guess {
    pub token: Token,
    /// Tokens before the guess that equal the end of `tokens`, at the
    /// earlier place that matches longest (at least `ngram_min`, measured
    /// up to `ngram_max`): how far the guess can be trusted.
    pub matched: usize,
    /// Whether more than half of the voting places agree on the token.
    pub majority: bool,
}

/// The next token by prompt lookup: every earlier place whose preceding
/// tokens equal the end of `tokens` (at least `ngram_min` of them) is a
/// candidate; those that match longest (counted up to `depth`, one of
/// [`VOTE_DEPTHS`]) vote with the token that followed them, and the most
/// voted one wins (the most recent place's token among equal counts).
/// Only the last [`LOOKBACK`] tokens are searched, and only the most
/// recent [`VOTERS`] places that match as deep as the vote counts vote.
pub fn guess(tokens: &[Token], cfg: &SpecConfig, depth: usize) -> Option<Guess> {
    let len = tokens.len();
    let n = cfg.ngram_min.max(1);
    if len <= n {
        return None;
    }
    let cap = cfg.ngram_max.max(n);
    let vote_cap = depth.max(n).min(cap);
    let from = len.saturating_sub(LOOKBACK);
    let last = tokens[len - 1];
    let (mut best, mut longest, mut total) = (0, 0, 0u32);
    // (token, votes), in order of first vote: the most recent place first.
    let mut votes: Vec<(Token, u32)> = Vec::new();
    // The places' next tokens are at i; their matches end at i - 1.
    for i in (from + 1..len).rev() {
        if tokens[i - 1] != last {
            continue;
        }
        let matched = 1
            + (1..cap)
                .take_while(|&m| m < i && tokens[i - 1 - m] == tokens[len - 1 - m])
                .count();
        if matched < n {
            continue;
        }
        longest = longest.max(matched);
        let voting = matched.min(vote_cap);
        if voting > best {
            best = voting;
            votes.clear();
            total = 0;
        }
        if voting == best {
            match votes.iter_mut().find(|(t, _)| *t == tokens[i]) {
                Some((_, c)) => *c += 1,
                None => votes.push((tokens[i], 1)),
            }
            total += 1;
            if best == vote_cap && total == VOTERS {
                break;
            }
        }
    }
    let (token, count) = votes
        .iter()
        .copied()
        .reduce(|a, b| if b.1 > a.1 { b } else { a })?;
    Some(Guess {
        token,
        matched: longest,
        majority: count * 2 > total,
    })
}

/// Up to `max` drafted tokens after `tokens`, starting with `first` (the
/// guess for the next one): each next guess is looked up with the ones
/// before it in place, and drafting stops where the voting places no
/// longer agree by a majority (once at least `min` tokens are drafted).
/// `tokens` is left as it was.
pub fn draft(
    tokens: &mut Vec<Token>,
    cfg: &SpecConfig,
    depth: usize,
    first: Token,
    max: usize,
    min: usize,
) -> Vec<Token> {
    let len = tokens.len();
    if max > 0 {
        tokens.push(first);
    }
    while tokens.len() - len < max {
        match guess(tokens, cfg, depth) {
            Some(g) if g.majority || tokens.len() - len < min => tokens.push(g.token),
            _ => break,
        }
    }
    tokens.split_off(len)
}

/// Drafts are judged apart by where they come from: a draft model, or a
/// lookup match of at least this many tokens (index + 1).
const KINDS: [usize; 4] = [0, 4, 8, 16];
/// Acceptance assumed for a kind of draft before any of it was judged: on
/// a CPU, too low for a draft to pay, so each kind is probed and measured
/// before its drafts are trusted (and a request's first steps are the same
/// whatever the step costs measured so far).
const PRIOR: f64 = 0.6;
/// Weight of each newly judged drafted token in the moving acceptance.
const ALPHA_WEIGHT: f64 = 0.1;
/// Chances a kind of draft goes undrafted when no draft of it pays for
/// its rows; doubles each time it happens again, up to `MAX_COOLDOWN`.
const COOLDOWN: u32 = 16;
const MAX_COOLDOWN: u32 = 256;
/// Tokens drafted to probe again after a cooldown.
const PROBE: usize = 2;

/// A drafted token's chance of acceptance after a verified step kept the
/// first `accepted` of `drafted` tokens (a moving estimate, per judged
/// token).
fn judged(mut alpha: f64, drafted: usize, accepted: usize) -> f64 {
    for _ in 0..accepted {
        alpha += ALPHA_WEIGHT * (1.0 - alpha);
    }
    if accepted < drafted {
        alpha -= ALPHA_WEIGHT * alpha;
    }
    alpha
}

/// What the engine has learned of each kind of draft over all its
/// sequences. A new sequence starts from it instead of probing kinds
/// again that earlier requests measured: an agent's next turn copies as
/// the last one did, and a reply too short to finish probing (a few
/// words that echo the request) is drafted from its first steps.
#[derive(Debug, Clone, Default)]
pub struct SpecPrior {
    alpha: [Option<f64>; 1 + KINDS.len()],
    /// The lookup depths' yields as the sequence judged last saw them.
    yields: Option<[Yield; VOTE_DEPTHS.len()]>,
}

impl SpecPrior {
    /// A verified step of a sequence whose last draft was of `kind`
    /// ([`SpecState::kind`]).
    pub fn learn(&mut self, kind: usize, drafted: usize, accepted: usize) {
        if drafted > 0 {
            let a = &mut self.alpha[kind];
            *a = Some(judged(a.unwrap_or(PRIOR), drafted, accepted));
        }
    }

    /// A sequence judged its lookup depths' drafts: the next sequence
    /// starts with the depth it found paying better.
    pub fn learn_depths(&mut self, state: &SpecState) {
        if state.judged {
            self.yields = Some(state.yields);
        }
    }
}

/// The record of one kind of draft.
#[derive(Debug, Clone)]
struct Kind {
    /// The chance that a drafted token is accepted, given the ones before
    /// it were (moving, per judged token).
    alpha: f64,
    /// Chances left without drafting.
    cooldown: u32,
    /// The next cooldown's length.
    next_cooldown: u32,
    /// The cooldown just ended: draft a little to measure again.
    probe: bool,
}

impl Kind {
    /// A kind never judged: its first draft is a probe.
    fn new(alpha: f64) -> Kind {
        Kind {
            alpha,
            cooldown: 0,
            next_cooldown: COOLDOWN,
            probe: true,
        }
    }
}

/// Weight of each step in a lookup depth's moving yield.
const YIELD_WEIGHT: f64 = 0.1;

/// What drafting with one lookup depth has been worth to a sequence, had
/// its drafts been the ones verified: moving tokens per step, and moving
/// seconds per step (from the step cost model; rows, when not measured).
#[derive(Debug, Clone, Copy)]
struct Yield {
    tokens: f64,
    secs: f64,
}

/// The drafts every lookup depth proposed for one step, waiting for the
/// tokens they guessed to be decoded.
#[derive(Debug, Clone)]
struct Judging {
    /// The sequence position of the drafts' first token.
    at: usize,
    drafts: [Vec<Token>; VOTE_DEPTHS.len()],
    cost: (f64, f64),
}

/// Steps whose drafts may wait to be judged: a draft is judged within
/// `--draft-max` decoded tokens.
const JUDGING: usize = 64;

/// One sequence's drafting record.
#[derive(Debug, Clone)]
pub struct SpecState {
    pub drafted: u32,
    pub accepted: u32,
    /// A draft model's guesses, then lookup matches by length (`KINDS`).
    kinds: [Kind; 1 + KINDS.len()],
    /// The kind of the draft being verified.
    last: usize,
    /// Each lookup depth's yield (`VOTE_DEPTHS`).
    yields: [Yield; VOTE_DEPTHS.len()],
    judging: std::collections::VecDeque<Judging>,
    /// Started from the engine's [`SpecPrior`].
    seeded: bool,
    /// Some lookup drafts were judged.
    judged: bool,
}

impl Default for SpecState {
    fn default() -> Self {
        Self {
            drafted: 0,
            accepted: 0,
            kinds: std::array::from_fn(|_| Kind::new(PRIOR)),
            last: 0,
            yields: [Yield {
                tokens: 1.0,
                secs: 1.0,
            }; VOTE_DEPTHS.len()],
            judging: Default::default(),
            seeded: false,
            judged: false,
        }
    }
}

/// Expected accepted tokens of a `k`-token draft when each is accepted with
/// chance `alpha` once the ones before it were.
fn expected(alpha: f64, k: usize) -> f64 {
    (1..=k as i32).map(|i| alpha.powi(i)).sum()
}

/// Which record judges a draft: a draft model's (`None`), or that of
/// lookup matches as long as `matched`.
fn kind_of(matched: Option<usize>) -> usize {
    match matched {
        None => 0,
        Some(m) => KINDS.iter().rposition(|&min| m >= min).unwrap_or(0) + 1,
    }
}

impl SpecState {
    /// How many tokens to draft this step, at most `max`, for a draft of a
    /// draft model (`matched` None) or of a lookup match that long: the
    /// length that gives the most tokens per second for a step of
    /// `sequences` decoding sequences, with steps costing `cost` = (base,
    /// per row) seconds (None: not measured yet; rows are then taken as
    /// free) and each drafted token `price` seconds to draft (a draft
    /// model's step; 0 for prompt lookup). 0: do not draft.
    pub fn draft_len(
        &mut self,
        matched: Option<usize>,
        max: usize,
        sequences: usize,
        cost: Option<(f64, f64)>,
        price: f64,
    ) -> usize {
        self.last = kind_of(matched);
        let kind = &mut self.kinds[self.last];
        if max == 0 {
            return 0;
        }
        if kind.cooldown > 0 {
            kind.cooldown -= 1;
            kind.probe = kind.cooldown == 0;
            return 0;
        }
        if std::mem::take(&mut kind.probe) {
            return PROBE.min(max);
        }
        let Some((base, per_row)) = cost else {
            return max;
        };
        let n = sequences.max(1) as f64;
        let step = base + per_row * n;
        let alpha = kind.alpha;
        let rate = |k: usize| (n + expected(alpha, k)) / (step + (per_row + price) * k as f64);
        let best = (0..=max)
            .max_by(|&a, &b| rate(a).total_cmp(&rate(b)))
            .unwrap_or(0);
        if best == 0 {
            kind.cooldown = kind.next_cooldown;
            kind.next_cooldown = (kind.next_cooldown * 2).min(MAX_COOLDOWN);
        }
        best
    }

    /// Start from what the engine learned of each kind of draft (once,
    /// before the sequence's first draft): a kind measured before starts
    /// at its acceptance, without a probe.
    pub fn seed(&mut self, prior: &SpecPrior) {
        if std::mem::replace(&mut self.seeded, true) {
            return;
        }
        if let Some(yields) = prior.yields {
            self.yields = yields;
        }
        for (kind, alpha) in self.kinds.iter_mut().zip(prior.alpha) {
            if let Some(alpha) = alpha {
                *kind = Kind {
                    probe: false,
                    ..Kind::new(alpha)
                };
            }
        }
    }

    /// The kind of the draft last sized, for [`SpecPrior::learn`].
    pub fn kind(&self) -> usize {
        self.last
    }

    /// Which of [`VOTE_DEPTHS`] drafts this step: the one that has been
    /// paying better (the shallow one while they tie).
    pub fn lookup(&self) -> usize {
        (0..VOTE_DEPTHS.len())
            .rev()
            .max_by(|&a, &b| {
                let rate = |y: &Yield| y.tokens / y.secs.max(1e-9);
                rate(&self.yields[a]).total_cmp(&rate(&self.yields[b]))
            })
            .unwrap_or(0)
    }

    /// The drafts every lookup depth proposes for the step whose first
    /// drafted token is at sequence position `at` (one of them is
    /// verified), judged by [`SpecState::judge_lookups`] once what they
    /// guessed is decoded; steps cost `cost` (None: not measured yet, rows
    /// are then counted instead).
    pub fn proposed(
        &mut self,
        at: usize,
        drafts: [Vec<Token>; VOTE_DEPTHS.len()],
        cost: Option<(f64, f64)>,
    ) {
        // A step planned again (it did not run) proposes anew.
        self.judging.retain(|j| j.at < at);
        if self.judging.len() == JUDGING {
            self.judging.pop_front();
        }
        self.judging.push_back(Judging {
            at,
            drafts,
            cost: cost.unwrap_or((0.0, 1.0)),
        });
    }

    /// A step was verified: the sequence now holds `tokens`, and `next`
    /// comes after them when the reply goes on. Each waiting step's drafts
    /// are judged once it is known how far each agrees with what was
    /// decoded (a draft longer than the verified one is judged on the
    /// tokens later steps decode, so a depth that drafts further is not
    /// judged by the other's shorter draft): tokens a step would have
    /// gained against the rows it would have cost.
    pub fn judge_lookups(&mut self, tokens: &[Token], next: Option<Token>) {
        let known = |q: usize| match q.cmp(&tokens.len()) {
            std::cmp::Ordering::Less => Some(tokens[q]),
            std::cmp::Ordering::Equal => next,
            std::cmp::Ordering::Greater => None,
        };
        // How far a draft at `at` agrees, if that is known yet.
        let agreed = |at: usize, d: &[Token]| {
            for (k, &t) in d.iter().enumerate() {
                match known(at + k) {
                    Some(x) if x == t => continue,
                    Some(_) => return Some(k),
                    None => return None,
                }
            }
            Some(d.len())
        };
        let mut i = 0;
        while i < self.judging.len() {
            let j = &self.judging[i];
            let judged: Option<Vec<usize>> = j.drafts.iter().map(|d| agreed(j.at, d)).collect();
            // A reply that ended leaves nothing more to learn.
            let Some(judged) = judged.or_else(|| next.is_none().then(Vec::new)) else {
                i += 1;
                continue;
            };
            let j = self.judging.remove(i).expect("in range");
            self.judged = true;
            let (base, per_row) = j.cost;
            for ((y, d), agreed) in self.yields.iter_mut().zip(&j.drafts).zip(judged) {
                let tokens = 1.0 + agreed as f64;
                let secs = base + per_row * (1 + d.len()) as f64;
                y.tokens += YIELD_WEIGHT * (tokens - y.tokens);
                y.secs += YIELD_WEIGHT * (secs - y.secs);
            }
        }
    }

    /// A verified step: the first `accepted` of `drafted` tokens of the
    /// draft last sized by [`SpecState::draft_len`] were kept.
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.drafted += drafted as u32;
        self.accepted += accepted as u32;
        let kind = &mut self.kinds[self.last];
        kind.alpha = judged(kind.alpha, drafted, accepted);
        if accepted * 2 >= drafted {
            // Drafts pay again: a later cooldown starts short.
            kind.next_cooldown = COOLDOWN;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHALLOW: usize = VOTE_DEPTHS[0];
    const DEEP: usize = VOTE_DEPTHS[1];

    /// Prompt lookup's draft after `tokens`, at most `max` tokens.
    fn propose(tokens: &[Token], cfg: &SpecConfig, max: usize) -> Vec<Token> {
        match guess(tokens, cfg, SHALLOW) {
            Some(g) if g.majority => draft(&mut tokens.to_vec(), cfg, SHALLOW, g.token, max, 0),
            _ => Vec::new(),
        }
    }

    fn cfg() -> SpecConfig {
        SpecConfig {
            draft_max: 8,
            draft_min: 0,
            ngram_max: 3,
            ngram_min: 1,
        }
    }

    #[test]
    fn what_followed_the_end_before_is_proposed() {
        // "a b c d e ... a b c" -> "d e ...", and on through the guesses.
        let t = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3];
        assert_eq!(propose(&t, &cfg(), 2), vec![4, 5]);
        assert_eq!(propose(&t, &cfg(), 8), vec![4, 5, 9, 9, 1, 2, 3, 4]);
        // The lookup leaves the tokens as they were.
        let mut v = t.to_vec();
        draft(&mut v, &cfg(), SHALLOW, 4, 3, 0);
        assert_eq!(v, t);
        // Two places, one vote each: the most recent one wins.
        let t = [1, 2, 7, 1, 2, 8, 1, 2];
        assert_eq!(guess(&t, &cfg(), SHALLOW).map(|g| g.token), Some(8));
        assert!(!guess(&t, &cfg(), SHALLOW).unwrap().majority);
        assert!(propose(&t, &cfg(), 4).is_empty());
    }

    #[test]
    fn the_places_that_match_longest_vote() {
        let two = SpecConfig {
            ngram_min: 2,
            ngram_max: 24,
            ..cfg()
        };
        // "1 2 3 4 | 5": the end "1 2 3 4" matches it whole; "9 3 4 | 6",
        // more recent, only its last two tokens.
        let t = [1, 2, 3, 4, 5, 0, 9, 3, 4, 6, 7, 1, 2, 3, 4];
        assert_eq!(
            guess(&t, &two, SHALLOW),
            Some(Guess {
                token: 5,
                matched: 4,
                majority: true
            })
        );
        assert_eq!(propose(&t, &two, 2), vec![5, 0]);
        // Past the shallow depth, matches count as equally long: three
        // places that repeat a line outvote the one that matches longer;
        // the deep vote follows that one.
        let line = [10, 11, 12, 13, 14, 15, 16, 17, 18];
        let mut t: Vec<Token> = vec![1, 2, 3];
        t.extend(line);
        t.push(40); // the prompt's version: the longest match
        for _ in 0..3 {
            t.extend([50, 51]);
            t.extend(line);
            t.push(41); // the reply's
        }
        t.extend([1, 2, 3]);
        t.extend(line);
        let g = guess(&t, &two, SHALLOW).unwrap();
        assert_eq!((g.token, g.matched, g.majority), (41, 12, true));
        let g = guess(&t, &two, DEEP).unwrap();
        assert_eq!((g.token, g.matched, g.majority), (40, 12, true));
        // The match is measured no further than ngram_max.
        let short = SpecConfig {
            ngram_max: 5,
            ..two
        };
        assert_eq!(guess(&t, &short, SHALLOW).map(|g| g.matched), Some(5));
        // A stretch that repeats itself matches as far as the cap, and is
        // drafted on through its own guesses.
        let t: Vec<Token> = (0..40).map(|i| i % 3).collect();
        assert_eq!(guess(&t, &two, SHALLOW).map(|g| g.matched), Some(24));
        assert_eq!(propose(&t, &two, 7), vec![1, 2, 0, 1, 2, 0, 1]);
    }

    #[test]
    fn a_run_of_one_token_is_voted_on_by_its_most_recent_places() {
        let two = SpecConfig {
            ngram_min: 2,
            ngram_max: 24,
            ..cfg()
        };
        // 16k places match 24 deep; the most recent VOTERS of them decide,
        // all for the same token, and the longest match is still measured.
        let mut t: Vec<Token> = vec![3; 16_000];
        t.extend([9; 40]);
        for depth in VOTE_DEPTHS {
            let g = guess(&t, &two, depth).unwrap();
            assert_eq!((g.token, g.matched, g.majority), (9, 24, true));
        }
        // Only the most recent voters count: a line followed by 7 a hundred
        // times, then by 8 (more than VOTERS times): the 8s decide, though
        // the 7s are more.
        let line: Vec<Token> = (10..19).collect();
        let mut t = Vec::new();
        for x in [7; 100].into_iter().chain([8; VOTERS as usize + 1]) {
            t.extend(&line);
            t.push(x);
        }
        t.extend(&line);
        let g = guess(&t, &two, SHALLOW).unwrap();
        assert_eq!((g.token, g.majority), (8, true));
    }

    #[test]
    fn drafting_stops_where_the_places_disagree_unless_a_minimum_is_asked() {
        // "5 6" was followed by 7 then 8 or 9: the draft stops before them.
        let t = [5, 6, 7, 8, 0, 5, 6, 7, 9, 0, 5, 6];
        let two = SpecConfig {
            ngram_min: 2,
            ..cfg()
        };
        assert_eq!(propose(&t, &two, 8), vec![7]);
        // With a minimum, the most recent place's token goes on, and past
        // it the one place that matches "7 9" leads the draft again.
        assert_eq!(
            draft(&mut t.to_vec(), &two, SHALLOW, 7, 8, 2),
            vec![7, 9, 0, 5, 6, 7, 9, 0]
        );
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
    fn each_sequence_drafts_with_the_depth_that_pays() {
        let mut s = SpecState::default();
        assert_eq!(s.lookup(), 0);
        // The deep vote's drafts are right, the shallow one's stop early:
        // more tokens a step for a few more rows. The shallow draft is
        // verified (one token accepted), the deep one is judged on what the
        // next steps decode.
        let mut seq: Vec<Token> = vec![1, 2, 3];
        for _ in 0..10 {
            let at = seq.len();
            s.proposed(at, [vec![7], vec![7, 8, 9, 10]], CPU);
            seq.push(7);
            s.judge_lookups(&seq, Some(8));
            seq.extend([8, 9, 10]);
            s.judge_lookups(&seq, Some(11));
            seq.push(11);
        }
        assert!(s.judging.is_empty());
        assert_eq!(s.lookup(), 1);
        // Then the deep one's guesses go wrong while the shallow one's
        // short drafts are right: rows for nothing.
        for _ in 0..30 {
            let at = seq.len();
            s.proposed(at, [vec![5, 6], vec![1, 2, 3, 4]], CPU);
            seq.extend([5, 6]);
            s.judge_lookups(&seq, Some(0));
            seq.push(0);
        }
        assert_eq!(s.lookup(), 0);
        // A step planned again proposes anew; a reply that ends judges
        // nothing more.
        let at = seq.len();
        s.proposed(at, [vec![1], vec![1, 2]], CPU);
        s.proposed(at, [vec![3], vec![3, 4]], CPU);
        assert_eq!(s.judging.len(), 1);
        let before = s.yields.map(|y| y.tokens);
        s.judge_lookups(&seq, None);
        assert!(s.judging.is_empty());
        assert_eq!(s.yields.map(|y| y.tokens), before);
    }

    #[test]
    fn a_new_sequence_starts_from_what_earlier_ones_measured() {
        let mut prior = SpecPrior::default();
        // The first sequence probes a long match, then learns it copies.
        let mut first = SpecState::default();
        first.seed(&prior);
        assert_eq!(first.draft_len(Some(20), 8, 1, CPU, 0.0), PROBE);
        first.record(PROBE, PROBE);
        prior.learn(first.kind(), PROBE, PROBE);
        for _ in 0..30 {
            first.draft_len(Some(20), 8, 1, CPU, 0.0);
            first.record(8, 8);
            prior.learn(first.kind(), 8, 8);
        }
        assert_eq!(first.draft_len(Some(20), 8, 1, CPU, 0.0), 8);
        // The next one drafts a long match whole from its first step, and
        // still probes the kinds nobody measured.
        let mut next = SpecState::default();
        next.seed(&prior);
        assert_eq!(next.draft_len(Some(20), 8, 1, CPU, 0.0), 8);
        assert_eq!(next.draft_len(Some(2), 8, 1, CPU, 0.0), PROBE);
        // It also starts with the lookup depth the last judged sequence
        // found paying better.
        let mut deep = SpecState::default();
        for k in 0..10 {
            deep.proposed(2 * k, [vec![], vec![1, 2]], CPU);
            deep.judge_lookups(&[1, 2].repeat(k + 1), Some(1));
        }
        assert_eq!(deep.lookup(), 1);
        prior.learn_depths(&deep);
        let mut after = SpecState::default();
        after.seed(&prior);
        assert_eq!(after.lookup(), 1);
        // Seeding happens once: a sequence's own record is not reset.
        next.record(PROBE, 0);
        next.seed(&prior);
        assert_eq!(next.kinds[1].alpha, judged(PRIOR, PROBE, 0));
    }

    /// Steps cost 7 ms plus 4 ms a row: a small model on two CPU cores.
    const CPU: Option<(f64, f64)> = Some((0.007, 0.004));
    /// A lookup match of 4 to 7 tokens (assumed accepted at 0.6).
    const M: Option<usize> = Some(4);

    #[test]
    fn the_draft_length_follows_acceptance_and_cost() {
        let mut s = SpecState::default();
        // A kind of draft never judged is probed first.
        assert_eq!(s.draft_len(Some(4), 8, 1, CPU, 0.0), PROBE);
        s.record(PROBE, 1);
        // Step costs not measured yet: rows are free, draft all.
        assert_eq!(s.draft_len(Some(4), 8, 1, None, 0.0), 8);
        // Acceptance about 0.6 on a CPU: one token pays, more do not.
        assert_eq!(s.draft_len(M, 8, 1, CPU, 0.0), 1);
        // Acceptance about 0.8: a few tokens pay.
        for _ in 0..20 {
            s.record(5, 4);
        }
        let some = s.draft_len(M, 8, 1, CPU, 0.0);
        assert!((2..=5).contains(&some), "{some}");
        // Copying text: everything accepted, the longest draft pays most.
        for _ in 0..40 {
            s.record(4, 4);
        }
        assert_eq!(s.draft_len(M, 8, 1, CPU, 0.0), 8);
        // On a GPU, rows are nearly free: the whole draft.
        assert_eq!(s.draft_len(M, 8, 1, Some((0.010, 0.00001)), 0.0), 8);
        // Four sequences already fill the step well: a 0.6 draft does not pay.
        let mut four = SpecState::default();
        assert_eq!(four.draft_len(M, 8, 4, CPU, 0.0), PROBE);
        four.record(PROBE, 1);
        assert_eq!(four.draft_len(M, 8, 4, CPU, 0.0), 0);
    }

    #[test]
    fn a_draft_model_that_costs_as_much_as_a_row_drafts_less() {
        let mut s = SpecState::default();
        s.draft_len(None, 8, 1, CPU, 0.0);
        for _ in 0..20 {
            s.record(5, 4);
        }
        let free = s.draft_len(None, 8, 1, CPU, 0.0);
        let priced = s.draft_len(None, 8, 1, CPU, 0.004);
        assert!(priced < free, "{priced} vs {free}");
        // Guesses as dear as the target's own step never pay.
        assert_eq!(s.draft_len(None, 8, 1, CPU, 0.011), 0);
    }

    #[test]
    fn failing_drafts_cool_down_then_probe() {
        let mut s = SpecState::default();
        s.draft_len(M, 8, 1, CPU, 0.0);
        for _ in 0..10 {
            s.record(2, 0);
        }
        assert_eq!(s.draft_len(M, 8, 1, CPU, 0.0), 0);
        let skipped = (0..COOLDOWN)
            .filter(|_| s.draft_len(M, 8, 1, CPU, 0.0) == 0)
            .count();
        assert_eq!(skipped as u32, COOLDOWN);
        assert_eq!(s.draft_len(M, 8, 1, CPU, 0.0), PROBE);
        s.record(2, 0);
        // Still failing: twice as long a pause.
        assert_eq!(s.draft_len(M, 8, 1, CPU, 0.0), 0);
        assert_eq!(
            (0..2 * COOLDOWN)
                .filter(|_| s.draft_len(M, 8, 1, CPU, 0.0) == 0)
                .count() as u32,
            2 * COOLDOWN
        );
        assert_eq!((s.drafted, s.accepted), (22, 0));
    }

    #[test]
    fn long_matches_are_judged_apart_from_short_ones() {
        let mut s = SpecState::default();
        // Drafts after a match of twenty tokens (copying the prompt) are
        // accepted whole, those after two-token matches rejected.
        for _ in 0..20 {
            s.draft_len(Some(20), 8, 1, None, 0.0);
            s.record(4, 4);
            s.draft_len(Some(2), 8, 1, None, 0.0);
            s.record(2, 0);
        }
        // The short matches stop drafting, the long ones draft all.
        assert_eq!(s.draft_len(Some(2), 8, 1, CPU, 0.0), 0);
        assert_eq!(s.draft_len(Some(20), 8, 1, CPU, 0.0), 8);
        // Which record a draft counts in, by its match length.
        assert_eq!(
            (kind_of(None), kind_of(Some(3)), kind_of(Some(4))),
            (0, 1, 2)
        );
        assert_eq!(
            (kind_of(Some(15)), kind_of(Some(16)), kind_of(Some(99))),
            (3, 4, 4)
        );
    }
}
