use super::*;
use crate::chat::Role::{self, Assistant, System, User};

// Expected texts below are what Python's jinja2 3.1 renders for the same
// template and messages in transformers' environment.
const SMOLLM2: &str = include_str!("../../../tests/fixtures/templates/smollm2.jinja");
const LLAMA3: &str = include_str!("../../../tests/fixtures/templates/llama3.jinja");
const GEMMA: &str = include_str!("../../../tests/fixtures/templates/gemma.jinja");
const PYCOMPAT: &str = include_str!("../../../tests/fixtures/templates/pycompat.jinja");

fn msgs(list: &[(Role, &str)]) -> Vec<ChatMessage> {
    list.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect()
}

fn render(t: &ChatTemplate, list: &[(Role, &str)], agp: bool) -> String {
    t.render(&msgs(list), agp).unwrap()
}

#[test]
fn smollm2_chatml_and_its_default_system_prompt() {
    // The template as stored in SmolLM2-135M-Instruct's GGUF.
    let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
    assert_eq!(
        render(&t, &[(System, "You are terse."), (User, "What is 2+2?")], true),
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        render(&t, &[(User, "Hi")], true),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // Content is not stripped; no generation prompt, no trailing opener.
    assert_eq!(
        render(&t, &[(User, " Hi \n"), (Assistant, "Hello!")], false),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\n Hi \n<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    );
    // The default system prompt hangs on loop.first: no messages, none.
    assert_eq!(render(&t, &[], true), "<|im_start|>assistant\n");
}

#[test]
fn llama3_style_strip_namespace_slices_and_raise() {
    let t = ChatTemplate::new(LLAMA3, "<|begin_of_text|>", "<|eot_id|>").unwrap();
    assert_eq!(
        render(
            &t,
            &[
                (System, "  Be brief. \n"),
                (User, " Hi \n"),
                (Assistant, "Hello."),
                (User, "Bye")
            ],
            true
        ),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    assert_eq!(
        render(&t, &[(User, "Hi")], false),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    );
    let err = t
        .render(&msgs(&[(User, "Hi"), (System, "late")]), true)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "chat template failed: Unexpected role: system"
    );
}

#[test]
fn gemma_style_trim_and_lstrip_blocks_and_alternation() {
    let t = ChatTemplate::new(GEMMA, "<bos>", "<eos>").unwrap();
    assert_eq!(
        render(&t, &[(System, " Be kind. "), (User, "Hi "), (Assistant, " Hello."), (User, "Bye")], true),
        "<bos><start_of_turn>user\nBe kind.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
         <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    );
    assert_eq!(
        render(&t, &[(User, "Hi")], false),
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
    );
    let err = t
        .render(&msgs(&[(User, "Hi"), (User, "again")]), true)
        .unwrap_err();
    assert!(
        matches!(&err, TemplateError::Render(m) if m == "Conversation roles must alternate user/assistant/user/assistant/..."),
        "{err}"
    );
}

#[test]
fn python_methods_filters_tojson_and_python_output() {
    let t = ChatTemplate::new(PYCOMPAT, "", "").unwrap();
    let list = [
        (System, "be very brief."),
        (User, "/help me now"),
        (Assistant, "Sure!"),
        (User, "thanks a lot"),
    ];
    assert_eq!(
        render(&t, &list, true),
        "commands=1 words=10 last=USER\na=1\nb=[true, null, \"é\\\"\"]\nc={}\n\
         get=default {\n  \"a\": 1,\n  \"b\": [\n    true,\n    null,\n    \"é\\\"\"\n  ],\n  \"c\": {}\n}\n\
         /help me now|thanks a lot\nBe_Very_Brief. x True\
         [system:be very brief],[user:/help me now],[assistant:Sure],[user:thanks a lot]"
    );
}

#[test]
fn tojson_arguments_follow_json_dumps() {
    let t = ChatTemplate::new(
        "{{ {'b': 'é😀<', 'a': [1, 2.5]} | tojson(sort_keys=true, ensure_ascii=true) }}|\
         {{ [1, {'k': none}] | tojson(separators=(',', ':')) }}|{{ {'k': []} | tojson(indent='\\t') }}",
        "",
        "",
    )
    .unwrap();
    assert_eq!(
        t.render(&[], false).unwrap(),
        "{\"a\": [1, 2.5], \"b\": \"\\u00e9\\ud83d\\ude00<\"}|[1,{\"k\":null}]|{\n\t\"k\": []\n}"
    );
}

#[test]
fn errors_say_what_went_wrong() {
    let t = ChatTemplate::new(
        "{{ raise_exception('No ' ~ messages[0].role ~ ' here') }}",
        "",
        "",
    )
    .unwrap();
    let err = t.render(&msgs(&[(Assistant, "x")]), true).unwrap_err();
    assert!(
        matches!(&err, TemplateError::Render(m) if m == "No assistant here"),
        "{err}"
    );
    let err = ChatTemplate::new("{% for m in messages %}\n{{ m.content }", "", "")
        .err()
        .unwrap();
    assert!(
        matches!(&err, TemplateError::Syntax(m) if m.ends_with("(line 2)")),
        "{err}"
    );
    let err = ChatTemplate::new("{{ messages.x.y }}", "", "")
        .unwrap()
        .render(&[], false)
        .unwrap_err();
    assert!(
        matches!(&err, TemplateError::Render(m) if m.starts_with("undefined value")),
        "{err}"
    );
}

#[test]
fn source_is_read_as_jinja2_reads_it() {
    // Line continuation in a string literal (Mistral Small 3.x), CRLF, and
    // transformers' generation tag with whitespace control.
    let src = "{% set s = 'a.\\\nb' %}{{ s }}\r\n{% for m in messages %}{%- generation -%}\r\n[{{ m.content }}]\n{%- endgeneration %}{% endfor %}\
               {# it's {{ #}{% raw %}{{ 'x\\\n' }}{% endraw %}";
    let t = ChatTemplate::new(src, "", "").unwrap();
    assert_eq!(
        render(&t, &[(User, "a"), (Assistant, "b")], false),
        "a.b\n[a][b]{{ 'x\\\n' }}"
    );
    assert_eq!(t.source(), src);
    // Python's tests: none is not iterable; strings and dicts are sequences.
    let t = ChatTemplate::new(
        "{{ tools is iterable and tools | length }} {{ 'ab' is sequence }} {{ {} is sequence }}",
        "",
        "",
    );
    assert_eq!(t.unwrap().render(&[], false).unwrap(), "False True True");
}

#[test]
fn strftime_formats_dates() {
    // 2024-07-26 13:25:09, a Friday.
    assert_eq!(
        strftime(1_722_000_309, "%d %b %Y %H:%M:%S %A"),
        "26 Jul 2024 13:25:09 Friday"
    );
    assert_eq!(
        strftime(1_722_000_309, "%-d %B %y, %I:%M %p %e %q"),
        "26 July 24, 01:25 PM 26 %q"
    );
    assert_eq!(strftime(0, "%Y-%m-%d %a %%"), "1970-01-01 Thu %");
    assert_eq!(strftime(-1, "%Y-%m-%d %H:%M:%S"), "1969-12-31 23:59:59");
    let t = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}", "", "").unwrap();
    let today = t.render(&[], false).unwrap();
    assert!(today.len() == 10 && today.starts_with("20"), "{today}");
}

#[test]
fn fallback_format() {
    let t = ChatTemplate::fallback("<s>", "</s>");
    assert!(t.is_fallback());
    let list = [
        (System, "Be kind."),
        (User, "Hi"),
        (Assistant, " Hello.\n"),
        (User, "Bye"),
    ];
    assert_eq!(
        render(&t, &list, true),
        "Be kind.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Bye\n\nAssistant:",
        "a reply cut at the stop renders to what the model wrote: \" Hello.\\n\\nUser:\""
    );
    assert_eq!(
        render(&t, &[(System, ""), (User, "Hi"), (Assistant, "Yo")], false),
        "User: Hi\n\nAssistant: Yo\n\n"
    );
    assert_eq!(
        render(&t, &[(User, "Hi"), (Assistant, "\n\nYo\n")], false),
        "User: Hi\n\nAssistant:\n\nYo\n\n",
        "a reply that starts on a new line keeps it"
    );
    assert_eq!(t.fallback_stops(), ["\nUser:"]);
    let real = ChatTemplate::new(SMOLLM2, "", "").unwrap();
    assert!(!real.is_fallback() && real.fallback_stops().is_empty());
}

#[test]
fn shareable_across_handlers() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<ChatTemplate>();
}
