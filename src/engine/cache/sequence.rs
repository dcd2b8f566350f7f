//! A token sequence with the text it spells, kept in step.
//!
//! Prefix reuse matches token ids first. But a conversation comes back as
//! text: the model's reply, re-rendered by the template and re-tokenized,
//! can split into different tokens than the ones generated, and a pure
//! token match would then throw away everything after the first
//! difference. Keeping each token's text lets the engine match on the
//! rendered text instead and re-tokenize only what follows the match.

use crate::engine::llama::Token;

#[derive(Debug, Clone)]
pub struct Sequence {
    tokens: Vec<Token>,
    /// Concatenated token texts. Bytes, not a String: a token can end in
    /// the middle of a UTF-8 character.
    text: Vec<u8>,
    /// `text` length after each token.
    ends: Vec<usize>,
    /// False once a token's text is not known to match the rendered
    /// prompt; only token matching is used then.
    text_ok: bool,
}

impl Default for Sequence {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            text: Vec::new(),
            ends: Vec::new(),
            text_ok: true,
        }
    }
}

impl Sequence {
    /// Rebuild from stored parts (a snapshot file). `text_ok` only when the
    /// pieces' lengths add up to the text.
    pub fn from_parts(tokens: Vec<Token>, text: Vec<u8>, piece_lens: &[usize]) -> Self {
        let mut ends = Vec::with_capacity(tokens.len());
        let mut at = 0;
        for &l in piece_lens {
            at += l;
            ends.push(at);
        }
        let text_ok = piece_lens.len() == tokens.len()
            && at == text.len()
            && (tokens.is_empty() || !text.is_empty());
        if !text_ok {
            ends = vec![0; tokens.len()];
        }
        Self {
            tokens,
            text,
            ends,
            text_ok,
        }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    /// The text the tokens spell; empty when it is not known.
    pub fn text(&self) -> &[u8] {
        if self.text_ok {
            &self.text
        } else {
            &[]
        }
    }

    pub fn text_ok(&self) -> bool {
        self.text_ok
    }

    pub fn push(&mut self, token: Token, piece: &[u8]) {
        self.tokens.push(token);
        self.text.extend_from_slice(piece);
        self.ends.push(self.text.len());
    }

    /// Forget the text: from now on only token matching applies.
    pub fn mark_text_unknown(&mut self) {
        self.text_ok = false;
    }

    pub fn truncate(&mut self, n: usize) {
        if n >= self.tokens.len() {
            return;
        }
        self.tokens.truncate(n);
        self.ends.truncate(n);
        let end = self.ends.last().copied().unwrap_or(0);
        self.text.truncate(end);
        if n == 0 {
            self.text_ok = true;
        }
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// The text length after the first `n` tokens.
    pub fn text_len_at(&self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.ends[n - 1]
        }
    }

    /// The text token `i` added (empty when the text is not known).
    pub fn piece(&self, i: usize) -> &[u8] {
        if !self.text_ok || i >= self.tokens.len() {
            return &[];
        }
        &self.text[self.text_len_at(i)..self.ends[i]]
    }

    /// How many leading tokens equal `tokens`'.
    pub fn common_tokens(&self, tokens: &[Token]) -> usize {
        self.tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// The most leading tokens whose text is a prefix of `prompt`, ending
    /// on a character boundary of it. Returns (tokens, bytes).
    pub fn text_match(&self, prompt: &str) -> (usize, usize) {
        if !self.text_ok {
            return (0, 0);
        }
        let common = self
            .text
            .iter()
            .zip(prompt.as_bytes())
            .take_while(|(a, b)| a == b)
            .count();
        let mut k = self.ends.partition_point(|&e| e <= common);
        while k > 0 && !prompt.is_char_boundary(self.ends[k - 1]) {
            k -= 1;
        }
        (k, self.text_len_at(k))
    }

    /// Piece lengths, for storing (all zero when the text is unknown).
    pub fn piece_lens(&self) -> Vec<usize> {
        if !self.text_ok {
            return vec![0; self.tokens.len()];
        }
        let mut prev = 0;
        self.ends
            .iter()
            .map(|&e| {
                let l = e - prev;
                prev = e;
                l
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(pieces: &[&str]) -> Sequence {
        let mut s = Sequence::default();
        for (i, p) in pieces.iter().enumerate() {
            s.push(i as Token + 100, p.as_bytes());
        }
        s
    }

    #[test]
    fn text_match_stops_at_the_last_whole_token() {
        let s = seq(&["<s>", "Hello", " wor", "ld", "!"]);
        // The new rendering tokenized " world" differently, then went on.
        assert_eq!(s.text_match("<s>Hello world, friend"), (4, 14));
        assert_eq!(s.text_match("<s>Hello there"), (2, 8));
        assert_eq!(s.text_match("nothing alike"), (0, 0));
        assert_eq!(s.text_match("<s>Hello world!"), (5, 15));
    }

    #[test]
    fn text_match_never_splits_a_character() {
        let mut s = Sequence::default();
        let euro = "€".as_bytes();
        s.push(1, b"a");
        s.push(2, &euro[..2]);
        s.push(3, &euro[2..]);
        assert_eq!(s.text_match("a€b"), (3, 4));
        // The prompt diverges inside the character: only "a" is safe.
        assert_eq!(s.text_match("a\u{20ad}"), (1, 1));
    }

    #[test]
    fn truncate_keeps_text_in_step() {
        let mut s = seq(&["ab", "cd", "ef"]);
        s.truncate(2);
        assert_eq!(s.text(), b"abcd");
        assert_eq!(s.common_tokens(&[100, 101, 7]), 2);
        assert_eq!(s.piece_lens(), vec![2, 2]);
    }

    #[test]
    fn unknown_text_disables_text_matching_until_cleared() {
        let mut s = seq(&["ab"]);
        s.mark_text_unknown();
        assert_eq!(s.text_match("ab"), (0, 0));
        s.clear();
        assert!(s.text_ok());
    }

    #[test]
    fn from_parts_checks_lengths() {
        let s = Sequence::from_parts(vec![1, 2], b"abc".to_vec(), &[1, 2]);
        assert!(s.text_ok());
        assert_eq!(s.text_match("abcd"), (2, 3));
        let bad = Sequence::from_parts(vec![1, 2], b"abc".to_vec(), &[1, 1]);
        assert!(!bad.text_ok());
        let unknown = Sequence::from_parts(vec![1, 2], Vec::new(), &[0, 0]);
        assert!(!unknown.text_ok());
        assert_eq!(unknown.text_match("anything"), (0, 0));
    }
}
