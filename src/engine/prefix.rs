//! Where a new request's prompt prefix comes from: the longest match across
//! the sequences in the KV (its own slot's, or one shared by copy from a
//! running sequence), RAM snapshots and disk snapshots. Pure: the worker
//! gathers the matches and carries out the choice.

use super::cache::Match;

/// A snapshot is restored only when it beats what is already in the KV by
/// this many tokens: restoring costs a state copy.
pub(super) const RESTORE_GAIN: usize = 16;

/// How many tokens of a `matched` prefix a prompt of `len` tokens can
/// reuse. The last prompt token is always recomputed: its logits start the
/// generation. When the cache holds the whole prompt (a retry, a restart),
/// its whole last chunk is recomputed: that token computed in a batch of one
/// can round differently from the cold run, and a repeated greedy request
/// must answer exactly as the first time did.
pub(super) fn usable_prefix(matched: usize, len: usize, batch: usize) -> usize {
    if matched + 1 >= len {
        (len.saturating_sub(1) / batch) * batch
    } else {
        matched
    }
}

/// Where the chosen prefix is.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Source<D> {
    /// Nothing worth reusing.
    None,
    /// An idle slot's own sequence: the request takes that slot.
    Own(usize),
    /// A running slot's sequence, shared into another slot by copy.
    Copy(usize),
    /// A RAM snapshot, by index.
    Ram(usize),
    /// A disk snapshot, by its key.
    Disk(D),
}

/// The matches on offer for one prompt.
#[derive(Debug, Clone)]
pub(super) struct Offers<D> {
    /// Idle slots (taking one reuses its KV in place).
    pub own: Vec<(usize, Match)>,
    /// Running slots (their prefix can be copied).
    pub copy: Vec<(usize, Match)>,
    pub ram: Option<(usize, Match)>,
    pub disk: Option<(D, Match)>,
}

/// The choice, with its match and how many tokens of it are usable.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Choice<D> {
    pub source: Source<D>,
    pub m: Match,
    pub usable: usize,
}

/// Pick the longest usable prefix. What is in the KV already wins ties and
/// small gains over a snapshot restore; taking an idle slot's own sequence
/// wins ties over a copy.
pub(super) fn choose<D: Clone>(offers: &Offers<D>, prompt_len: usize, batch: usize) -> Choice<D> {
    let usable = |m: &Match| {
        if m.tokens == 0 {
            0
        } else {
            usable_prefix(m.tokens, prompt_len, batch)
        }
    };
    let best = |v: &[(usize, Match)]| {
        v.iter()
            .map(|(s, m)| (*s, *m, usable(m)))
            .max_by_key(|(s, _, u)| (*u, std::cmp::Reverse(*s)))
    };
    let own = best(&offers.own);
    let copy = best(&offers.copy);
    let mut live: Choice<D> = Choice {
        source: Source::None,
        m: Match::default(),
        usable: 0,
    };
    if let Some((s, m, u)) = own {
        live = Choice {
            source: Source::Own(s),
            m,
            usable: u,
        };
    }
    if let Some((s, m, u)) = copy {
        if u > live.usable {
            live = Choice {
                source: Source::Copy(s),
                m,
                usable: u,
            };
        }
    }
    let ram_n = offers.ram.map_or(0, |(_, m)| usable(&m));
    let disk_n = offers.disk.as_ref().map_or(0, |(_, m)| usable(m));
    if ram_n > 0 && ram_n >= live.usable + RESTORE_GAIN && ram_n >= disk_n {
        let (i, m) = offers.ram.expect("ram offer");
        return Choice {
            source: Source::Ram(i),
            m,
            usable: ram_n,
        };
    }
    if disk_n > 0 && disk_n >= live.usable.max(ram_n) + RESTORE_GAIN {
        let (d, m) = offers.disk.clone().expect("disk offer");
        return Choice {
            source: Source::Disk(d),
            m,
            usable: disk_n,
        };
    }
    live
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(tokens: usize) -> Match {
        Match {
            tokens,
            by_text: false,
            text_bytes: 0,
        }
    }

    fn offers(
        own: Vec<(usize, usize)>,
        copy: Vec<(usize, usize)>,
        ram: Option<usize>,
        disk: Option<usize>,
    ) -> Offers<&'static str> {
        Offers {
            own: own.into_iter().map(|(s, t)| (s, m(t))).collect(),
            copy: copy.into_iter().map(|(s, t)| (s, m(t))).collect(),
            ram: ram.map(|t| (0, m(t))),
            disk: disk.map(|t| ("file", m(t))),
        }
    }

    #[test]
    fn a_fully_cached_prompt_recomputes_its_last_chunk() {
        assert_eq!(usable_prefix(1403, 1403, 512), 1024);
        assert_eq!(usable_prefix(1500, 1403, 512), 1024);
        assert_eq!(usable_prefix(1402, 1403, 512), 1024);
        assert_eq!(usable_prefix(1024, 1024, 512), 512);
    }

    #[test]
    fn a_partial_match_is_used_whole() {
        assert_eq!(usable_prefix(1416, 1439, 512), 1416);
        assert_eq!(usable_prefix(0, 10, 512), 0);
    }

    #[test]
    fn the_longest_prefix_in_the_kv_wins() {
        let c = choose(
            &offers(vec![(0, 100), (2, 300)], vec![(1, 200)], None, None),
            1000,
            512,
        );
        assert_eq!((c.source, c.usable), (Source::Own(2), 300));
        let c = choose(
            &offers(vec![(0, 100)], vec![(1, 900)], None, None),
            1000,
            512,
        );
        assert_eq!((c.source, c.usable), (Source::Copy(1), 900));
        // A tie goes to the slot's own sequence: no copy needed.
        let c = choose(
            &offers(vec![(3, 900)], vec![(1, 900)], None, None),
            1000,
            512,
        );
        assert_eq!(c.source, Source::Own(3));
        let c = choose(&offers(vec![], vec![], None, None), 1000, 512);
        assert_eq!((c.source, c.usable), (Source::None, 0));
    }

    #[test]
    fn a_snapshot_must_beat_the_kv_by_the_restore_gain() {
        let c = choose(&offers(vec![(0, 100)], vec![], Some(110), None), 1000, 512);
        assert_eq!(c.source, Source::Own(0));
        let c = choose(
            &offers(vec![(0, 100)], vec![], Some(116), Some(116)),
            1000,
            512,
        );
        assert_eq!(c.source, Source::Ram(0), "RAM wins a tie with disk");
        let c = choose(
            &offers(vec![(0, 100)], vec![(1, 50)], Some(120), Some(140)),
            1000,
            512,
        );
        assert_eq!(c.source, Source::Disk("file"));
    }

    #[test]
    fn the_same_prompt_cached_whole_is_capped_at_its_last_chunk() {
        let c = choose(&offers(vec![], vec![(1, 1403)], None, None), 1403, 512);
        assert_eq!((c.source, c.usable), (Source::Copy(1), 1024));
    }
}
