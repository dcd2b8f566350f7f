//! What `hearth serve` and `hearth chat` both start from: the model, its
//! chat template and tool-call markup, the engine over them, and the
//! state the prompt pipeline reads ([`AppState`]). One path, so the chat
//! renders prompts exactly as the server does.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tracing::{info, warn};

use crate::chat::prompt::SpecialTexts;
use crate::chat::replay::ReplayStore;
use crate::chat::template::{ChatTemplate, RenderOptions};
use crate::chat::tools::ToolFormat;
use crate::config::{default_model_path, EngineArgs};
use crate::engine::{rpc, EngineConfig, EngineHandle, Model};
use crate::state::{AppState, ServiceState};

/// Tool-call ids whose reply text is kept for exact replay.
const REPLAY_ENTRIES: usize = 4096;

/// A loaded model and how to talk to it.
pub struct Loaded {
    pub model: Arc<Model>,
    pub path: PathBuf,
    pub template: ChatTemplate,
    pub tool_format: ToolFormat,
}

/// Load the model named by `args` (or the default one) and its template,
/// first refusing an engine `config` that does not fit in memory. With
/// `--rpc`, the workers get `--rpc-wait-secs` to answer.
pub fn load(args: &EngineArgs, config: &EngineConfig) -> anyhow::Result<Loaded> {
    load_with_workers(
        args,
        config,
        Some(Duration::from_secs(args.rpc_wait_secs)),
        &mut |what| warn!("{what}"),
    )
}

/// [`load`], waiting at most `patience` (None: as long as it takes) for
/// the RPC workers, and telling `report` what it waits for.
pub fn load_with_workers(
    args: &EngineArgs,
    config: &EngineConfig,
    patience: Option<Duration>,
    report: &mut dyn FnMut(&str),
) -> anyhow::Result<Loaded> {
    let path = args.model.clone().unwrap_or_else(default_model_path);
    if !args.tensor_split.is_empty() {
        anyhow::ensure!(
            args.tensor_split.iter().sum::<f32>() > 0.0,
            "--tensor-split gives every device a share of 0"
        );
        crate::engine::llama::set_tensor_split(args.tensor_split.clone());
    }
    if !args.rpc.is_empty() {
        rpc::connect(&args.rpc, patience, report)?;
    }
    if !args.no_memory_check {
        crate::engine::fit::check(&path, config)?;
    }
    info!(path = %path.display(), "loading model");
    let model = Model::load(&path, args.gpu_layers).with_context(|| load_failed(args))?;
    with_template(args, model, path)
}

/// The model's vocabulary and metadata alone, and its template: what the
/// HTTP side needs when the engine runs in a process of its own.
pub fn load_vocab(args: &EngineArgs) -> anyhow::Result<Loaded> {
    let path = args.model.clone().unwrap_or_else(default_model_path);
    let model = Model::load_vocab(&path).with_context(|| load_failed(args))?;
    with_template(args, model, path)
}

fn load_failed(args: &EngineArgs) -> String {
    if args.model.is_none() {
        "the default model is missing: run scripts/serve.sh (it fetches it) or pass --model PATH"
            .to_string()
    } else {
        "cannot load the model".to_string()
    }
}

fn with_template(args: &EngineArgs, model: Arc<Model>, path: PathBuf) -> anyhow::Result<Loaded> {
    let template = match &args.chat_template {
        Some(file) => {
            let src = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            ChatTemplate::new(&src, &model.bos_text(), &model.eos_text())?
        }
        None => match model.chat_template() {
            Some(src) => ChatTemplate::new(&src, &model.bos_text(), &model.eos_text())?,
            None => {
                info!("the model has no chat template: using the plain-text fallback");
                ChatTemplate::fallback(&model.bos_text(), &model.eos_text())
            }
        },
    };
    let name = format!(
        "{} {}",
        model.meta("general.name").unwrap_or_default(),
        path.display()
    );
    let tool_format =
        ToolFormat::detect((!template.is_fallback()).then(|| template.source()), &name);
    info!(tool_format = ?tool_format, "tool calls");
    Ok(Loaded {
        model,
        path,
        template,
        tool_format,
    })
}

impl Loaded {
    /// The tokens that open an assistant turn both where the prompt asks
    /// for a reply and where the history keeps one (`<|im_start|>assistant\n`,
    /// `<｜Assistant｜>`): where the next turn of a conversation usually
    /// leaves the sequence the last one left. Empty when the template
    /// does not render a plain two-message conversation.
    pub fn turn_marker(&self) -> Vec<crate::engine::Token> {
        use crate::chat::{ChatMessage, Role};
        let user = ChatMessage::new(Role::User, "Hi.");
        let reply = ChatMessage::new(Role::Assistant, "Hello there.");
        let render = |msgs: &[ChatMessage], gen: bool, thinking: Option<bool>| {
            let opts = RenderOptions {
                add_generation_prompt: gen,
                enable_thinking: thinking,
                ..Default::default()
            };
            self.template.render_with(msgs, &opts).ok()
        };
        let Some(base) = render(std::slice::from_ref(&user), false, None) else {
            return Vec::new();
        };
        // The turn as the history keeps it, and as a prompt opens it with
        // thinking on, off and left to the template.
        let turns = [
            render(&[user.clone(), reply], false, None),
            render(std::slice::from_ref(&user), true, None),
            render(std::slice::from_ref(&user), true, Some(true)),
            render(std::slice::from_ref(&user), true, Some(false)),
        ];
        let Some(turns) = turns
            .iter()
            .map(|t| t.as_deref()?.strip_prefix(base.as_str()))
            .map(|t| Some(self.model.tokenize(t?, false, true)))
            .collect::<Option<Vec<_>>>()
        else {
            return Vec::new();
        };
        let first = &turns[0];
        let shared = (0..first.len())
            .take_while(|&k| turns.iter().all(|t| t.get(k) == Some(&first[k])))
            .count();
        first[..shared].to_vec()
    }

    /// Start the engine over this model, with `config` and the template's
    /// turn marker.
    pub fn start_engine(
        &self,
        config: EngineConfig,
    ) -> Result<EngineHandle, crate::engine::llama::LlamaError> {
        let config = EngineConfig {
            turn_marker: self.turn_marker(),
            ..config
        };
        crate::engine::start(self.model.clone(), config)
    }

    /// The GGUF's file name without `.gguf` (`general.name` is often a
    /// training-run label, not a name users recognise).
    pub fn default_alias(&self) -> String {
        default_alias(&self.model, &self.path)
    }

    /// The shared state over a started engine.
    pub fn into_state(
        self,
        engine: EngineHandle,
        model_id: String,
        heartbeat: Duration,
        keep_billing_header: bool,
        service: ServiceState,
    ) -> AppState {
        AppState {
            engine,
            template: self.template,
            tool_format: self.tool_format,
            specials: SpecialTexts::new(self.model.control_token_texts()),
            replay: std::sync::Arc::new(ReplayStore::new(REPLAY_ENTRIES)),
            responses: crate::state::responses::ResponseStore::new(
                crate::state::responses::STORED_RESPONSES,
                crate::state::responses::STORED_BYTES,
            ),
            model_id,
            heartbeat,
            started_at: crate::api::unix_now(),
            fingerprint: format!("hearth-{}", env!("CARGO_PKG_VERSION")),
            keep_billing_header,
            service,
        }
    }
}

fn default_alias(model: &Model, path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| model.meta("general.name"))
        .unwrap_or_else(|| "model".into())
}
