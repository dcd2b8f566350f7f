//! `hearth chat`: talk to the model in a terminal.
//!
//! In-process by default: the model is loaded here and prompts go through
//! the server's own pipeline ([`crate::setup`], `api::prepare`, the chat
//! template, the engine and its KV stores), so a conversation reuses its
//! KV from one turn to the next exactly as a client of `hearth serve`
//! does. With `--url` it speaks to a running server instead. `-p` (or a
//! prompt on stdin) answers once and exits; otherwise [`repl`] runs the
//! interactive session.

mod backend;
mod display;
mod remote;
mod repl;
mod session;

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;

use crate::chat::{ChatMessage, ChatRequest, Role, ToolSpec};
use crate::config::{hearth_home, EngineArgs};
use crate::state::ServiceState;
use backend::{Local, Reply, ReplyEvent, ReplyOptions};
use display::{Collected, Printer, ReplyStats};
use remote::Remote;
use session::Session;

/// `hearth chat` options.
#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Talk to a running server (`http://host:port`, OpenAI chat
    /// completions) instead of loading the model here.
    #[arg(long, env = "HEARTH_URL")]
    pub url: Option<String>,
    /// The key the server at --url requires.
    #[arg(long, env = "HEARTH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Ask this, print the answer and exit (`-`: read the prompt from
    /// stdin, as when stdin is not a terminal and -p is not given).
    #[arg(short = 'p', long)]
    pub prompt: Option<String>,
    /// The system prompt (also `/system TEXT`).
    #[arg(long)]
    pub system: Option<String>,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Most tokens per reply (default: the room left in the context).
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Keep generating past end-of-turn, up to --max-tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Offer these tools: a JSON array of OpenAI tool definitions
    /// (`{"type": "function", "function": {...}}`). Calls are shown, and
    /// the next lines typed are their results.
    #[arg(long)]
    pub tools: Option<PathBuf>,
    /// Where history, saved conversations (`sessions/`) and their KV
    /// snapshots (`kv/`, unless --kv-disk-dir) live. Default:
    /// `$HEARTH_HOME/chat` (`~/.cache/hearth/chat`).
    #[arg(long, env = "HEARTH_CHAT_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Start from this saved conversation (as `/load NAME`).
    #[arg(long)]
    pub load: Option<String>,
}

/// The model, here or behind a URL.
pub(crate) enum Backend {
    Local(Local),
    Remote(Remote),
}

/// Everything a chat runs with.
pub(crate) struct Chat {
    pub backend: Backend,
    pub tools: Vec<ToolSpec>,
    pub opts: ReplyOptions,
    pub data_dir: PathBuf,
    /// The model file (or the server), as saved conversations record it.
    pub model_name: String,
    pub rt: tokio::runtime::Runtime,
}

/// One reply, gathered.
pub(crate) struct Turn {
    pub reply: Collected,
    pub stats: ReplyStats,
    /// Ctrl-C ended it.
    pub stopped: bool,
    pub error: Option<String>,
}

impl Chat {
    pub fn n_ctx(&self) -> Option<u32> {
        match &self.backend {
            Backend::Local(l) => Some(l.state.engine.n_ctx()),
            Backend::Remote(_) => None,
        }
    }

    fn start(&self, session: &Session) -> Reply {
        let messages = session.request_messages();
        match &self.backend {
            Backend::Local(l) => {
                let mut req = ChatRequest::new(messages);
                req.tools = self.tools.clone();
                l.start(req, &self.opts)
            }
            Backend::Remote(r) => r.start(&messages, &self.tools, &self.opts),
        }
    }

    /// Generate the next reply to `session`, printing it as it comes;
    /// Ctrl-C stops it (what was generated is kept). The reply joins the
    /// history unless it failed.
    pub fn turn(&self, session: &mut Session, printer: &mut Printer) -> Turn {
        let started = Instant::now();
        // The reply's task is spawned on the chat's runtime.
        let _rt = self.rt.enter();
        let mut reply = self.start(session);
        let mut turn = Turn {
            reply: Collected::default(),
            stats: ReplyStats::default(),
            stopped: false,
            error: None,
        };
        let mut first: Option<Instant> = None;
        let mut last = started;
        let mut pieces = 0u32;
        self.rt.block_on(async {
            let ctrl_c = tokio::signal::ctrl_c();
            tokio::pin!(ctrl_c);
            loop {
                let ev = tokio::select! {
                    ev = reply.events.recv() => ev,
                    _ = &mut ctrl_c => {
                        reply.stop();
                        turn.stopped = true;
                        return;
                    }
                };
                let Some(ev) = ev else {
                    turn.error = Some("the reply ended without a result".into());
                    return;
                };
                printer.event(&ev);
                match ev {
                    ReplyEvent::Started {
                        prompt_tokens,
                        cached,
                        source,
                    } => {
                        turn.stats.prompt_tokens = prompt_tokens;
                        turn.stats.cached_tokens = cached;
                        turn.stats.source = source.into();
                    }
                    ReplyEvent::Prefill { .. } => {}
                    ReplyEvent::Output(out) => {
                        first.get_or_insert_with(Instant::now);
                        last = Instant::now();
                        pieces += 1;
                        turn.reply.push(&out);
                    }
                    ReplyEvent::Finished {
                        reason,
                        usage,
                        timings,
                    } => {
                        turn.stats.prompt_tokens = usage.prompt_tokens;
                        turn.stats.cached_tokens = usage.cached_tokens;
                        turn.stats.generated = usage.completion_tokens;
                        turn.stats.outcome = if turn.reply.calls.is_empty() {
                            reason
                        } else {
                            "tool_calls".into()
                        };
                        if let Some((prefill, decode)) = timings {
                            turn.stats.prefill = prefill;
                            turn.stats.decode = decode;
                        }
                        return;
                    }
                    ReplyEvent::Failed(e) => {
                        turn.error = Some(e);
                        return;
                    }
                }
            }
        });
        printer.finish();
        if let Some(f) = first {
            turn.stats.first_token = Some(f - started);
            if turn.stats.decode.is_zero() {
                // Timed here (a server, or a stopped reply).
                turn.stats.prefill = f - started;
                turn.stats.decode = last - f;
            }
        }
        if turn.stopped {
            turn.stats.outcome = "stopped".into();
            if turn.stats.generated == 0 {
                // Stream pieces, about one token each.
                turn.stats.generated = pieces;
            }
        }
        if turn.error.is_some() {
            turn.stats.outcome = "failed".into();
        } else {
            session.messages.push(ChatMessage {
                role: Role::Assistant,
                // As generated, untrimmed: the KV holds exactly these tokens.
                content: turn.reply.text.clone(),
                reasoning: (!turn.reply.reasoning.is_empty()).then(|| turn.reply.reasoning.clone()),
                tool_calls: turn.reply.calls.clone(),
                ..Default::default()
            });
        }
        turn
    }

    /// Write the KV of the conversation to the disk store; the tokens
    /// written (None: with a server, whose cache is its own).
    pub fn persist(&self) -> Option<usize> {
        match &self.backend {
            Backend::Local(l) => Some(self.rt.block_on(l.state.engine.persist())),
            Backend::Remote(_) => None,
        }
    }

    /// Save the KV cache for the next start and stop the engine.
    pub fn close(self) {
        if let Backend::Local(l) = &self.backend {
            self.rt.block_on(l.state.engine.shutdown());
        }
    }
}

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| hearth_home().join("chat"));
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let tools = match &args.tools {
        Some(path) => read_tools(path)?,
        None => Vec::new(),
    };
    // Read before the model loads: a one-shot prompt from stdin.
    let one_shot = match args.prompt.as_deref() {
        Some("-") => Some(read_stdin()?),
        Some(p) => Some(p.to_string()),
        None if !std::io::stdin().is_terminal() => Some(read_stdin()?),
        None => None,
    };
    if one_shot.as_deref().is_some_and(|p| p.trim().is_empty()) {
        anyhow::bail!("the prompt is empty");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("hearth-chat")
        .build()?;
    let opts = ReplyOptions {
        temperature: args.temperature,
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
    };
    let (backend, model_name) = match &args.url {
        Some(url) => {
            let base = remote::base_url(url).map_err(|e| anyhow::anyhow!(e))?;
            let model = args
                .engine
                .model
                .as_ref()
                .and_then(|m| m.file_stem())
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "default".into());
            let name = format!("{base} {model}");
            (
                Backend::Remote(Remote::new(base, args.api_key.clone(), model)),
                name,
            )
        }
        None => {
            let mut engine_args = args.engine.clone();
            if engine_args.kv_disk_dir.is_none() {
                engine_args.kv_disk_dir = Some(data_dir.join("kv"));
            }
            let mut config = engine_args.engine_config(1);
            config.fault = crate::engine::fault::FaultPlan::from_env()
                .map_err(|e| anyhow::anyhow!("HEARTH_FAULT: {e}"))?;
            let loaded = crate::setup::load(&engine_args, &config)?;
            let name = loaded.path.display().to_string();
            let engine = loaded.start_engine(config)?;
            let alias = loaded.default_alias();
            let state = loaded.into_state(
                engine,
                alias,
                std::time::Duration::from_secs(5),
                false,
                ServiceState::new(1),
            );
            (
                Backend::Local(Local {
                    state: Arc::new(state),
                }),
                name,
            )
        }
    };
    let chat = Chat {
        backend,
        tools,
        opts,
        data_dir,
        model_name,
        rt,
    };
    let mut session = Session {
        system: args.system.clone(),
        ..Default::default()
    };
    if let Some(name) = &args.load {
        let name = session::check_name(name).map_err(|e| anyhow::anyhow!(e))?;
        session = repl::load_session(&chat, &name).map_err(|e| anyhow::anyhow!(e))?;
    }
    let result = match one_shot {
        Some(prompt) => answer_once(&chat, &mut session, &prompt),
        None => repl::interactive(&chat, &mut session),
    };
    chat.close();
    result
}

/// `-p`: one reply, printed; the exit status says whether it worked.
fn answer_once(chat: &Chat, session: &mut Session, prompt: &str) -> anyhow::Result<()> {
    session.push_user(prompt.trim_end());
    let mut printer = Printer::new(true);
    let turn = chat.turn(session, &mut printer);
    if let Some(e) = turn.error {
        anyhow::bail!(e);
    }
    if turn.stopped {
        std::process::exit(130);
    }
    Ok(())
}

fn read_stdin() -> anyhow::Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("cannot read the prompt from stdin")?;
    Ok(s)
}

/// `--tools FILE`: OpenAI tool definitions, validated as the server does.
fn read_tools(path: &std::path::Path) -> anyhow::Result<Vec<ToolSpec>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let list = value
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("{}: expected a JSON array of tools", path.display()))?;
    let mut tools = Vec::new();
    for (i, t) in list.iter().enumerate() {
        let f = &t["function"];
        let name = f["name"].as_str().ok_or_else(|| {
            anyhow::anyhow!(
                "tools[{i}]: expected {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
            )
        })?;
        let spec = crate::api::openai::tool_spec(
            &format!("tools[{i}].function"),
            name.to_string(),
            f["description"].as_str().map(str::to_string),
            f.get("parameters").cloned(),
        )
        .map_err(|e| anyhow::anyhow!(e.message))?;
        tools.push(spec);
    }
    crate::api::openai::check_unique_tools("tools", &tools)
        .map_err(|e| anyhow::anyhow!(e.message))?;
    Ok(tools)
}
