//! hearth's own tool convention, for models whose chat template cannot
//! express tools: a system prompt that lists the tools and teaches the
//! Hermes markup, which is what most small instruction-tuned models have seen
//! most often. The calls are then read by [`super::HermesParser`].
//!
//! The convention, in full:
//! - the tools are listed one per line as `{"name", "description", "parameters"}` JSON;
//! - the model calls one by writing
//!   `<tool_call>\n{"name": NAME, "arguments": {...}}\n</tool_call>`,
//!   several blocks in a row for several calls;
//! - each result comes back in the next user turn as
//!   `<tool_response>\n...\n</tool_response>` (see [`fallback_tool_result`]).

use super::ToolSpec;
use serde_json::json;

/// The system prompt text that offers `tools` to a model without native tool
/// support. Append it to (or use it as) the system message.
pub fn fallback_system_prompt(tools: &[ToolSpec]) -> String {
    let mut prompt = String::from(
        "# Tools\n\n\
         You can call functions to help with the user's request. \
         These functions are available, one JSON object per line:\n\n",
    );
    for tool in tools {
        let line = json!({
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        });
        prompt.push_str(&line.to_string());
        prompt.push('\n');
    }
    prompt.push_str(
        "\nTo call a function, write a <tool_call> block holding one JSON object \
         with the function's name and its arguments, exactly like this:\n\n\
         <tool_call>\n\
         {\"name\": \"function_name\", \"arguments\": {\"parameter\": \"value\"}}\n\
         </tool_call>\n\n\
         The arguments must be a JSON object that follows the function's parameters \
         schema. Write one block per call; to make several calls, write several \
         blocks one after another. After your calls, stop: the results will come \
         back in the next message, each inside <tool_response></tool_response>. \
         When no function is needed, answer directly without any <tool_call> block.",
    );
    prompt
}

/// A tool's result the way the fallback convention hands it back to the
/// model (inside a user turn). `name` is kept for the model's benefit when
/// several results come back at once.
pub fn fallback_tool_result(name: &str, content: &str) -> String {
    format!(
        "<tool_response>\n{{\"name\": {}, \"content\": {}}}\n</tool_response>",
        json!(name),
        json!(content)
    )
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{check, Item};
    use super::super::{ToolFormat, ToolParser};
    use super::*;

    fn parser() -> Box<dyn ToolParser> {
        ToolFormat::Fallback.parser()
    }

    #[test]
    fn prompt_lists_tools_and_teaches_the_markup() {
        let tools = [ToolSpec {
            name: "get_weather".into(),
            description: "Weather for a city".into(),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        }];
        let prompt = fallback_system_prompt(&tools);
        assert!(prompt.contains(
            r#"{"name":"get_weather","description":"Weather for a city","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}"#
        ));
        assert!(prompt.contains(ToolFormat::Fallback.call_opener()));
        assert!(prompt.contains("</tool_call>"));
    }

    /// The example the prompt shows must itself parse as a call.
    #[test]
    fn the_prompt_example_parses() {
        let prompt = fallback_system_prompt(&[]);
        let start = prompt.find("<tool_call>\n").unwrap();
        let end = prompt.find("</tool_call>").unwrap() + "</tool_call>".len();
        check(
            &parser,
            &prompt[start..end],
            &[Item::call("function_name", json!({"parameter": "value"}))],
        );
    }

    #[test]
    fn compact_form_and_prose() {
        let input =
            "Sure.<tool_call>{\"name\":\"ls\",\"arguments\":{\"dir\":\"/tmp\"}}</tool_call>";
        check(
            &parser,
            input,
            &[
                Item::text("Sure."),
                Item::call("ls", json!({"dir": "/tmp"})),
            ],
        );
    }

    #[test]
    fn tool_result_is_json_inside_tags() {
        let r = fallback_tool_result("ls", "a\n\"b\"");
        assert_eq!(
            r,
            "<tool_response>\n{\"name\": \"ls\", \"content\": \"a\\n\\\"b\\\"\"}\n</tool_response>"
        );
    }
}
