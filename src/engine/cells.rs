//! How many KV cells the sequences hold, counted the way llama.cpp's unified
//! KV buffer holds them.
//!
//! llama.cpp does not report its used cells, and the scheduler must know
//! them before a step (a batch that finds no free cells fails). In the
//! unified buffer a prefix copied to another sequence (`seq_cp`) shares its
//! cells, and a cell is freed only when no sequence holds it any more. The
//! ledger mirrors that: each run of positions a sequence computed is a
//! *block*; a copy references the source's blocks up to the copied length;
//! a truncation shortens references. Every reference to a block starts at
//! the block's first position (copies and truncations only ever cut ends),
//! so a block's cells in use are its longest reference.

use std::collections::HashMap;

/// Positions `start..end` of one block, as one sequence references them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    block: u64,
    start: usize,
    end: usize,
}

/// The cells each sequence holds, by sequence id.
#[derive(Debug, Clone)]
pub struct CellLedger {
    capacity: usize,
    seqs: Vec<Vec<Span>>,
    /// How many spans reference each block (a block with one reference can
    /// grow in place).
    refs: HashMap<u64, usize>,
    next_block: u64,
}

impl CellLedger {
    pub fn new(capacity: usize, n_seq: usize) -> Self {
        Self {
            capacity,
            seqs: vec![Vec::new(); n_seq],
            refs: HashMap::new(),
            next_block: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions `seq` holds.
    pub fn len(&self, seq: usize) -> usize {
        self.seqs[seq].last().map_or(0, |s| s.end)
    }

    /// `seq` computed `n` more positions at its end.
    pub fn append(&mut self, seq: usize, n: usize) {
        if n == 0 {
            return;
        }
        let len = self.len(seq);
        if let Some(last) = self.seqs[seq].last_mut() {
            if self.refs.get(&last.block) == Some(&1) {
                last.end += n;
                return;
            }
        }
        let block = self.next_block;
        self.next_block += 1;
        self.refs.insert(block, 1);
        self.seqs[seq].push(Span {
            block,
            start: len,
            end: len + n,
        });
    }

    /// `seq` keeps only its first `n` positions.
    pub fn truncate(&mut self, seq: usize, n: usize) {
        let spans = &mut self.seqs[seq];
        while let Some(last) = spans.last_mut() {
            if last.start >= n {
                let block = last.block;
                spans.pop();
                release(&mut self.refs, block);
            } else {
                last.end = last.end.min(n);
                break;
            }
        }
    }

    pub fn clear(&mut self, seq: usize) {
        self.truncate(seq, 0);
    }

    /// `dst` now holds positions `0..n` of `src`, sharing its cells.
    pub fn copy(&mut self, src: usize, dst: usize, n: usize) {
        self.clear(dst);
        let spans: Vec<Span> = self.seqs[src]
            .iter()
            .filter(|s| s.start < n)
            .map(|s| Span {
                end: s.end.min(n),
                ..*s
            })
            .collect();
        for s in &spans {
            *self.refs.entry(s.block).or_insert(0) += 1;
        }
        self.seqs[dst] = spans;
    }

    /// Cells in use: each block's longest reference, summed.
    pub fn used(&self) -> usize {
        let mut blocks: HashMap<u64, (usize, usize)> = HashMap::new();
        for s in self.seqs.iter().flatten() {
            let e = blocks.entry(s.block).or_insert((s.start, s.end));
            e.1 = e.1.max(s.end);
        }
        blocks.values().map(|(start, end)| end - start).sum()
    }

    pub fn free(&self) -> usize {
        self.capacity.saturating_sub(self.used())
    }

    /// Cells only `seq` holds: what clearing it would free.
    pub fn exclusive(&self, seq: usize) -> usize {
        let mut others = self.clone();
        others.clear(seq);
        self.used() - others.used()
    }
}

fn release(refs: &mut HashMap<u64, usize>, block: u64) {
    if let Some(r) = refs.get_mut(&block) {
        *r -= 1;
        if *r == 0 {
            refs.remove(&block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_count_and_truncation_frees() {
        let mut l = CellLedger::new(100, 2);
        l.append(0, 10);
        l.append(0, 5);
        assert_eq!((l.len(0), l.used(), l.free()), (15, 15, 85));
        l.truncate(0, 4);
        assert_eq!((l.len(0), l.used()), (4, 4));
        l.append(1, 3);
        assert_eq!(l.used(), 7);
        l.clear(0);
        assert_eq!(l.used(), 3);
    }

    #[test]
    fn a_copied_prefix_is_held_once() {
        let mut l = CellLedger::new(100, 3);
        l.append(0, 50);
        l.copy(0, 1, 40);
        assert_eq!(l.len(1), 40);
        assert_eq!(l.used(), 50, "the copy shares cells");
        l.append(1, 10);
        assert_eq!(l.used(), 60);
        l.append(0, 1);
        assert_eq!(l.used(), 61);
        // The source lets go of its cells: the copy still holds 40 of them.
        l.truncate(0, 0);
        assert_eq!(l.used(), 50);
        assert_eq!(l.exclusive(1), 50);
        // A copy of a copy.
        l.copy(1, 2, 45);
        assert_eq!(l.used(), 50);
        assert_eq!(l.exclusive(1), 5);
        l.clear(1);
        assert_eq!(l.used(), 45);
    }

    #[test]
    fn a_shared_block_does_not_grow_in_place() {
        let mut l = CellLedger::new(100, 2);
        l.append(0, 10);
        l.copy(0, 1, 10);
        l.append(0, 2);
        l.append(1, 3);
        assert_eq!(l.used(), 15);
        l.truncate(1, 10);
        assert_eq!(l.used(), 12);
    }

    #[test]
    fn copying_over_a_sequence_releases_what_it_held() {
        let mut l = CellLedger::new(100, 2);
        l.append(0, 10);
        l.append(1, 20);
        l.copy(0, 1, 5);
        assert_eq!(l.used(), 10);
        assert_eq!(l.len(1), 5);
    }
}
