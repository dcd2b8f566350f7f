//! Unit tests of the Responses conversion, truncation and stream.

use super::input::*;
use super::request::*;
use super::stream::*;
use super::*;
use crate::chat::output::OutputEvent;
use crate::chat::{ToolCall, ToolChoice};

fn conv(input: Value) -> Result<Vec<ChatMessage>, ApiError> {
    conversation(None, None, Some(input)).map(|c| c.messages)
}

#[test]
fn truncation_cuts_only_at_user_turns_after_the_instructions() {
    let input = json!([
        {"role": "user", "content": "a"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "r"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"},
    ]);
    let messages = conversation(Some("be brief"), None, Some(input))
        .unwrap()
        .messages;
    let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
    assert_eq!(roles[0], Role::System);
    let (first, cuts) = turn_cuts(&messages);
    assert_eq!(first, 1);
    // Never before the first turn; each cut starts a user turn, and the
    // call with its result falls wholly before the first cut.
    assert_eq!(cuts.len(), 2);
    assert!(cuts.iter().all(|&c| messages[c].role == Role::User));
    assert!(messages[first..cuts[0]]
        .iter()
        .any(|m| m.role == Role::Tool));
    assert_eq!(messages[*cuts.last().unwrap()].content, "e");
    // A lone turn cannot be cut.
    assert!(turn_cuts(&conv(json!("hi")).unwrap()).1.is_empty());
}

#[test]
fn items_become_messages() {
    let m = conv(json!([
        {"role": "developer", "content": "be brief"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "need a tool"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "get", "arguments": "{\"city\":\"Paris\"}"},
        {"type": "function_call", "call_id": "c2", "name": "get", "arguments": "{\"city\":\"Rome\"}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
    ]))
    .unwrap();
    assert_eq!(m.len(), 5, "{m:#?}");
    assert_eq!(m[0], ChatMessage::new(Role::System, "be brief"));
    assert_eq!(m[1], ChatMessage::new(Role::User, "weather?"));
    assert_eq!(m[2].role, Role::Assistant);
    assert_eq!(m[2].content, "Checking.");
    assert_eq!(m[2].reasoning.as_deref(), Some("need a tool"));
    assert_eq!(
        m[2].tool_calls
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>(),
        ["c1", "c2"]
    );
    assert_eq!(m[3], ChatMessage::tool_result("c1", None, "sunny"));
    assert_eq!(m[4], ChatMessage::tool_result("c2", None, "rain"));
}

#[test]
fn a_string_is_one_user_message_after_the_instructions() {
    let c = conversation(Some("rules"), None, Some(json!("hi"))).unwrap();
    assert_eq!(
        c.messages,
        vec![
            ChatMessage::new(Role::System, "rules"),
            ChatMessage::new(Role::User, "hi")
        ]
    );
    assert_eq!(c.stored_from, 1);
    assert_eq!(c.origins, ["instructions", "input"]);
}

#[test]
fn a_continuation_may_answer_stored_calls() {
    let prev = vec![
        ChatMessage::new(Role::User, "go"),
        ChatMessage {
            role: Role::Assistant,
            tool_calls: vec![ToolCall {
                id: "call_1".into(),
                name: "f".into(),
                arguments: "{}".into(),
            }],
            ..Default::default()
        },
    ];
    let c = conversation(
        Some("sys"),
        Some(&prev),
        Some(json!([{"type": "function_call_output", "call_id": "call_1", "output": "ok"}])),
    )
    .unwrap();
    assert_eq!(c.messages.len(), 4);
    assert_eq!(
        c.origins,
        [
            "instructions",
            "previous_response_id",
            "previous_response_id",
            "input[0]"
        ]
    );
    assert!(conversation(
        None,
        None,
        Some(json!([{"type": "function_call_output", "call_id": "call_1", "output": "ok"}]))
    )
    .is_err());
}

#[test]
fn rejects_bad_items_naming_them() {
    let cases = [
        (json!([]), "input"),
        (json!(5), "input"),
        (
            json!([{"type": "message", "role": "wizard", "content": "x"}]),
            "input[0].role",
        ),
        (
            json!([{"role": "user", "content": "x"}, {"type": "function_call_output", "call_id": "nope", "output": "x"}]),
            "input[1].call_id",
        ),
        (
            json!([{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]),
            "input[0].arguments",
        ),
        (
            json!([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
            "input[0].content[0].type",
        ),
        (
            json!([{"type": "web_search_call", "id": "x"}]),
            "input[0].type",
        ),
        (json!(["text"]), "input[0]"),
    ];
    for (input, param) in cases {
        let err = conv(input.clone()).unwrap_err();
        assert_eq!(
            err.param.as_deref(),
            Some(param),
            "{input}: {}",
            err.message
        );
    }
}

#[test]
fn hosted_tools_are_left_out_and_choices_parse() {
    let (specs, echo) = tools(vec![
        json!({"type": "function", "name": "shell", "parameters": {"type": "object", "properties": {}}}),
        json!({"type": "local_shell"}),
        json!({"type": "web_search"}),
    ])
    .unwrap();
    assert_eq!(specs.len(), 1);
    assert_eq!(echo.as_slice().len(), 3);
    assert!(tools(vec![json!({"type": "teleport"})]).is_err());
    let mut s = specs.clone();
    assert_eq!(
        tool_choice(Some(json!({"type": "function", "name": "shell"})), &mut s)
            .unwrap()
            .0,
        ToolChoice::Named("shell".into())
    );
    let (c, _) = tool_choice(Some(json!({"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "other"}]})), &mut s).unwrap();
    assert_eq!(c, ToolChoice::Required);
    assert!(s.is_empty());
    assert!(tool_choice(Some(json!("sometimes")), &mut vec![]).is_err());
    assert!(tool_choice(Some(json!({"type": "file_search"})), &mut vec![]).is_err());
}

#[test]
fn prompt_errors_name_the_item() {
    let origins = vec![
        "instructions".to_string(),
        "input[0]".into(),
        "input[3]".into(),
    ];
    let e = rename_param(ApiError::invalid_param("input[2]", "x"), &origins);
    assert_eq!(e.param.as_deref(), Some("input[3]"));
    let e = rename_param(ApiError::invalid_param("max_tokens", "x"), &origins);
    assert_eq!(e.param.as_deref(), Some("max_output_tokens"));
}

#[test]
fn streamed_items_follow_the_official_order() {
    let mut items = Items::default();
    items.feed(OutputEvent::Reasoning("hm".into()));
    items.feed(OutputEvent::Text("\n\n".into()));
    items.feed(OutputEvent::Text("Hi".into()));
    items.feed(OutputEvent::CallStart {
        index: 0,
        id: "call_1".into(),
        name: "f".into(),
    });
    items.feed(OutputEvent::CallArgs {
        index: 0,
        fragment: "{\"a\":".into(),
    });
    items.feed(OutputEvent::CallArgs {
        index: 0,
        fragment: "1}".into(),
    });
    items.feed(OutputEvent::CallEnd { index: 0 });
    items.finish(false);
    assert_eq!(items.done.len(), 3);
    assert_eq!(items.done[1]["content"][0]["text"], "\n\nHi");
    assert_eq!(items.done[2]["arguments"], "{\"a\":1}");
    assert_eq!(items.done[2]["call_id"], "call_1");
    assert_eq!(items.seq as usize, items.events.len());
}
