//! `hearth bench --depths`: prefill and decode speed at growing context
//! depths, through the engine's own path, as llama-bench `-d` measures
//! them: `depth` prompt tokens are put in the KV first (not timed), then
//! the prefill test computes `-p` more tokens after them and the decode
//! test generates `-n` tokens after them (and two prompt tokens), each
//! taking the depth tokens as a cached prefix of the live sequence.

use std::path::Path;

use anyhow::Context as _;
use serde_json::Value;

use super::{
    generate, mean_sd, reference_threads, secs, start_engine, stop_engine, BenchArgs, Prompts,
};
use crate::config::default_model_path;
use crate::engine::Model;

/// One engine's figures at one depth: mean and standard deviation of
/// tokens per second.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthRow {
    pub engine: String,
    pub depth: u32,
    pub pp_tokens: u32,
    pub pp: (f64, f64),
    pub tg_tokens: u32,
    pub tg: (f64, f64),
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let mut depths = args.depths.clone();
    depths.sort_unstable();
    depths.dedup();
    if args.prompt_tokens < 2 || args.gen_tokens < 2 {
        anyhow::bail!("--depths needs -p and -n of at least 2");
    }
    let reps = args.reps.max(1);
    let llama = match &args.llama_bench_json {
        Some(path) => llama_bench_rows(path)?,
        None => Vec::new(),
    };
    let path = args.model.clone().unwrap_or_else(default_model_path);
    let model = Model::load(&path, 999)?;
    let max_depth = depths.last().copied().unwrap_or(0);
    let n_ctx = (max_depth + args.prompt_tokens.max(args.gen_tokens) + 16).max(512);
    if n_ctx > model.n_ctx_train() && model.n_ctx_train() > 0 {
        eprintln!(
            "note: depth {max_depth} goes past the model's trained context ({} tokens)",
            model.n_ctx_train()
        );
    }
    let engine = start_engine(&model, args, n_ctx)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut prompts = Prompts::new(&model);
    // Warm-up, as llama-bench does.
    generate(&engine, &rt, prompts.next(args.prompt_tokens.min(64)), 4)?;
    let mut rows = Vec::new();
    for &depth in &depths {
        let (mut pp, mut tg) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let context = prompts.next(depth);
            if depth > 0 {
                generate(&engine, &rt, context.clone(), 1)?;
            }
            let mut prompt = context.clone();
            prompt.extend(prompts.next(args.prompt_tokens));
            let (t, usage) = generate(&engine, &rt, prompt, 1)?;
            check_cached(depth, usage.cached_tokens)?;
            pp.push(args.prompt_tokens as f64 / secs(t.prefill));
            // The decode test: two new tokens after the depth (the engine
            // recomputes a prompt it holds all but one token of), then -n
            // sampled; the first needs no decode, so n-1 are timed.
            let mut prompt = context;
            prompt.extend(prompts.next(2));
            let (t, usage) = generate(&engine, &rt, prompt, args.gen_tokens)?;
            check_cached(depth, usage.cached_tokens)?;
            tg.push(args.gen_tokens.saturating_sub(1) as f64 / secs(t.decode));
        }
        let row = DepthRow {
            engine: "hearth".into(),
            depth,
            pp_tokens: args.prompt_tokens,
            pp: mean_sd(&pp),
            tg_tokens: args.gen_tokens,
            tg: mean_sd(&tg),
        };
        print_row(&row, &model, args);
        rows.push(row);
    }
    stop_engine(&rt, engine);
    for row in &llama {
        print_row(row, &model, args);
    }
    rows.extend(llama);
    if let Some(csv) = &args.csv {
        std::fs::write(csv, to_csv(&rows))
            .with_context(|| format!("cannot write {}", csv.display()))?;
    }
    if let Some(svg) = &args.svg {
        let title = format!(
            "{}, threads {}",
            model.description(),
            reference_threads(args)
        );
        super::plot::draw(svg, &title, &rows)?;
    }
    Ok(())
}

/// The depth tokens must come from the KV, or the test measured a cold
/// prefill instead.
fn check_cached(depth: u32, cached: u32) -> anyhow::Result<()> {
    if cached < depth {
        anyhow::bail!("at depth {depth} only {cached} tokens came from the KV cache");
    }
    Ok(())
}

fn print_row(row: &DepthRow, model: &Model, args: &BenchArgs) {
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "engine": row.engine, "model": model.description(), "depth": row.depth,
                "pp_tokens": row.pp_tokens, "pp_avg_ts": row.pp.0, "pp_stddev_ts": row.pp.1,
                "tg_tokens": row.tg_tokens, "tg_avg_ts": row.tg.0, "tg_stddev_ts": row.tg.1,
            })
        );
    } else {
        println!(
            "{:>9} | d{:<6} | pp{:<4} {:9.2} ± {:7.2} t/s | tg{:<4} {:9.2} ± {:7.2} t/s",
            row.engine,
            row.depth,
            row.pp_tokens,
            row.pp.0,
            row.pp.1,
            row.tg_tokens,
            row.tg.0,
            row.tg.1
        );
    }
}

/// A row per engine and depth.
pub fn to_csv(rows: &[DepthRow]) -> String {
    let mut s = String::from("engine,depth,pp_tokens,pp_ts,pp_stddev,tg_tokens,tg_ts,tg_stddev\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{:.3},{:.3},{},{:.3},{:.3}\n",
            r.engine, r.depth, r.pp_tokens, r.pp.0, r.pp.1, r.tg_tokens, r.tg.0, r.tg.1
        ));
    }
    s
}

/// llama-bench's JSON output (an array of tests: `n_prompt`, `n_gen`,
/// `n_depth`, `avg_ts`, `stddev_ts`) as one row per depth.
fn llama_bench_rows(path: &Path) -> anyhow::Result<Vec<DepthRow>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_llama_bench(&text).with_context(|| format!("{}: not llama-bench JSON", path.display()))
}

pub fn parse_llama_bench(text: &str) -> anyhow::Result<Vec<DepthRow>> {
    let tests: Vec<Value> = serde_json::from_str(text)?;
    let mut rows: Vec<DepthRow> = Vec::new();
    for t in &tests {
        let n = |k: &str| t[k].as_u64().unwrap_or(0) as u32;
        let f = |k: &str| t[k].as_f64().unwrap_or(0.0);
        let (depth, n_prompt, n_gen) = (n("n_depth"), n("n_prompt"), n("n_gen"));
        let i = match rows.iter().position(|r| r.depth == depth) {
            Some(i) => i,
            None => {
                rows.push(DepthRow {
                    engine: "llama.cpp".into(),
                    depth,
                    pp_tokens: 0,
                    pp: (0.0, 0.0),
                    tg_tokens: 0,
                    tg: (0.0, 0.0),
                });
                rows.len() - 1
            }
        };
        let figures = (f("avg_ts"), f("stddev_ts"));
        if n_prompt > 0 && n_gen == 0 {
            rows[i].pp_tokens = n_prompt;
            rows[i].pp = figures;
        } else if n_gen > 0 && n_prompt == 0 {
            rows[i].tg_tokens = n_gen;
            rows[i].tg = figures;
        }
    }
    if rows.is_empty() {
        anyhow::bail!("no tests in it");
    }
    rows.sort_by_key(|r| r.depth);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_bench_json_becomes_a_row_per_depth() {
        let json = r#"[
          {"n_prompt": 512, "n_gen": 0, "n_depth": 0, "avg_ts": 900.5, "stddev_ts": 3.0},
          {"n_prompt": 0, "n_gen": 128, "n_depth": 0, "avg_ts": 80.0, "stddev_ts": 1.0},
          {"n_prompt": 512, "n_gen": 0, "n_depth": 2048, "avg_ts": 600.0, "stddev_ts": 2.0},
          {"n_prompt": 0, "n_gen": 128, "n_depth": 2048, "avg_ts": 50.0, "stddev_ts": 0.5}
        ]"#;
        let rows = parse_llama_bench(json).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].depth, 2048);
        assert_eq!(rows[1].pp, (600.0, 2.0));
        assert_eq!(rows[1].tg_tokens, 128);
        let csv = to_csv(&rows);
        assert_eq!(csv.lines().count(), 3);
        assert!(csv
            .lines()
            .nth(2)
            .unwrap()
            .starts_with("llama.cpp,2048,512,600.000,2.000,128,50.000"));
        assert!(parse_llama_bench("[]").is_err());
        assert!(parse_llama_bench("{").is_err());
    }
}
