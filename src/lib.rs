//! hearth: a local LLM inference server.
//!
//! The crate is split along the one seam that matters: `engine` owns
//! llama.cpp on a dedicated OS thread and speaks only through channels;
//! `api` speaks HTTP and the wire protocols; `chat` turns requests into
//! prompt text; `ui` is the status page. See ARCHITECTURE.md for the map.

pub mod api;
pub mod bench;
pub mod chat;
pub mod cli_chat;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod observe;
pub mod server;
pub mod setup;
pub mod shutdown;
pub mod state;
pub mod trace;
pub mod ui;
