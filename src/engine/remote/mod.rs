//! The engine in a child process of its own.
//!
//! llama.cpp ends its process on many internal failures (`GGML_ABORT`, a
//! backend out of memory, a remote worker gone). `hearth serve` therefore
//! runs the engine in a child process (`child.rs`) and keeps the HTTP side
//! in the parent, whose [`EngineHandle`](super::EngineHandle) talks to the
//! child through a supervisor thread (`supervisor.rs`) over a Unix socket:
//! jobs and cancellations go in, events and the engine's counters come
//! out. When the child dies, the supervisor ends the requests it was
//! computing with [`EngineError::EngineLost`](super::EngineError), keeps
//! the ones it had not started, and starts a new child, which warms from
//! the disk KV cache. Heartbeats never depend on it: they are the HTTP
//! side's own timers.
//!
//! The wire is one message per frame: a little-endian `u32` length, then
//! the message as JSON.

pub mod child;
pub mod supervisor;

use std::sync::atomic::Ordering;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::status::{EngineStatus, StoredSnapshot};
use super::{EngineStats, Event, GenerateRequest};

/// The environment variable that makes `hearth serve` the engine process:
/// the path of the supervisor's socket to connect to.
pub const SOCKET_ENV: &str = "HEARTH_ENGINE_SOCKET";
/// Set for an engine process that replaces one that died.
pub const RESTART_ENV: &str = "HEARTH_ENGINE_RESTART";

/// The largest frame either side accepts.
const MAX_FRAME: usize = 256 << 20;

/// One job as it crosses to the engine process: its arrival number (the
/// parent's, so `/slots`, events and fault plans agree) and its request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WireJob {
    pub arrival: u64,
    pub request: GenerateRequest,
}

/// What the supervisor sends the engine process.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToEngine {
    /// A job, with the choices forked from its prompt.
    Run {
        leader: Box<WireJob>,
        forks: Vec<WireJob>,
    },
    /// The client of this job has gone.
    Cancel(u64),
    /// Write every sequence to the disk store; answered by `Persisted`.
    Persist(u64),
    /// Save the KV cache and exit; answered by `ShutDown`.
    Shutdown,
}

/// What the engine process sends back.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FromEngine {
    /// What the engine process waits for before it can load (RPC workers
    /// that do not answer yet); only before `Ready`.
    Starting(String),
    /// The engine cannot load (a worker that never answered, a model that
    /// does not fit): why, sent instead of `Ready` before the process ends,
    /// so the server says it even when the process's own stderr is lost.
    CannotStart(String),
    /// The engine is loaded and takes jobs (its counters come next).
    Ready {
        n_ctx: u32,
        pid: u32,
    },
    /// The engine's counters and status copy, sent before the events that
    /// follow them, so what a client sees is never ahead of `/metrics`.
    Stats(Box<StatsWire>),
    Event {
        job: u64,
        event: Event,
    },
    Persisted {
        id: u64,
        tokens: usize,
    },
    ShutDown,
}

/// Write one message as one frame.
pub(crate) async fn write_frame<W, T>(w: &mut W, msg: &T) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    w.write_all(&encode(msg)?).await
}

/// One message as the bytes of one frame.
pub(crate) fn encode<T: Serialize>(msg: &T) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4];
    serde_json::to_writer(&mut buf, msg)?;
    let len = u32::try_from(buf.len() - 4).map_err(|_| std::io::Error::other("frame too large"))?;
    buf[..4].copy_from_slice(&len.to_le_bytes());
    Ok(buf)
}

/// Read one frame; None at a clean end of the stream.
pub(crate) async fn read_frame<R, T>(r: &mut R) -> std::io::Result<Option<T>>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut head = [0u8; 4];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(head) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!("frame of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(std::io::Error::other)
}

/// Declares [`StatsWire`] over the counters of [`EngineStats`] the engine
/// keeps (`submitted` is the HTTP side's own), with the copy in and out.
macro_rules! stats_wire {
    ($($field:ident: $ty:ty),* $(,)?) => {
        /// The engine's side of [`EngineStats`], as it crosses the socket.
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        pub(crate) struct StatsWire {
            $(pub $field: $ty,)*
            pub alive: bool,
            pub stopped_why: Option<String>,
            pub status: EngineStatus,
            /// The snapshot summary; `None`: as in the copy before.
            pub stores: Option<Vec<StoredSnapshot>>,
        }

        impl StatsWire {
            /// A copy of the engine's counters now.
            pub fn read(stats: &EngineStats) -> StatsWire {
                let status = stats.status.lock().map(|s| s.clone()).unwrap_or_default();
                StatsWire {
                    $($field: stats.$field.load(Ordering::Relaxed),)*
                    alive: stats.alive.load(Ordering::Acquire),
                    stopped_why: stats.stopped_why.lock().ok().and_then(|w| w.clone()),
                    stores: Some(status.stores.clone()),
                    status,
                }
            }

            /// Set the HTTP side's counters to these (the supervisor then
            /// adds the jobs it holds to `queued`).
            pub fn apply(self, stats: &EngineStats) {
                $(stats.$field.store(self.$field, Ordering::Relaxed);)*
                stats.alive.store(self.alive, Ordering::Release);
                if let Ok(mut w) = stats.stopped_why.lock() {
                    *w = self.stopped_why;
                }
                let mut status = self.status;
                let Ok(mut s) = stats.status.lock() else { return };
                match self.stores {
                    Some(stores) => {
                        status.stores = stores;
                        status.stores_at = Some(std::time::Instant::now());
                    }
                    None => {
                        status.stores = std::mem::take(&mut s.stores);
                        status.stores_at = s.stores_at;
                    }
                }
                *s = status;
            }
        }
    };
}

stats_wire! {
    queued: usize,
    running: usize,
    waiting: usize,
    kv_used: usize,
    kv_cells: usize,
    kv_bytes: u64,
    buffer_bytes: u64,
    shared_tokens: u64,
    steps: u64,
    step_rows: u64,
    multi_steps: u64,
    preempted: u64,
    max_step_us: u64,
    max_snapshot_step_us: u64,
    spec_drafted: u64,
    spec_accepted: u64,
    failed_steps: u64,
    decode_threads: usize,
    batch_threads: usize,
    decode_step_us: u64,
    others_milli_cores: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{FinishReason, SamplingParams, Timings, Usage};

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let run = ToEngine::Run {
            leader: Box::new(WireJob {
                arrival: 7,
                request: GenerateRequest::new(vec![1, 2, 3], SamplingParams::default(), 9),
            }),
            forks: vec![],
        };
        write_frame(&mut a, &run).await.unwrap();
        let done = FromEngine::Event {
            job: 7,
            event: Event::Finished {
                reason: FinishReason::StopSequence("\n\n".into()),
                usage: Usage {
                    prompt_tokens: 3,
                    cached_tokens: 1,
                    completion_tokens: 2,
                },
                timings: Timings::default(),
            },
        };
        write_frame(&mut a, &done).await.unwrap();
        drop(a);
        match read_frame::<_, ToEngine>(&mut b).await.unwrap() {
            Some(ToEngine::Run { leader, forks }) => {
                assert_eq!((leader.arrival, leader.request.prompt), (7, vec![1, 2, 3]));
                assert_eq!(leader.request.max_tokens, 9);
                assert!(forks.is_empty());
            }
            other => panic!("{other:?}"),
        }
        match read_frame::<_, FromEngine>(&mut b).await.unwrap() {
            Some(FromEngine::Event {
                job: 7,
                event: Event::Finished { reason, usage, .. },
            }) => {
                assert_eq!(reason, FinishReason::StopSequence("\n\n".into()));
                assert_eq!(usage.cached_tokens, 1);
            }
            other => panic!("{other:?}"),
        }
        assert!(read_frame::<_, FromEngine>(&mut b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_oversized_or_torn_frame_is_an_error() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&(u32::MAX).to_le_bytes()).await.unwrap();
        assert!(read_frame::<_, FromEngine>(&mut b).await.is_err());
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&10u32.to_le_bytes()).await.unwrap();
        a.write_all(b"{\"Sh").await.unwrap();
        drop(a);
        assert!(read_frame::<_, FromEngine>(&mut b).await.is_err());
    }

    #[test]
    fn stats_cross_the_socket() {
        let engine = EngineStats::default();
        engine.kv_used.store(123, Ordering::Relaxed);
        engine.queued.store(2, Ordering::Relaxed);
        engine.spec_accepted.store(9, Ordering::Relaxed);
        engine.alive.store(true, Ordering::Release);
        let wire = StatsWire::read(&engine);
        let back: StatsWire = serde_json::from_slice(&serde_json::to_vec(&wire).unwrap()).unwrap();
        assert_eq!(back, wire);
        let http = EngineStats::default();
        back.apply(&http);
        assert_eq!(http.kv_used.load(Ordering::Relaxed), 123);
        assert_eq!(http.spec_accepted.load(Ordering::Relaxed), 9);
        assert_eq!(http.queued.load(Ordering::Relaxed), 2);
        assert!(http.alive.load(Ordering::Acquire));
    }
}
