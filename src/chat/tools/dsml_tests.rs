//! Golden tests for the DSML parser (kept apart so `dsml.rs` stays short).

use super::super::testkit::{check, merge, Item};
use super::super::{ToolEvent, ToolParser};
use super::*;
use crate::chat::reasoning::{ReasoningPiece, ReasoningSplitter};
use serde_json::json;

fn parser() -> Box<dyn ToolParser> {
    Box::new(DsmlParser::new())
}

/// The assistant turn of DeepSeek's own golden encoding test:
/// huggingface.co/deepseek-ai/DeepSeek-V4-Pro, `encoding/tests/test_output_1.txt`
/// (the reply to `test_input_1.json`'s weather question), from the token
/// after `<｜Assistant｜><think>` up to `<｜end▁of▁sentence｜>`, which is a stop
/// token and so never reaches the parser. The encoder puts `\n\n` between
/// the reply's content and the block (`encoding_dsv4.py`, `render_message`).
const DEEPSEEK_GOLDEN: &str = "The user wants to know the weather in Beijing. I should use the get_weather tool.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"location\" string=\"true\">Beijing</｜DSML｜parameter>\n<｜DSML｜parameter name=\"unit\" string=\"true\">celsius</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";

#[test]
fn deepseek_golden_reply_after_reasoning() {
    let content = DEEPSEEK_GOLDEN.split_once("</think>").unwrap().1;
    check(
        &parser,
        content,
        &[Item::call(
            "get_weather",
            json!({"location": "Beijing", "unit": "celsius"}),
        )],
    );
}

/// The same reply through both stages, as the server runs them: the
/// template's prompt opened `<think>`, the splitter hands content on.
#[test]
fn deepseek_golden_reply_through_the_reasoning_splitter() {
    let mut splitter = ReasoningSplitter::new("<think>", "</think>", true);
    let mut tools = DsmlParser::new();
    let (mut reasoning, mut events) = (String::new(), Vec::new());
    let mut pieces = Vec::new();
    for c in DEEPSEEK_GOLDEN.chars() {
        pieces.extend(splitter.push(c.encode_utf8(&mut [0; 4])));
    }
    pieces.extend(splitter.finish());
    for piece in pieces {
        match piece {
            ReasoningPiece::Reasoning(r) => reasoning.push_str(&r),
            ReasoningPiece::Content(c) => events.extend(tools.push(&c)),
        }
    }
    events.extend(tools.finish());
    assert_eq!(
        reasoning,
        "The user wants to know the weather in Beijing. I should use the get_weather tool."
    );
    assert_eq!(
        merge(events),
        vec![
            ToolEvent::CallStart {
                index: 0,
                name: "get_weather".into()
            },
            ToolEvent::CallArgs {
                index: 0,
                fragment: "{\"location\": \"Beijing\", \"unit\": \"celsius\"}".into()
            },
            ToolEvent::CallEnd { index: 0 },
        ]
    );
}

#[test]
fn typed_values_several_invokes_and_text() {
    let input = "I'll look.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"search\">\n<｜DSML｜parameter name=\"query\" string=\"true\">rust \"async\" \\ 日本語\nline two</｜DSML｜parameter>\n<｜DSML｜parameter name=\"num_results\" string=\"false\">5</｜DSML｜parameter>\n<｜DSML｜parameter name=\"filters\" string=\"false\">{\"lang\": [\"en\", \"ja\"], \"safe\": true, \"n\": null}</｜DSML｜parameter>\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"now\">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>\nThen I answer.";
    check(
        &parser,
        input,
        &[
            Item::text("I'll look."),
            Item::call(
                "search",
                json!({"query": "rust \"async\" \\ 日本語\nline two", "num_results": 5, "filters": {"lang": ["en", "ja"], "safe": true, "n": null}}),
            ),
            Item::call("now", json!({})),
            Item::text("Then I answer."),
        ],
    );
}

#[test]
fn v32_function_calls_wrapper() {
    let input = "<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"location\" string=\"true\">Hangzhou</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>";
    check(
        &parser,
        input,
        &[Item::call("get_weather", json!({"location": "Hangzhou"}))],
    );
}

#[test]
fn values_that_look_like_markup() {
    let input = "<｜DSML｜tool_calls><｜DSML｜invoke name=\"write\"><｜DSML｜parameter name=\"text\" string=\"true\"><｜DSML｜invoke name=\"x\"> </｜DSML｜param</｜DSML｜parameter><｜DSML｜parameter name=\"n\" string=\"false\">[1, [2, {\"k\": \"}\"}]]</｜DSML｜parameter></｜DSML｜invoke></｜DSML｜tool_calls>";
    check(
        &parser,
        input,
        &[Item::call(
            "write",
            json!({"text": "<｜DSML｜invoke name=\"x\"> </｜DSML｜param", "n": [1, [2, {"k": "}"}]]}),
        )],
    );
}

#[test]
fn missing_string_attribute_is_guessed() {
    let input = "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\">42</｜DSML｜parameter>\n<｜DSML｜parameter name=\"b\">hello</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
    check(
        &parser,
        input,
        &[Item::call("f", json!({"a": 42, "b": "hello"}))],
    );
}

#[test]
fn look_alikes_stay_text() {
    let input =
        "DSML uses <｜DSML｜tool_calls and <｜DSML｜invoke tags; <｜DSML｜tool_calls>plain words";
    check(&parser, input, &[Item::text(input)]);
    let input = "<｜DSML｜tool_calls>\n<｜DSML｜invoke nom=\"f\">\n";
    check(&parser, input, &[Item::text(input)]);
}

#[test]
fn unterminated_calls() {
    // Never got past the invoke tag: shown as text.
    let input = "ok <｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_wea";
    check(&parser, input, &[Item::text(input)]);
    // Stopped between parameters: the arguments are complete, so the call closes.
    let input = "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"false\">1</｜DSML｜parameter>\n<｜DSML｜para";
    check(&parser, input, &[Item::call("f", json!({"a": 1}))]);
}

#[test]
fn closing_tags_cut_off_by_the_end_are_dropped() {
    let input =
        "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_ca";
    check(&parser, input, &[Item::call("f", json!({}))]);
    let input = "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜inv";
    check(&parser, input, &[Item::call("f", json!({}))]);
}

#[test]
fn arguments_stream_while_a_value_is_written() {
    let mut p = DsmlParser::new();
    let ev = p.push("<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"w\">\n<｜DSML｜parameter name=\"t\" string=\"true\">a\"b</｜DSML｜");
    assert_eq!(
        ev,
        vec![
            ToolEvent::CallStart {
                index: 0,
                name: "w".into()
            },
            ToolEvent::CallArgs {
                index: 0,
                fragment: "{\"t\": \"a\\\"b".into()
            },
        ]
    );
    let ev = p.push("parameter>\n</｜DSML｜invoke>");
    assert_eq!(
        ev,
        vec![
            ToolEvent::CallArgs {
                index: 0,
                fragment: "\"}".into()
            },
            ToolEvent::CallEnd { index: 0 },
        ]
    );
}

#[test]
fn render_matches_the_reference_encoder() {
    let text = render_call(
        "get_weather",
        r#"{"location": "Beijing", "unit": "celsius"}"#,
    );
    assert_eq!(text, DEEPSEEK_GOLDEN.split_once("\n\n").unwrap().1);
    let text = render_call("f", r#"{"n": [1, {"a": "é"}], "s": "x"}"#);
    assert!(text.contains("<｜DSML｜parameter name=\"n\" string=\"false\">[1, {\"a\": \"é\"}]</｜DSML｜parameter>\n<｜DSML｜parameter name=\"s\" string=\"true\">x</｜DSML｜parameter>"));
}
