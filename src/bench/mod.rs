//! `hearth bench`: prefill and decode speed through the engine's own code
//! path (the same worker, chunking, sampler and event channel that serve
//! requests), reported in llama-bench's terms (`pp512`, `tg128`) so the two
//! can be read side by side. With `--depths`, [`depth`] measures both at
//! growing context depths instead, and [`plot`] draws them.

mod depth;
mod plot;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Args;

use crate::config::{default_model_path, ThreadArgs};
use crate::engine::threads::cores;
use crate::engine::{
    self, EngineConfig, EngineHandle, Event, GenerateRequest, Model, SamplingParams, Timings, Usage,
};

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// GGUF model file (default: the embedded default model).
    #[arg(short = 'm', long, env = "HEARTH_MODEL")]
    pub model: Option<PathBuf>,
    /// Prompt tokens for the prefill test (llama-bench `-p`).
    #[arg(short = 'p', long, default_value_t = 512)]
    pub prompt_tokens: u32,
    /// Generated tokens for the decode test (llama-bench `-n`).
    #[arg(short = 'n', long, default_value_t = 128)]
    pub gen_tokens: u32,
    /// Repetitions of each test; the mean and spread are reported.
    #[arg(short = 'r', long, default_value_t = 5)]
    pub reps: u32,
    /// Prefill chunk size.
    #[arg(short = 'b', long, default_value_t = 512)]
    pub batch: u32,
    #[command(flatten)]
    pub threads: ThreadArgs,
    /// Skip the llama.cpp reference runs (hearth's own rows only).
    #[arg(long)]
    pub no_reference: bool,
    /// Print one JSON object per test instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Measure prefill and decode at these context depths instead: each
    /// test runs with this many prompt tokens already in the KV
    /// (llama-bench `-d`), e.g. `0,2048,8192`.
    #[arg(long, value_delimiter = ',')]
    pub depths: Vec<u32>,
    /// With --depths: write the figures as CSV, a row per engine and depth.
    #[arg(long, requires = "depths")]
    pub csv: Option<PathBuf>,
    /// With --depths: plot prefill and decode tokens/s against depth (SVG).
    #[arg(long, requires = "depths")]
    pub svg: Option<PathBuf>,
    /// With --depths: llama-bench's JSON output (`-o json -d ...`), shown
    /// in the table, the CSV and the plot beside hearth's figures.
    #[arg(long, requires = "depths")]
    pub llama_bench_json: Option<PathBuf>,
}

/// Mean and sample standard deviation.
fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if !args.depths.is_empty() {
        return depth::run(&args);
    }
    let path = args.model.clone().unwrap_or_else(default_model_path);
    let model = Model::load(&path, 999)?;
    let n_ctx = (args.prompt_tokens + args.gen_tokens + 16).max(512);
    let engine = start_engine(&model, &args, n_ctx)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut prompts = Prompts::new(&model);
    let once = |prompt: Vec<i32>, gen: u32| generate(&engine, &rt, prompt, gen).map(|(t, _)| t);
    // Warm-up, as llama-bench does: first touches of the weights are slow.
    once(prompts.next(args.prompt_tokens.min(64)), 4)?;
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for _ in 0..args.reps {
        // Prefill test: the whole prompt, one token generated (its time is
        // not counted).
        let t = once(prompts.next(args.prompt_tokens), 1)?;
        pp.push(args.prompt_tokens as f64 / secs(t.prefill));
        // Decode test: a one-token prompt, then gen_tokens sampled. The
        // first sampled token needs no decode, so n-1 decodes are timed.
        let t = once(prompts.next(1), args.gen_tokens)?;
        tg.push((args.gen_tokens.saturating_sub(1)) as f64 / secs(t.decode));
    }
    // The threads the engine ended on (decode's follow the machine's load).
    let stats = engine.stats();
    let used = [
        stats.batch_threads.load(Ordering::Relaxed),
        stats.decode_threads.load(Ordering::Relaxed),
    ];
    // The reference runs alone, as llama-bench does in its own process:
    // with the engine's context and worker still alive beside it, its
    // decode test measured at less than half speed.
    stop_engine(&rt, engine);
    let (ref_pp, ref_tg) = if args.no_reference {
        (Vec::new(), Vec::new())
    } else {
        reference(&model, &args, n_ctx)?
    };
    let desc = model.description();
    let fixed = reference_threads(&args);
    let pp_name = format!("pp{}", args.prompt_tokens);
    let tg_name = format!("tg{}", args.gen_tokens);
    let rows = [
        ("hearth", &pp_name, &pp, used[0]),
        ("llama.cpp-raw", &pp_name, &ref_pp, fixed),
        ("hearth", &tg_name, &tg, used[1]),
        ("llama.cpp-raw", &tg_name, &ref_tg, fixed),
    ];
    for (engine, test, xs, threads) in rows {
        if xs.is_empty() {
            continue;
        }
        let (mean, sd) = mean_sd(xs);
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "engine": engine, "model": desc, "test": test, "threads": threads,
                                    "batch": args.batch, "reps": args.reps, "avg_ts": mean, "stddev_ts": sd,
                                    "samples_ts": xs })
            );
        } else {
            println!(
                "{engine:>13} | {desc} | threads {threads} | {test:>6} | {mean:9.2} ± {sd:6.2} t/s"
            );
        }
    }
    Ok(())
}

/// The reference's thread count: the one asked for, else one per core (as
/// llama-bench's own default would be on this machine).
fn reference_threads(args: &BenchArgs) -> usize {
    match args.threads.threads {
        0 => cores(),
        n => n as usize,
    }
}

/// One sequence, no snapshot stores: every test sees only what it put in
/// the KV itself.
fn start_engine(
    model: &std::sync::Arc<Model>,
    args: &BenchArgs,
    n_ctx: u32,
) -> anyhow::Result<EngineHandle> {
    let config = EngineConfig {
        n_ctx,
        n_parallel: 1,
        spec: None,
        draft_model: None,
        kv_size: 0,
        n_batch: args.batch,
        threads: args.threads.settings(),
        n_gpu_layers: 999,
        fault: None,
        cache_ram_bytes: 0,
        ctx_checkpoints: 0,
        // As the reference context below: figures comparable run to run.
        swa_full: true,
        flash_attn: Default::default(),
        turn_marker: Vec::new(),
        kv_disk_dir: None,
        kv_disk_bytes: 0,
    };
    Ok(engine::start(model.clone(), config)?)
}

/// Token ids that no earlier prompt of the run started with, so no KV
/// prefix is reused by accident.
struct Prompts {
    n_vocab: i32,
    salt: i32,
}

impl Prompts {
    fn new(model: &Model) -> Self {
        Self {
            n_vocab: model.n_vocab().max(2),
            salt: 0,
        }
    }

    fn next(&mut self, len: u32) -> Vec<i32> {
        self.salt += 1;
        let salt = self.salt;
        (0..len as i32)
            .map(|i| (salt * 7919 + i * 31) % (self.n_vocab - 1) + 1)
            .collect()
    }
}

/// Stop the engine and wait until its thread has freed the context: a
/// process that exits while the engine thread is still inside llama.cpp
/// (it decodes a finished reply's last token once it goes idle) can crash
/// in llama.cpp's teardown.
pub(crate) fn stop_engine(rt: &tokio::runtime::Runtime, engine: EngineHandle) {
    rt.block_on(engine.shutdown());
}

/// Run one greedy job to the end, past end-of-turn tokens.
fn generate(
    engine: &EngineHandle,
    rt: &tokio::runtime::Runtime,
    prompt: Vec<i32>,
    gen: u32,
) -> anyhow::Result<(Timings, Usage)> {
    let mut req = GenerateRequest::new(
        prompt,
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        gen,
    );
    req.ignore_eos = true;
    let mut job = engine.submit(req);
    rt.block_on(async {
        while let Some(ev) = job.events.recv().await {
            match ev {
                Event::Finished { timings, usage, .. } => return Ok((timings, usage)),
                Event::Failed(e) => return Err(anyhow::anyhow!(e)),
                _ => {}
            }
        }
        Err(anyhow::anyhow!("engine stopped"))
    })
}

/// The reference: llama.cpp driven directly through the same crate, with
/// no worker thread, channels, sampler or text handling: a fresh context,
/// the prompt decoded in `batch`-sized calls, then single-token decodes of
/// fixed tokens, as llama-bench's pp and tg tests do.
fn reference(
    model: &std::sync::Arc<Model>,
    args: &BenchArgs,
    n_ctx: u32,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    use crate::engine::llama::{Context, ContextParams};
    let params = ContextParams {
        n_ctx,
        n_batch: args.batch.max(1),
        n_threads: reference_threads(args),
        poll: args.threads.poll,
        n_seq_max: 1,
        swa_full: true,
        n_rs_seq: 0,
        flash_attn: Default::default(),
    };
    let mut ctx = Context::new(model.clone(), params, Box::new(|| false))?;
    let n_vocab = model.n_vocab().max(2);
    let tokens: Vec<i32> = (0..args.prompt_tokens as i32)
        .map(|i| (i * 131 + 7) % (n_vocab - 1) + 1)
        .collect();
    let fail = |e| anyhow::anyhow!("reference decode failed: {e:?}");
    // Warm-up.
    ctx.decode(&tokens[..tokens.len().min(64)], 0, true)
        .map_err(fail)?;
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for _ in 0..args.reps {
        ctx.kv_clear();
        let t = std::time::Instant::now();
        let mut pos = 0;
        for chunk in tokens.chunks(args.batch.max(1) as usize) {
            ctx.decode(chunk, pos, pos + chunk.len() == tokens.len())
                .map_err(fail)?;
            pos += chunk.len();
        }
        pp.push(tokens.len() as f64 / secs(t.elapsed()));
        ctx.kv_clear();
        ctx.decode(&tokens[..1], 0, true).map_err(fail)?;
        let t = std::time::Instant::now();
        let n = args.gen_tokens.saturating_sub(1) as usize;
        for i in 0..n {
            ctx.decode(&tokens[(i + 1) % tokens.len()..][..1], i + 1, true)
                .map_err(fail)?;
        }
        tg.push(n as f64 / secs(t.elapsed()));
    }
    Ok((pp, tg))
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}
