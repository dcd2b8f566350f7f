//! The sampling fields every generation route takes, and the fields no
//! route may ignore.
//!
//! Each route's request struct flattens [`SamplingFields`] in: the
//! OpenAI sampling fields beyond `temperature` and `top_p` (`logit_bias`,
//! `frequency_penalty`, `presence_penalty`, `seed`) and llama-server's
//! (`top_k`, `min_p`, `typical_p`, `repeat_penalty`, `repeat_last_n`,
//! `ignore_eos`), parsed and validated here once, so they mean the same on
//! every route. Whatever field the route does not name lands in
//! [`SamplingFields::rest`]; the ones that would change the output if
//! honoured (llama-server's other samplers, the route's own unsupported
//! features) are refused with a 400 naming them, unless they carry the
//! value that turns them off. Other unknown fields (`user`, `metadata`,
//! ...) ask for nothing that changes the output and are ignored.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::check_range;
use super::error::ApiError;
use crate::engine::sampling::DEFAULT_REPEAT_LAST_N;
use crate::engine::{SamplingParams, Token};

/// Sampling fields shared by every generation route.
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub typical_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<i64>,
    /// `{"token id": bias}`, checked by [`logit_bias`].
    #[serde(default)]
    pub logit_bias: Option<Value>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub repeat_penalty: Option<f32>,
    #[serde(default)]
    pub repeat_last_n: Option<i64>,
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Every field neither the route nor this struct names.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// A field hearth does not implement and will not ignore. `off` is the
/// JSON value that asks for nothing (accepted, as `null` always is).
pub struct Refused {
    pub name: &'static str,
    pub off: Option<&'static str>,
    pub why: &'static str,
}

const fn refused(name: &'static str, off: Option<&'static str>, why: &'static str) -> Refused {
    Refused { name, off, why }
}

/// llama-server's sampling options that hearth does not run, refused on
/// every route. (Their tuning knobs alone, `dry_base`, `xtc_threshold`,
/// `mirostat_tau` and the like, change nothing while the sampler is off
/// and are ignored.)
pub const LLAMA_SERVER_REFUSED: &[Refused] = &[
    refused("dry_multiplier", Some("0"), "the DRY sampler is not available on this server"),
    refused("xtc_probability", Some("0"), "the XTC sampler is not available on this server"),
    refused("mirostat", Some("0"), "mirostat sampling is not available on this server"),
    refused("top_n_sigma", Some("-1"), "top-n-sigma sampling is not available on this server"),
    refused("dynatemp_range", Some("0"), "dynamic temperature is not available on this server"),
    refused("min_keep", Some("0"), "min_keep is not available on this server"),
    refused("samplers", None, "a custom sampler order is not available on this server"),
    refused("n_probs", Some("0"), "n_probs is not available on this server; use the route's logprobs fields"),
    refused("post_sampling_probs", Some("false"), "post_sampling_probs is not available on this server; logprobs are reported after bias and penalties"),
    refused("grammar", Some("\"\""), "raw GBNF grammars are not taken by this server; use response_format or tools"),
    refused("json_schema", None, "llama-server's json_schema field is not taken by this server; use the route's structured-output field"),
    refused("n_predict", Some("-1"), "n_predict is llama-server's name; use the route's max_tokens field"),
    refused("t_max_predict_ms", Some("0"), "t_max_predict_ms is not available on this server"),
    refused("n_indent", Some("0"), "n_indent is not available on this server"),
    refused("lora", Some("[]"), "LoRA adapters are not available on this server"),
];

/// Chat completions' own fields that hearth does not implement.
pub const CHAT_REFUSED: &[Refused] = &[
    refused(
        "functions",
        Some("[]"),
        "the legacy functions field is not supported; use tools",
    ),
    refused(
        "function_call",
        None,
        "the legacy function_call field is not supported; use tool_choice",
    ),
    refused(
        "audio",
        None,
        "audio output is not available on this server",
    ),
    refused(
        "modalities",
        Some("[\"text\"]"),
        "only text output is available on this server",
    ),
    refused(
        "web_search_options",
        None,
        "web search is not available on this server",
    ),
];

/// Legacy completions' own fields that hearth does not implement (`suffix`
/// and `best_of` are checked by the route itself).
pub const COMPLETIONS_REFUSED: &[Refused] = &[];

/// Responses' own fields that hearth does not implement (`background`,
/// `conversation`, `prompt`, `top_logprobs` are checked by the route).
pub const RESPONSES_REFUSED: &[Refused] = &[];

/// Anthropic Messages' own fields that hearth does not implement.
pub const MESSAGES_REFUSED: &[Refused] = &[
    refused(
        "mcp_servers",
        Some("[]"),
        "MCP servers are not available on this server; define the tools in tools",
    ),
    refused(
        "container",
        None,
        "code execution containers are not available on this server",
    ),
];

/// Whether `value` asks for nothing: null, or the field's off value
/// (numbers compared as numbers, so `0` and `0.0` are both off).
fn is_off(value: &Value, off: Option<&str>) -> bool {
    if value.is_null() {
        return true;
    }
    let Some(off) = off.and_then(|o| serde_json::from_str::<Value>(o).ok()) else {
        return false;
    };
    match (&off, value) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        _ => &off == value,
    }
}

/// The first refused field `rest` sets, as a 400 naming it.
pub fn check_refused(rest: &Map<String, Value>, route: &[Refused]) -> Result<(), ApiError> {
    for r in LLAMA_SERVER_REFUSED.iter().chain(route) {
        if rest.get(r.name).is_some_and(|v| !is_off(v, r.off)) {
            let off = r
                .off
                .map_or(String::new(), |o| format!(" (send {o} or leave it out)"));
            return Err(ApiError::invalid_param(
                r.name,
                format!("{}: {}{off}", r.name, r.why),
            ));
        }
    }
    Ok(())
}

/// Largest bias, either way, as in the official API.
pub const MAX_BIAS: f32 = 100.0;

/// OpenAI's `logit_bias`: an object from token ids (as strings) to a bias
/// in -100..=100. Ids are checked against the vocabulary by
/// [`check_vocab`], once the model is at hand.
pub fn logit_bias(value: Option<Value>) -> Result<Vec<(Token, f32)>, ApiError> {
    let map = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "logit_bias",
                "logit_bias must be an object mapping token ids to a bias between -100 and 100",
            ))
        }
    };
    let mut out = Vec::with_capacity(map.len());
    for (key, v) in map {
        let token = key
            .trim()
            .parse::<Token>()
            .ok()
            .filter(|t| *t >= 0)
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "logit_bias",
                    format!(
                        "logit_bias keys must be token ids (non-negative integers), got {key:?}"
                    ),
                )
            })?;
        let bias = v
            .as_f64()
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "logit_bias",
                    format!("logit_bias[{key:?}] must be a number between -100 and 100, got {v}"),
                )
            })
            .and_then(|b| check_range("logit_bias", b as f32, -MAX_BIAS, MAX_BIAS))?;
        out.push((token, bias));
    }
    Ok(out)
}

/// Every biased token must be in the vocabulary (`0..n_vocab`).
pub fn check_vocab(sampling: &SamplingParams, n_vocab: i32) -> Result<(), ApiError> {
    match sampling.logit_bias.iter().find(|(t, _)| *t >= n_vocab) {
        Some((t, _)) => Err(ApiError::invalid_param(
            "logit_bias",
            format!("logit_bias: token id {t} is not in the vocabulary (0..{n_vocab})"),
        )),
        None => Ok(()),
    }
}

/// The validated sampling of a request: `temperature` and `top_p` come
/// checked from the route (their ranges differ by API); `route` lists the
/// route's own refused fields.
pub fn resolve(
    fields: SamplingFields,
    temperature: f32,
    top_p: f32,
    route: &[Refused],
) -> Result<(SamplingParams, bool), ApiError> {
    check_refused(&fields.rest, route)?;
    let d = SamplingParams::default();
    let range = |param: &str, v: Option<f32>, lo: f32, hi: f32, default: f32| {
        v.map(|v| check_range(param, v, lo, hi))
            .transpose()
            .map(|v| v.unwrap_or(default))
    };
    let top_k = match fields.top_k {
        None => d.top_k,
        Some(k) if (0..=i32::MAX as i64).contains(&k) => k as i32,
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("top_k must be 0 or more, got {k}"),
            ))
        }
    };
    let repeat_last_n = match fields.repeat_last_n {
        None => DEFAULT_REPEAT_LAST_N,
        Some(n) if (-1..=i32::MAX as i64).contains(&n) => n as i32,
        Some(n) => {
            return Err(ApiError::invalid_param(
                "repeat_last_n",
                format!(
                    "repeat_last_n must be -1 (all generated tokens), 0 (off) or more, got {n}"
                ),
            ))
        }
    };
    let repeat_penalty = match fields.repeat_penalty {
        None => d.repeat_penalty,
        Some(p) if p.is_finite() && p > 0.0 => p,
        Some(p) => {
            return Err(ApiError::invalid_param(
                "repeat_penalty",
                format!("repeat_penalty must be greater than 0 (1 is off), got {p}"),
            ))
        }
    };
    let params = SamplingParams {
        temperature,
        top_p,
        top_k,
        min_p: range("min_p", fields.min_p, 0.0, 1.0, d.min_p)?,
        typical_p: range("typical_p", fields.typical_p, 0.0, 1.0, d.typical_p)?,
        seed: fields.seed.map(|s| s as u64),
        logit_bias: logit_bias(fields.logit_bias)?,
        frequency_penalty: range(
            "frequency_penalty",
            fields.frequency_penalty,
            -2.0,
            2.0,
            d.frequency_penalty,
        )?,
        presence_penalty: range(
            "presence_penalty",
            fields.presence_penalty,
            -2.0,
            2.0,
            d.presence_penalty,
        )?,
        repeat_penalty,
        repeat_last_n,
    };
    Ok((params, fields.ignore_eos.unwrap_or(false)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> SamplingFields {
        serde_json::from_value(v).unwrap()
    }

    fn run(v: Value) -> Result<(SamplingParams, bool), ApiError> {
        resolve(fields(v), 0.0, 1.0, CHAT_REFUSED)
    }

    #[test]
    fn every_field_reaches_the_params() {
        let (p, eos) = run(json!({
            "top_k": 5, "min_p": 0.1, "typical_p": 0.5, "seed": -1,
            "logit_bias": {"12": 100, " 7": -100.0, "3": 0.5},
            "frequency_penalty": 1.5, "presence_penalty": -2, "repeat_penalty": 1.1,
            "repeat_last_n": -1, "ignore_eos": true, "user": "u",
        }))
        .unwrap();
        assert_eq!((p.top_k, p.min_p, p.typical_p), (5, 0.1, 0.5));
        assert_eq!(p.seed, Some(u64::MAX));
        assert_eq!(p.logit_bias, vec![(12, 100.0), (7, -100.0), (3, 0.5)]);
        assert_eq!((p.frequency_penalty, p.presence_penalty), (1.5, -2.0));
        assert_eq!((p.repeat_penalty, p.repeat_last_n), (1.1, -1));
        assert!(eos);
        let (p, eos) = run(json!({})).unwrap();
        assert_eq!(
            p,
            SamplingParams {
                temperature: 0.0,
                ..Default::default()
            }
        );
        assert!(!eos);
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (json!({"top_k": -1}), "top_k"),
            (json!({"min_p": 1.5}), "min_p"),
            (json!({"typical_p": -0.1}), "typical_p"),
            (json!({"frequency_penalty": 2.5}), "frequency_penalty"),
            (json!({"presence_penalty": -3}), "presence_penalty"),
            (json!({"repeat_penalty": 0}), "repeat_penalty"),
            (json!({"repeat_penalty": -1}), "repeat_penalty"),
            (json!({"repeat_last_n": -2}), "repeat_last_n"),
            (json!({"logit_bias": [[1, 5]]}), "logit_bias"),
            (json!({"logit_bias": {"x": 5}}), "logit_bias"),
            (json!({"logit_bias": {"-1": 5}}), "logit_bias"),
            (json!({"logit_bias": {"1": 101}}), "logit_bias"),
            (json!({"logit_bias": {"1": "5"}}), "logit_bias"),
            (json!({"dry_multiplier": 0.8}), "dry_multiplier"),
            (json!({"mirostat": 2}), "mirostat"),
            (json!({"grammar": "root ::= \"a\""}), "grammar"),
            (json!({"functions": [{"name": "f"}]}), "functions"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
        ];
        for (body, param) in cases {
            let err = run(body.clone()).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{body}");
            assert!(err.message.contains(param), "{body}: {}", err.message);
        }
    }

    #[test]
    fn off_values_and_harmless_fields_pass() {
        let ok = json!({
            "dry_multiplier": 0.0, "dry_base": 1.75, "xtc_probability": 0, "mirostat": 0,
            "top_n_sigma": -1, "n_probs": 0, "grammar": "", "samplers": null,
            "modalities": ["text"], "functions": [], "user": "u", "metadata": {"a": "b"},
            "store": false, "service_tier": "auto", "prompt_cache_key": "k",
        });
        assert!(run(ok).is_ok());
        // Another route's own refusals do not apply here.
        assert!(resolve(fields(json!({"container": "c"})), 0.0, 1.0, CHAT_REFUSED).is_ok());
        assert!(resolve(
            fields(json!({"container": "c"})),
            0.0,
            1.0,
            MESSAGES_REFUSED
        )
        .is_err());
    }

    #[test]
    fn biased_ids_must_be_in_the_vocabulary() {
        let (p, _) = run(json!({"logit_bias": {"999": 1}})).unwrap();
        assert!(check_vocab(&p, 1000).is_ok());
        let err = check_vocab(&p, 999).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("logit_bias"));
    }
}
