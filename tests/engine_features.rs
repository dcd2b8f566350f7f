//! The engine's grammar, logprobs and reasoning-budget support against the
//! real default model, through the library API (no server). The model is
//! `HEARTH_MODEL`, or the default model under `$HEARTH_HOME` or
//! `~/.cache/hearth` (`scripts/setup.sh` fetches it); without one the tests
//! fail, as the other model-backed suites do, rather than pass unrun.
//!
//! Kept cheap: short prompts, a few dozen tokens each, greedy sampling.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use hearth::engine::grammar::{self, GrammarError};
use hearth::engine::{
    self, EngineConfig, EngineHandle, Event, FinishReason, GenerateRequest, Grammar, Model,
    ReasoningBudget, SamplingParams, TokenLogprob,
};

fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("HEARTH_MODEL")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
    {
        return p;
    }
    let path = common::default_model();
    assert!(
        path.is_file(),
        "no model at {} (set HEARTH_MODEL or run scripts/setup.sh)",
        path.display()
    );
    path
}

/// One engine for every test in this file (`--parallel 1`: jobs run one at
/// a time).
fn engine() -> &'static EngineHandle {
    static ENGINE: OnceLock<EngineHandle> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let path = model_path();
        let model = Model::load(&path, 0).expect("load the model");
        let config = EngineConfig {
            n_ctx: 1024,
            n_parallel: 1,
            spec: None,
            draft_model: None,
            kv_size: 0,
            n_batch: 256,
            threads: Default::default(),
            n_gpu_layers: 0,
            fault: None,
            cache_ram_bytes: 0,
            kv_disk_dir: None,
            kv_disk_bytes: 0,
            ctx_checkpoints: 0,
            swa_full: false,
            flash_attn: Default::default(),
            turn_marker: Vec::new(),
        };
        engine::start(model, config).expect("start the engine")
    })
}

fn model() -> &'static Arc<Model> {
    engine().model()
}

/// A one-turn chat prompt (ChatML when the model's template uses it).
fn chat(user: &str) -> Vec<i32> {
    let m = model();
    let chatml = m
        .chat_template()
        .is_some_and(|t| t.contains("<|im_start|>"));
    let text = if chatml {
        format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    } else {
        format!("User: {user}\nAssistant:")
    };
    m.tokenize(&text, m.adds_bos(), true)
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ..Default::default()
    }
}

struct Run {
    text: String,
    /// Every event's kind in order: 'L' logprobs, 'T' text.
    order: String,
    logprobs: Vec<TokenLogprob>,
    reason: FinishReason,
    completion_tokens: u32,
}

fn run(req: GenerateRequest) -> Run {
    let mut job = engine().submit(req);
    let mut r = Run {
        text: String::new(),
        order: String::new(),
        logprobs: vec![],
        reason: FinishReason::MaxTokens,
        completion_tokens: 0,
    };
    while let Some(ev) = job.events.blocking_recv() {
        match ev {
            Event::Text(t) => {
                r.order.push('T');
                r.text.push_str(&t);
            }
            Event::Logprobs(l) => {
                r.order.push('L');
                r.logprobs.extend(l);
            }
            Event::Finished { reason, usage, .. } => {
                r.reason = reason;
                r.completion_tokens = usage.completion_tokens;
                return r;
            }
            Event::Failed(e) => panic!("job failed: {e}"),
            _ => {}
        }
    }
    panic!("the engine dropped the job");
}

#[test]
fn json_schema_grammar_gives_json_and_ends_the_turn() {
    let schema = serde_json::json!({"type":"object","properties":{"city":{"type":"string"}},"required":["city"]});
    let gbnf = grammar::json_schema_to_grammar(&schema).unwrap();
    let g = Grammar {
        gbnf,
        triggers: vec![],
    };
    grammar::validate(model(), &g).unwrap();
    let mut req = GenerateRequest::new(
        chat("What is the capital of France? Answer in JSON."),
        greedy(),
        48,
    );
    req.grammar = Some(g);
    let r = run(req);
    assert_eq!(r.reason, FinishReason::EndOfTurn, "text: {:?}", r.text);
    let v: serde_json::Value =
        serde_json::from_str(&r.text).unwrap_or_else(|e| panic!("{e}: {:?}", r.text));
    assert!(v["city"].is_string(), "{v}");
}

#[test]
fn a_lazy_grammar_leaves_text_before_its_trigger_alone() {
    let prompt = chat("Write one short sentence about cats.");
    let free = run(GenerateRequest::new(prompt.clone(), greedy(), 24));
    let mut req = GenerateRequest::new(prompt, greedy(), 24);
    req.grammar = Some(Grammar {
        gbnf: r#"root ::= "<tool_call>" [a-z]+ "</tool_call>""#.into(),
        triggers: vec!["<tool_call>".into()],
    });
    let lazy = run(req);
    assert!(!lazy.text.is_empty());
    assert!(!lazy.text.contains("<tool_call>"));
    assert_eq!(
        lazy.text, free.text,
        "an untriggered lazy grammar must not change greedy output"
    );
    assert_eq!(lazy.reason, free.reason);
}

#[test]
fn a_forced_trigger_switches_a_lazy_grammar_on() {
    // The reasoning budget writes the trigger itself after 3 tokens; from
    // there the grammar holds and, once complete, lets the turn end.
    let mut req = GenerateRequest::new(chat("Tell me a long story about a dragon."), greedy(), 40);
    req.grammar = Some(Grammar {
        gbnf: r#"root ::= "<tool_call>" "{\"n\": " [0-9] "}""#.into(),
        triggers: vec!["<tool_call>".into()],
    });
    req.reasoning_budget = Some(ReasoningBudget {
        max_tokens: 3,
        close: "<tool_call>".into(),
    });
    let r = run(req);
    let (_, after) = r
        .text
        .split_once("<tool_call>")
        .unwrap_or_else(|| panic!("no trigger in {:?}", r.text));
    assert!(
        after.starts_with("{\"n\": ") && after.len() == 8 && after.ends_with('}'),
        "after the trigger: {after:?}"
    );
    assert_eq!(r.reason, FinishReason::EndOfTurn);
}

#[test]
fn logprobs_cover_the_text_in_order() {
    let mut req = GenerateRequest::new(chat("Name three colors."), greedy(), 16);
    req.logprobs = Some(3);
    let r = run(req);
    assert!(!r.logprobs.is_empty());
    // Each Logprobs event comes just before a Text event.
    assert!(
        r.order.starts_with('L') && !r.order.contains("LL"),
        "{}",
        r.order
    );
    let bytes: Vec<u8> = r.logprobs.iter().flat_map(|l| l.bytes.clone()).collect();
    assert_eq!(String::from_utf8_lossy(&bytes), r.text);
    let eot = usize::from(r.reason == FinishReason::EndOfTurn);
    assert_eq!(r.logprobs.len() + eot, r.completion_tokens as usize);
    for l in &r.logprobs {
        assert_eq!(l.top.len(), 3);
        assert!(l.logprob <= 0.0 && l.logprob.is_finite(), "{l:?}");
        assert!(
            l.top.windows(2).all(|w| w[0].logprob >= w[1].logprob),
            "{l:?}"
        );
        // Greedy picks the most likely token.
        assert_eq!(
            (&l.bytes, l.logprob),
            (&l.top[0].bytes, l.top[0].logprob),
            "{l:?}"
        );
    }
    // None: no Logprobs events at all.
    let plain = run(GenerateRequest::new(
        chat("Name three colors."),
        greedy(),
        16,
    ));
    assert!(!plain.order.contains('L'));
    assert_eq!(plain.text, r.text);
}

#[test]
fn a_reasoning_budget_closes_the_reasoning() {
    let close_tokens = model().tokenize("</think>", false, true).len();
    let mut req = GenerateRequest::new(
        chat("Tell me a long story about a dragon."),
        greedy(),
        5 + close_tokens as u32 + 4,
    );
    req.reasoning_budget = Some(ReasoningBudget {
        max_tokens: 5,
        close: "</think>".into(),
    });
    req.logprobs = Some(0);
    let r = run(req);
    assert!(r.text.contains("</think>"), "{:?}", r.text);
    let text_of = |ls: &[TokenLogprob]| {
        String::from_utf8_lossy(&ls.iter().flat_map(|l| l.bytes.clone()).collect::<Vec<_>>())
            .into_owned()
    };
    assert!(!text_of(&r.logprobs[..5]).contains("</think>"));
    assert_eq!(text_of(&r.logprobs[5..5 + close_tokens]), "</think>");
    assert!(
        r.logprobs.len() > 5 + close_tokens,
        "generation goes on after the close"
    );
    assert!(r.logprobs.iter().all(|l| l.top.is_empty()));

    // A zero budget closes before the first sampled token.
    let mut req = GenerateRequest::new(chat("Hi"), greedy(), close_tokens as u32 + 2);
    req.reasoning_budget = Some(ReasoningBudget {
        max_tokens: 0,
        close: "</think>".into(),
    });
    let r = run(req);
    assert!(r.text.starts_with("</think>"), "{:?}", r.text);
}

#[test]
fn bad_grammars_are_refused_with_a_reason() {
    let m = model();
    assert_eq!(
        grammar::validate(
            m,
            &Grammar {
                gbnf: r#"root ::= "a" | "b""#.into(),
                triggers: vec![]
            }
        ),
        Ok(())
    );
    let err = grammar::validate(
        m,
        &Grammar {
            gbnf: r#"root ::= ("a""#.into(),
            triggers: vec![],
        },
    )
    .unwrap_err();
    assert!(matches!(err, GrammarError::Grammar(_)), "{err}");
    let err = grammar::validate(
        m,
        &Grammar {
            gbnf: r#"start ::= "a""#.into(),
            triggers: vec![],
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("root"), "{err}");
    let err = grammar::validate(
        m,
        &Grammar {
            gbnf: r#"root ::= "a""#.into(),
            triggers: vec![String::new()],
        },
    )
    .unwrap_err();
    assert!(matches!(err, GrammarError::Trigger(_)), "{err}");
    // From another thread too.
    let m2 = m.clone();
    std::thread::spawn(move || {
        grammar::validate(
            &m2,
            &Grammar {
                gbnf: "root ::= [a-z]+".into(),
                triggers: vec!["[x]".into()],
            },
        )
        .unwrap()
    })
    .join()
    .unwrap();
}

#[test]
fn a_dsml_grammar_gives_calls_the_dsml_parser_reads() {
    use hearth::chat::grammar as chat_grammar;
    use hearth::chat::output::{OutputParser, OutputSpec};
    use hearth::chat::tools::{ToolFormat, ToolSpec};
    let weather = ToolSpec {
        name: "get_weather".into(),
        description: "Weather for a city.".into(),
        parameters: serde_json::json!({
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "detail": {"$ref": "#/$defs/detail"},
            },
            "required": ["city", "days", "unit"],
            "$defs": {"detail": {"type": "object", "properties": {"hourly": {"type": "boolean"}}, "required": ["hourly"]}},
        }),
    };
    let free = ToolSpec {
        name: "note".into(),
        description: String::new(),
        parameters: serde_json::json!({"type": "object"}),
    };
    // Raw-text values (a plain string property, a schema without
    // properties) make valid grammars too; they are not run here, as
    // SmolLM2, which never saw DSML, fills raw text with look-alike markup
    // until max_tokens.
    let mut note = free.clone();
    note.parameters = serde_json::json!({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]});
    // Parallel calls too: SmolLM2 made to call repeats its call until
    // max_tokens, so only the single-call grammar is run.
    let gbnf =
        chat_grammar::tool_calls(ToolFormat::DeepSeekV4Dsml, &[&weather, &free, &note], true)
            .unwrap()
            .unwrap();
    grammar::validate(
        model(),
        &Grammar {
            gbnf,
            triggers: vec![],
        },
    )
    .unwrap();
    let gbnf = chat_grammar::tool_calls(ToolFormat::DeepSeekV4Dsml, &[&weather], false)
        .unwrap()
        .unwrap();
    let g = Grammar {
        gbnf,
        triggers: vec![],
    };
    grammar::validate(model(), &g).unwrap_or_else(|e| panic!("{e}\n{}", g.gbnf));
    let mut req = GenerateRequest::new(
        chat("What is the weather in Paris for the next 3 days?"),
        greedy(),
        512,
    );
    req.grammar = Some(g);
    let r = run(req);
    assert_eq!(r.reason, FinishReason::EndOfTurn, "text: {:?}", r.text);
    assert!(
        r.text
            .starts_with("<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\""),
        "{:?}",
        r.text
    );
    let spec = OutputSpec {
        tools: Some(ToolFormat::DeepSeekV4Dsml),
        ..Default::default()
    };
    let mut parser = OutputParser::new(&spec, "call_");
    parser.push(&r.text);
    parser.finish();
    let out = parser.into_output();
    assert!(
        !out.calls.is_empty() && out.text.trim().is_empty(),
        "{:?} from {:?}",
        out,
        r.text
    );
    assert_eq!(out.calls.len(), 1, "{:?}", r.text);
    for call in &out.calls {
        let args: serde_json::Value = serde_json::from_str(&call.arguments)
            .unwrap_or_else(|e| panic!("{e}: {:?}", call.arguments));
        assert_eq!(call.name, "get_weather");
        assert!(
            ["Paris", "London", "Tokyo"].contains(&args["city"].as_str().unwrap_or("")),
            "{args}"
        );
        let days = args["days"].as_i64().unwrap_or_else(|| panic!("{args}"));
        assert!((1..=7).contains(&days), "{args}");
        assert!(
            ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap_or("")),
            "{args}"
        );
        if let Some(d) = args.get("detail") {
            assert!(d["hourly"].is_boolean(), "{args}");
        }
    }
}
