//! The engine process's end of the socket: jobs from the supervisor go to
//! the engine as if the HTTP side had submitted them here, and every job's
//! events go back, tagged with its arrival number, behind the counters
//! they follow.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::{encode, read_frame, write_frame, FromEngine, StatsWire, ToEngine, WireJob};
use crate::engine::{CancelFlag, EngineError, EngineHandle, EngineStats, Event, Job};

/// Counters go out at least this often while anything changes (the
/// engine refreshes them once a step).
const STATS_EVERY: Duration = Duration::from_millis(20);
/// How long an event waits for the status copy to show what it means: the
/// engine refreshes it when the step that sent the event ends, which on a
/// busy machine (snapshots taken at a prompt's end, four prompts ending in
/// one step) can be well past 50 ms.
const SETTLE_LIMIT: Duration = Duration::from_secs(1);

/// Cancel flags of the jobs the engine holds, by arrival number.
type Flags = Arc<Mutex<HashMap<u64, CancelFlag>>>;

/// The engine process's connection to its supervisor, made before the
/// engine loads so the wait for RPC workers can be reported.
pub struct Link(std::os::unix::net::UnixStream);

impl Link {
    pub fn connect(socket: &Path) -> anyhow::Result<Link> {
        let stream = std::os::unix::net::UnixStream::connect(socket)
            .with_context(|| format!("cannot reach the supervisor at {}", socket.display()))?;
        Ok(Link(stream))
    }

    /// Tell the supervisor what the engine process waits for; false when
    /// the server has gone.
    pub fn starting(&mut self, what: &str) -> bool {
        self.send(&FromEngine::Starting(what.to_string()))
    }

    /// Tell the supervisor why the engine cannot load, before the process
    /// ends (and its end closes the link); false when it could not be told.
    pub fn cannot_start(&mut self, why: &anyhow::Error) -> bool {
        self.send(&FromEngine::CannotStart(format!("{why:#}")))
    }

    fn send(&mut self, msg: &FromEngine) -> bool {
        use std::io::Write as _;
        encode(msg)
            .and_then(|frame| self.0.write_all(&frame))
            .is_ok()
    }
}

/// Serve the supervisor over `link` until it says shut down (the KV cache
/// saved: `Ok`) or goes away, or until the engine thread stops by itself
/// (an error: the supervisor restarts the process).
pub fn serve(handle: EngineHandle, link: Link) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(bridge(handle, link))
}

async fn bridge(handle: EngineHandle, link: Link) -> anyhow::Result<()> {
    link.0.set_nonblocking(true)?;
    let stream = UnixStream::from_std(link.0)?;
    let (mut rd, mut wr) = stream.into_split();
    let (out, mut outgoing) = mpsc::unbounded_channel::<FromEngine>();
    let flags: Flags = Arc::default();
    // The first frame, then the counters.
    let ready = FromEngine::Ready {
        n_ctx: handle.n_ctx(),
        pid: std::process::id(),
    };
    write_frame(&mut wr, &ready).await?;
    let mut last_sent = StatsWire::read(handle.stats());
    write_frame(&mut wr, &FromEngine::Stats(Box::new(last_sent.clone()))).await?;
    let reader = {
        let (handle, out, flags) = (handle.clone(), out.clone(), flags.clone());
        let shutting = Arc::new(AtomicBool::new(false));
        tokio::spawn(async move {
            loop {
                match read_frame::<_, ToEngine>(&mut rd).await {
                    Ok(Some(ToEngine::Run { leader, forks })) => {
                        let job = take_job(*leader, forks, &out, &flags, &handle, &shutting);
                        handle.run(Box::new(job));
                    }
                    Ok(Some(ToEngine::Cancel(arrival))) => {
                        if let Some(flag) = flags.lock().ok().and_then(|f| f.get(&arrival).cloned())
                        {
                            flag.cancel();
                        }
                    }
                    Ok(Some(ToEngine::Persist(id))) => {
                        let (handle, out) = (handle.clone(), out.clone());
                        tokio::spawn(async move {
                            let tokens = handle.persist().await;
                            let _ = out.send(FromEngine::Persisted { id, tokens });
                        });
                    }
                    Ok(Some(ToEngine::Shutdown)) => {
                        shutting.store(true, Ordering::Release);
                        // Cancellations keep coming while the engine ends
                        // its last steps.
                        let (handle, out) = (handle.clone(), out.clone());
                        tokio::spawn(async move {
                            handle.shutdown().await;
                            let _ = out.send(FromEngine::ShutDown);
                        });
                    }
                    Ok(None) => return,
                    Err(err) => {
                        tracing::error!(cause = %err, "the supervisor's socket failed");
                        return;
                    }
                }
            }
        })
    };
    drop(out);
    let mut reader = reader;
    let mut tick = tokio::time::interval(STATS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dead_since: Option<Instant> = None;
    // Jobs whose first text has gone out.
    let mut decoding: HashSet<u64> = HashSet::new();
    loop {
        tokio::select! {
            msg = outgoing.recv() => {
                let Some(msg) = msg else { break };
                let shut = matches!(msg, FromEngine::ShutDown);
                let mut edge = matches!(
                    &msg,
                    FromEngine::Event {
                        event: Event::Started { .. } | Event::Finished { .. } | Event::Failed(_),
                        ..
                    }
                );
                match &msg {
                    FromEngine::Event { job, event: Event::Finished { .. } | Event::Failed(_) } => {
                        // A job's end is sent in the middle of a step and
                        // counted when the step ends: wait for that refresh,
                        // so a client that reads /metrics after its reply
                        // never sees the job still running.
                        decoding.remove(job);
                        settled(handle.stats(), *job, false, SETTLE_LIMIT).await;
                    }
                    FromEngine::Event { job, event: Event::Text(_) } if decoding.insert(*job) => {
                        // Its first text: likewise, a client that has it
                        // sees its sequence decoding on /slots.
                        settled(handle.stats(), *job, true, SETTLE_LIMIT).await;
                        edge = true;
                    }
                    _ => {}
                }
                if edge {
                    send_stats(&mut wr, &handle, &mut last_sent, true).await?;
                }
                write_frame(&mut wr, &msg).await?;
                if shut {
                    return Ok(());
                }
            }
            _ = tick.tick() => {
                send_stats(&mut wr, &handle, &mut last_sent, false).await?;
                if !handle.is_alive() {
                    // The engine thread stopped by itself (a panic outside a
                    // step): give its last events a moment to go out, then
                    // end the process so the supervisor starts a new one.
                    let since = *dead_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= Duration::from_millis(300) {
                        let why = handle
                            .stats()
                            .stopped_why
                            .lock()
                            .ok()
                            .and_then(|w| w.clone())
                            .unwrap_or_default();
                        anyhow::bail!("the engine stopped: {why}");
                    }
                }
            }
            _ = &mut reader => {
                tracing::info!("the server process has gone: the engine process exits");
                return Ok(());
            }
        }
    }
    Ok(())
}

/// A job from the wire with channels of its own; a task forwards each
/// member's events until its last one.
fn take_job(
    leader: WireJob,
    forks: Vec<WireJob>,
    out: &mpsc::UnboundedSender<FromEngine>,
    flags: &Flags,
    handle: &EngineHandle,
    shutting: &Arc<AtomicBool>,
) -> Job {
    let make = |wire: WireJob| {
        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
        let cancel = CancelFlag::default();
        if let Ok(mut f) = flags.lock() {
            f.insert(wire.arrival, cancel.clone());
        }
        let (out, flags, arrival) = (out.clone(), flags.clone(), wire.arrival);
        let (handle, shutting) = (handle.clone(), shutting.clone());
        tokio::spawn(async move {
            let mut started = false;
            let mut ended = false;
            while let Some(event) = rx.recv().await {
                started |= matches!(event, Event::Started { .. });
                ended = matches!(event, Event::Finished { .. } | Event::Failed(_));
                // Refused by an engine thread that had already died (it
                // never held the job: a job it held when it died fails,
                // as it may be what killed it).
                let refused = matches!(event, Event::Failed(EngineError::Stopped));
                if refused && !started && lost_with_engine(&handle, &shutting).await {
                    // The supervisor offers it to the next engine process.
                    break;
                }
                let _ = out.send(FromEngine::Event {
                    job: arrival,
                    event,
                });
                if ended {
                    break;
                }
            }
            if !ended {
                // Dropped without an ending (a panic took it, or it was
                // abandoned): the supervisor must not offer it again.
                let _ = out.send(FromEngine::Event {
                    job: arrival,
                    event: Event::Failed(EngineError::Crashed(
                        "the engine dropped this request".into(),
                    )),
                });
            }
            if let Ok(mut f) = flags.lock() {
                f.remove(&arrival);
            }
        });
        Job {
            arrival: wire.arrival,
            request: wire.request,
            events: tx,
            cancel,
            span: tracing::info_span!("job", arrival = wire.arrival),
            forks: Vec::new(),
        }
    };
    let mut job = make(leader);
    job.forks = forks.into_iter().map(make).collect();
    job
}

/// Whether a job that ended before it started was lost with the engine
/// (its thread died: this process is about to end) rather than ended for
/// a reason of its own, or by a shutdown the supervisor asked for.
async fn lost_with_engine(handle: &EngineHandle, shutting: &AtomicBool) -> bool {
    // A panic fails the jobs it holds before it marks the engine stopped.
    let until = Instant::now() + Duration::from_millis(500);
    while handle.is_alive() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    !handle.is_alive() && !shutting.load(Ordering::Acquire)
}

/// Wait until the engine's status copy was made after the step that sent
/// an event of job `arrival` (the step is counted before its sequences
/// advance) and shows the job decoding (`decoding`) or on no sequence at
/// all (not), for at most `limit`. A job admitted and prefilled in one step
/// is on no sequence in the copy made before that step, so the step count
/// is what tells that copy from the one after.
async fn settled(stats: &EngineStats, arrival: u64, decoding: bool, limit: Duration) {
    let until = Instant::now() + limit;
    let step = stats.steps.load(Ordering::Relaxed);
    let pending = || {
        stats
            .status
            .lock()
            .map(|s| {
                s.steps < step
                    || s.slots
                        .iter()
                        .find(|slot| slot.job == Some(arrival))
                        .is_some_and(|slot| !decoding || slot.state != "decode")
            })
            .unwrap_or(false)
    };
    while pending() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Send the counters when they changed since the last copy (or always,
/// `force`, before an event that moves them).
async fn send_stats(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    handle: &EngineHandle,
    last_sent: &mut StatsWire,
    force: bool,
) -> anyhow::Result<()> {
    let now = StatsWire::read(handle.stats());
    if force || now != *last_sent {
        let mut wire = now.clone();
        if wire.stores == last_sent.stores {
            // The snapshot summary changes once a second at most.
            wire.stores = None;
        }
        write_frame(wr, &FromEngine::Stats(Box::new(wire))).await?;
        *last_sent = now;
    }
    Ok(())
}
