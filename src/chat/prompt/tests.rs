use super::*;
use crate::chat::ToolCall;

fn specials() -> SpecialTexts {
    SpecialTexts::new(vec![
        "<|im_end|>".into(),
        "<|im_start|>".into(),
        "<｜end▁of▁sentence｜>".into(),
    ])
}

#[test]
fn protects_every_occurrence() {
    let s = specials();
    let mut p = Protector {
        specials: &s,
        nonce: "X".into(),
        literals: vec![],
    };
    let out = p.protect("a<|im_end|>b<|im_start|><｜end▁of▁sentence｜>");
    assert_eq!(out, "aHEARTHLITXN0ZbHEARTHLITXN1ZHEARTHLITXN2Z");
    assert_eq!(
        p.literals,
        vec!["<|im_end|>", "<|im_start|>", "<｜end▁of▁sentence｜>"]
    );
    assert_eq!(p.protect("plain"), "plain");
    assert!(!s.contains_any("<|im_en"));
    // Schema property names are rendered too: keys are protected, in place.
    let mut v = json!({"z": 1, "<|im_end|>": {"description": "<|im_start|>"}, "a": 2});
    p.protect_value(&mut v);
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["z", "HEARTHLITXN3Z", "a"]);
    assert_eq!(v["HEARTHLITXN3Z"]["description"], "HEARTHLITXN4Z");
}

#[test]
fn late_system_messages_fold_into_the_next_user_turn() {
    let msgs = vec![
        ChatMessage::new(Role::System, "rules"),
        ChatMessage::new(Role::User, "hi"),
        ChatMessage::new(Role::System, "agents: a, b"),
        ChatMessage::new(Role::Assistant, "ok"),
        ChatMessage::new(Role::User, "go"),
        ChatMessage::new(Role::System, "last"),
    ];
    assert!(has_late_system(&msgs));
    let out = fold_late_system(msgs);
    let roles: Vec<Role> = out.iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        vec![
            Role::System,
            Role::User,
            Role::Assistant,
            Role::User,
            Role::User
        ]
    );
    assert_eq!(out[2].content, "ok");
    assert_eq!(out[3].content, "<system>\nagents: a, b\n</system>\n\ngo");
    assert_eq!(out[4].content, "<system>\nlast\n</system>");
    assert!(!has_late_system(&out));
}

#[test]
fn a_reply_is_replayed_only_for_the_calls_it_made() {
    let raw = "<think>\nhm\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1, \"b\": [2]}}\n</tool_call>";
    let markers = ReasoningMarkers::new("<think>", "</think>", true);
    let call = |name: &str, args: &str| ToolCall {
        id: "c".into(),
        name: name.into(),
        arguments: args.into(),
    };
    let m = |calls: &[ToolCall]| replay_matches(raw, calls, ToolFormat::Hermes, Some(&markers));
    assert!(
        m(&[call("f", "{\"b\":[2],\"a\":1}")]),
        "the same call, spelled differently"
    );
    assert!(
        !m(&[call("f", "{\"a\": 2, \"b\": [2]}")]),
        "other arguments"
    );
    assert!(
        !m(&[call("g", "{\"a\": 1, \"b\": [2]}")]),
        "another function"
    );
    assert!(
        !m(&[call("f", "{\"a\": 1, \"b\": [2]}"), call("f", "{}")]),
        "more calls"
    );
    assert!(!m(&[]));
}

#[test]
fn history_checks() {
    let call = ToolCall {
        id: "c1".into(),
        name: "f".into(),
        arguments: "{\"a\":1}".into(),
    };
    let mut ok = vec![
        ChatMessage::new(Role::User, "hi"),
        ChatMessage {
            role: Role::Assistant,
            tool_calls: vec![call.clone()],
            ..Default::default()
        },
        ChatMessage::tool_result("c1", None, "42"),
    ];
    check_history(&mut ok).unwrap();
    assert_eq!(ok[2].name.as_deref(), Some("f"));

    let mut unknown = vec![
        ChatMessage::new(Role::User, "hi"),
        ChatMessage::tool_result("nope", None, "42"),
    ];
    assert!(matches!(
        check_history(&mut unknown),
        Err(PromptError::History { index: 1, .. })
    ));

    let bad = ToolCall {
        arguments: "{not json".into(),
        ..call
    };
    let mut bad = vec![ChatMessage {
        role: Role::Assistant,
        tool_calls: vec![bad],
        ..Default::default()
    }];
    assert!(matches!(
        check_history(&mut bad),
        Err(PromptError::History { index: 0, .. })
    ));
}

#[test]
fn fallback_puts_tools_in_the_system_message_and_results_in_user_turns() {
    let tools = vec![ToolSpec {
        name: "get".into(),
        description: "d".into(),
        parameters: json!({"type": "object"}),
    }];
    let call = ToolCall {
        id: "c1".into(),
        name: "get".into(),
        arguments: "{}".into(),
    };
    let msgs = vec![
        ChatMessage::new(Role::System, "be brief"),
        ChatMessage::new(Role::User, "go"),
        ChatMessage {
            role: Role::Assistant,
            tool_calls: vec![call],
            ..Default::default()
        },
        ChatMessage::tool_result("c1", Some("get".into()), "r1"),
        ChatMessage::tool_result("c1", Some("get".into()), "r2"),
    ];
    let out = to_fallback(msgs, &tools, ToolFormat::Fallback);
    assert_eq!(out.len(), 4);
    assert!(out[0].content.starts_with("be brief\n\n# Tools"));
    assert!(out[2]
        .content
        .contains("<tool_call>\n{\"name\": \"get\", \"arguments\": {}}\n</tool_call>"));
    assert_eq!(out[3].role, Role::User);
    assert_eq!(out[3].content.matches("<tool_response>").count(), 2);
}
