//! The golden-test harness shared by every format's tests: one example fed
//! whole, in every 2-way split, one char at a time and in seeded random
//! splits must give the same events, and those events must be well formed
//! and match the expected text and calls.

use super::{ToolEvent, ToolParser};
use serde_json::Value;

/// What a reply should come out as: visible text and calls, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Item {
    Text(String),
    Call { name: String, args: Value },
}

impl Item {
    pub fn text(s: &str) -> Item {
        Item::Text(s.to_string())
    }
    pub fn call(name: &str, args: Value) -> Item {
        Item::Call {
            name: name.to_string(),
            args,
        }
    }
}

/// Feed `chunks` to a fresh parser; the events with adjacent Text and
/// adjacent CallArgs of one call merged, so different splits compare equal.
pub(crate) fn run(make: &dyn Fn() -> Box<dyn ToolParser>, chunks: &[&str]) -> Vec<ToolEvent> {
    let mut parser = make();
    let mut events = Vec::new();
    for chunk in chunks {
        events.extend(parser.push(chunk));
    }
    events.extend(parser.finish());
    merge(events)
}

pub(crate) fn merge(events: Vec<ToolEvent>) -> Vec<ToolEvent> {
    let mut out: Vec<ToolEvent> = Vec::new();
    for ev in events {
        match (out.last_mut(), ev) {
            (_, ToolEvent::Text(t)) | (_, ToolEvent::CallArgs { fragment: t, .. })
                if t.is_empty() =>
            {
                panic!("empty fragment emitted")
            }
            (Some(ToolEvent::Text(a)), ToolEvent::Text(b)) => a.push_str(&b),
            (
                Some(ToolEvent::CallArgs {
                    index: i,
                    fragment: a,
                }),
                ToolEvent::CallArgs {
                    index: j,
                    fragment: b,
                },
            ) if *i == j => a.push_str(&b),
            (_, ev) => out.push(ev),
        }
    }
    out
}

/// Every way this harness splits an input: whole, each 2-way split, one char
/// at a time, and random chunks from a fixed-seed LCG.
pub(crate) fn splits(input: &str) -> Vec<Vec<&str>> {
    let bounds: Vec<usize> = input.char_indices().map(|(i, _)| i).skip(1).collect();
    let mut all = vec![vec![input]];
    for &b in &bounds {
        all.push(vec![&input[..b], &input[b..]]);
    }
    all.push(
        input
            .char_indices()
            .map(|(i, c)| &input[i..i + c.len_utf8()])
            .collect(),
    );
    let mut seed: u64 = 0x5eed_1234_abcd_0001;
    for _ in 0..32 {
        let mut chunks = Vec::new();
        let mut start = 0;
        let chars: Vec<usize> = input
            .char_indices()
            .map(|(i, _)| i)
            .chain([input.len()])
            .collect();
        let mut k = 0;
        while k + 1 < chars.len() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let step = 1 + ((seed >> 33) % 12) as usize;
            k = (k + step).min(chars.len() - 1);
            chunks.push(&input[start..chars[k]]);
            start = chars[k];
        }
        all.push(chunks);
    }
    all
}

/// Check the events are well formed (calls counted up from 0, nothing
/// interleaved, every call ended), whatever the arguments hold.
pub(crate) fn assert_well_formed(events: &[ToolEvent]) {
    let mut open = None;
    let mut next_index = 0;
    for ev in events {
        match ev {
            ToolEvent::Text(_) => assert!(open.is_none(), "text inside a call: {events:?}"),
            ToolEvent::CallStart { index, .. } => {
                assert!(open.is_none(), "call started inside a call: {events:?}");
                assert_eq!(*index, next_index, "call indices must count up: {events:?}");
                next_index += 1;
                open = Some(*index);
            }
            ToolEvent::CallArgs { index, .. } => {
                assert_eq!(open, Some(*index), "stray arguments: {events:?}")
            }
            ToolEvent::CallEnd { index } => {
                assert_eq!(open.take(), Some(*index), "stray end: {events:?}")
            }
        }
    }
    assert!(open.is_none(), "call never ended: {events:?}");
}

/// Check the events are well formed and turn them into [`Item`]s.
pub(crate) fn items(events: &[ToolEvent]) -> Vec<Item> {
    assert_well_formed(events);
    let mut items = Vec::new();
    let mut open: Option<(usize, String, String)> = None;
    let mut next_index = 0;
    for ev in events {
        match ev {
            ToolEvent::Text(t) => {
                assert!(open.is_none(), "text inside a call: {events:?}");
                items.push(Item::Text(t.clone()));
            }
            ToolEvent::CallStart { index, name } => {
                assert!(open.is_none(), "call started inside a call: {events:?}");
                assert_eq!(*index, next_index, "call indices must count up: {events:?}");
                next_index += 1;
                open = Some((*index, name.clone(), String::new()));
            }
            ToolEvent::CallArgs { index, fragment } => {
                let (i, _, args) = open.as_mut().expect("arguments outside a call");
                assert_eq!(i, index);
                args.push_str(fragment);
            }
            ToolEvent::CallEnd { index } => {
                let (i, name, args) = open.take().expect("end outside a call");
                assert_eq!(i, *index);
                let args: Value = serde_json::from_str(&args)
                    .unwrap_or_else(|e| panic!("arguments {args:?} are not JSON: {e}"));
                assert!(args.is_object(), "arguments must be an object: {args}");
                items.push(Item::Call { name, args });
            }
        }
    }
    assert!(open.is_none(), "call never ended: {events:?}");
    items
}

/// The golden check: every split of `input` gives the same events, and they
/// read as `expected`.
pub(crate) fn check(make: &dyn Fn() -> Box<dyn ToolParser>, input: &str, expected: &[Item]) {
    let reference = run(make, &[input]);
    for chunks in splits(input) {
        let got = run(make, &chunks);
        assert_eq!(
            got, reference,
            "split {chunks:?} differs from feeding {input:?} whole"
        );
    }
    assert_eq!(items(&reference), expected, "for input {input:?}");
}
