//! Prompt lookup: the token after a sequence's end, by the vote of the
//! earlier places that match it, and drafts built from such guesses (pure).

use super::SpecConfig;
use crate::engine::llama::Token;

/// Only this many most recent tokens are searched: a lookup is a linear
/// scan per step.
pub(in crate::engine) const LOOKBACK: usize = 16384;

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
}
