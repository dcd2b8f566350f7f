//! The HTTP process's end: a supervisor thread that starts the engine
//! process, forwards the [`EngineHandle`]'s commands to it, routes its
//! events to each job's channel, and starts it again when it dies.
//!
//! What a death does: every job the engine had started ends with
//! [`EngineError::EngineLost`] (its stream with the protocol's error
//! event); jobs it had not started, and jobs that arrive meanwhile, wait
//! here and go to the next process. `/health` answers 503 with the reason
//! until the new process is ready. Three deaths within a minute are a
//! crash loop: no more restarts, and every job fails at once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixListener;
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::{read_frame, write_frame, FromEngine, StatsWire, ToEngine, WireJob};
use crate::engine::{Command, EngineError, EngineHandle, EngineStats, Event, Job, Model};

/// Deaths within [`CRASH_WINDOW`] that stop the restarts.
pub const CRASH_LOOP: usize = 3;
pub const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// The first restart's delay, doubled for each recent death.
const BACKOFF: Duration = Duration::from_millis(250);
/// How often the supervisor looks for clients that have gone.
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// How to start the engine process: this program, with these arguments
/// (the server's own; the socket's path goes in [`super::SOCKET_ENV`]).
#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl ChildSpec {
    /// This very process's program and arguments.
    pub fn this_process() -> std::io::Result<ChildSpec> {
        Ok(ChildSpec {
            program: std::env::current_exe()?,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

/// Start the engine process over `model` (the vocabulary the HTTP side
/// tokenizes with) and wait until it is ready. An engine process that
/// ends before it is ready (a model that does not fit, a bad file) is an
/// error, not a restart.
pub fn start(model: Arc<Model>, spec: ChildSpec) -> anyhow::Result<EngineHandle> {
    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    let stats = Arc::new(EngineStats::default());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<u32, String>>();
    let thread_stats = stats.clone();
    std::thread::Builder::new()
        .name("hearth-supervisor".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(err) => {
                    let _ = ready_tx.send(Err(err.to_string()));
                    return;
                }
            };
            let sup = Supervisor::new(spec, thread_stats);
            rt.block_on(sup.run(jobs_rx, ready_tx));
        })?;
    let n_ctx = ready_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the engine supervisor stopped"))?
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok(EngineHandle {
        jobs: jobs_tx,
        model,
        stats,
        n_ctx,
    })
}

/// One member of a job group as the engine process has it.
#[derive(Default)]
struct Member {
    done: bool,
    cancel_sent: bool,
}

/// A job (a leader and its forks) sent to the engine process.
struct Sent {
    job: Box<Job>,
    started: bool,
    members: HashMap<u64, Member>,
}

impl Sent {
    fn sender(&self, arrival: u64) -> Option<&mpsc::UnboundedSender<Event>> {
        std::iter::once(&*self.job)
            .chain(self.job.forks.iter())
            .find(|j| j.arrival == arrival)
            .map(|j| &j.events)
    }
}

/// How one engine process ended.
enum Ended {
    /// Shut down on request; answer this once it has exited.
    Shutdown(oneshot::Sender<()>),
    /// Every handle is gone: nothing more will come.
    Closed,
    Died(String),
}

struct Supervisor {
    spec: ChildSpec,
    stats: Arc<EngineStats>,
    /// Jobs sent to the running engine process, by the leader's arrival.
    sent: BTreeMap<u64, Sent>,
    /// Which group each member's arrival belongs to.
    group_of: HashMap<u64, u64>,
    /// Jobs waiting for an engine process, in arrival order.
    held: VecDeque<Box<Job>>,
    persists: HashMap<u64, oneshot::Sender<usize>>,
    next_persist: u64,
    deaths: VecDeque<Instant>,
    incarnation: u64,
    /// `queued` in the engine process's last copy of its counters.
    engine_queued: usize,
}

impl Supervisor {
    fn new(spec: ChildSpec, stats: Arc<EngineStats>) -> Self {
        Self {
            spec,
            stats,
            sent: BTreeMap::new(),
            group_of: HashMap::new(),
            held: VecDeque::new(),
            persists: HashMap::new(),
            next_persist: 0,
            deaths: VecDeque::new(),
            incarnation: 0,
            engine_queued: 0,
        }
    }

    async fn run(
        mut self,
        mut jobs: mpsc::UnboundedReceiver<Command>,
        ready: std::sync::mpsc::Sender<Result<u32, String>>,
    ) {
        let mut ready = Some(ready);
        loop {
            let ended = match self.launch(&mut jobs).await {
                Ok((child, wr, msgs, n_ctx)) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Ok(n_ctx));
                    }
                    self.serve(child, wr, msgs, &mut jobs).await
                }
                Err(why) if ready.is_some() => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Err(why));
                    }
                    return;
                }
                Err(why) => Ended::Died(why),
            };
            match ended {
                Ended::Shutdown(done) => {
                    self.stop("the engine was shut down");
                    let _ = done.send(());
                    return;
                }
                Ended::Closed => {
                    self.stop("the engine was shut down");
                    return;
                }
                Ended::Died(why) => {
                    if !self.after_death(&why, &mut jobs).await {
                        return;
                    }
                }
            }
        }
    }

    /// Start an engine process and wait for its `Ready`, holding the jobs
    /// that arrive meanwhile.
    async fn launch(
        &mut self,
        jobs: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Result<
        (
            Child,
            OwnedWriteHalf,
            mpsc::UnboundedReceiver<FromEngine>,
            u32,
        ),
        String,
    > {
        self.incarnation += 1;
        let path = std::env::temp_dir().join(format!(
            "hearth-engine-{}-{}.sock",
            std::process::id(),
            self.incarnation
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
        let mut cmd = tokio::process::Command::new(&self.spec.program);
        cmd.args(&self.spec.args)
            .env(super::SOCKET_ENV, &path)
            .kill_on_drop(true);
        if self.incarnation > 1 {
            // A restart waits for its RPC workers as long as it takes.
            cmd.env(super::RESTART_ENV, "1");
        }
        // Its own process group: a terminal's Ctrl-C reaches the server,
        // which shuts the engine down in order, not the engine directly.
        #[cfg(unix)]
        cmd.process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the engine process: {e}"))?;
        let pid = child.id().unwrap_or(0);
        let stats = self.stats.clone();
        let connected = async move {
            let (stream, _) = listener.accept().await?;
            let (mut rd, wr) = stream.into_split();
            let first = loop {
                match read_frame::<_, FromEngine>(&mut rd).await? {
                    Some(FromEngine::Starting(what)) => {
                        warn!(pid, "the engine process is {what}");
                        if let Ok(mut w) = stats.stopped_why.lock() {
                            *w = Some(format!("the engine process is starting: {what}"));
                        }
                    }
                    other => break other,
                }
            };
            if !matches!(first, Some(FromEngine::Ready { .. })) {
                return std::io::Result::Ok((rd, wr, first, None));
            }
            // Then its counters, so the server's first answers show them.
            let counters = read_frame::<_, FromEngine>(&mut rd).await?;
            std::io::Result::Ok((rd, wr, first, counters))
        };
        tokio::pin!(connected);
        let result = loop {
            tokio::select! {
                res = &mut connected => break res.map_err(|e| e.to_string()),
                status = child.wait() => {
                    // Why it could not start may still be in the socket,
                    // unread when its exit was seen: read it.
                    let said = tokio::time::timeout(Duration::from_secs(1), &mut connected).await;
                    let _ = std::fs::remove_file(&path);
                    return Err(match (said, status) {
                        (Ok(Ok((_, _, Some(FromEngine::CannotStart(why)), _))), _) => why,
                        (_, Ok(s)) => format!("the engine process {} before it was ready", describe(s)),
                        (_, Err(e)) => format!("the engine process could not be watched: {e}"),
                    });
                }
                cmd = jobs.recv() => match cmd {
                    Some(cmd) => self.hold(cmd),
                    None => break Err("the server stopped".into()),
                },
            }
        };
        let _ = std::fs::remove_file(&path);
        let (mut rd, wr, first, counters) = match result {
            Ok(parts) => parts,
            Err(e) => {
                let _ = child.kill().await;
                return Err(e);
            }
        };
        let n_ctx = match first {
            Some(FromEngine::Ready {
                n_ctx,
                pid: child_pid,
            }) => {
                if let Some(FromEngine::Stats(wire)) = counters {
                    self.take_counters(*wire);
                }
                self.stats.engine_pid.store(child_pid, Ordering::Relaxed);
                self.stats.alive.store(true, Ordering::Release);
                if let Ok(mut w) = self.stats.stopped_why.lock() {
                    *w = None;
                }
                n_ctx
            }
            other => {
                // It ends by itself once it has said why; give its stderr
                // the moment to say it too, then make sure.
                let ended = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                if !matches!(ended, Ok(Ok(_))) {
                    let _ = child.kill().await;
                }
                return Err(match (other, ended) {
                    (Some(FromEngine::CannotStart(why)), _) => why,
                    (_, Ok(Ok(s))) => {
                        format!("the engine process {} before it was ready", describe(s))
                    }
                    _ => "the engine process did not say it was ready".into(),
                });
            }
        };
        info!(pid, "engine process ready");
        let (tx, msgs) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = read_frame::<_, FromEngine>(&mut rd).await {
                if tx.send(msg).is_err() {
                    break;
                }
            }
        });
        Ok((child, wr, msgs, n_ctx))
    }

    /// Relay between the handle and one running engine process until it
    /// ends.
    async fn serve(
        &mut self,
        mut child: Child,
        mut wr: OwnedWriteHalf,
        mut msgs: mpsc::UnboundedReceiver<FromEngine>,
        jobs: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Ended {
        let held: Vec<Box<Job>> = self.held.drain(..).collect();
        for job in held {
            self.send_job(job, &mut wr).await;
        }
        let mut tick = tokio::time::interval(CANCEL_POLL);
        let mut shutting: Option<oneshot::Sender<()>> = None;
        loop {
            tokio::select! {
                msg = msgs.recv() => match msg {
                    Some(FromEngine::ShutDown) => {
                        let _ = child.wait().await;
                        return match shutting.take() {
                            Some(done) => Ended::Shutdown(done),
                            None => Ended::Closed,
                        };
                    }
                    Some(msg) => self.on_message(msg),
                    // The socket closed: the process is ending.
                    None => return self.ended(&mut child, msgs).await,
                },
                _ = child.wait() => return self.ended(&mut child, msgs).await,
                cmd = jobs.recv(), if shutting.is_none() => match cmd {
                    Some(Command::Run(job)) => self.send_job(job, &mut wr).await,
                    Some(Command::Persist(tx)) => {
                        self.next_persist += 1;
                        self.persists.insert(self.next_persist, tx);
                        let _ = write_frame(&mut wr, &ToEngine::Persist(self.next_persist)).await;
                    }
                    Some(Command::Shutdown(done)) => {
                        shutting = Some(done);
                        self.send_cancels(&mut wr).await;
                        let _ = write_frame(&mut wr, &ToEngine::Shutdown).await;
                    }
                    None => {
                        let _ = write_frame(&mut wr, &ToEngine::Shutdown).await;
                        let _ = child.wait().await;
                        return Ended::Closed;
                    }
                },
                _ = tick.tick() => self.send_cancels(&mut wr).await,
            }
        }
    }

    /// The engine process has gone: read what it sent before it went,
    /// then say why it ended.
    async fn ended(
        &mut self,
        child: &mut Child,
        mut msgs: mpsc::UnboundedReceiver<FromEngine>,
    ) -> Ended {
        let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
            Ok(Ok(status)) => describe(status),
            _ => {
                let _ = child.kill().await;
                "stopped answering and was killed".to_string()
            }
        };
        while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(1), msgs.recv()).await {
            self.on_message(msg);
        }
        Ended::Died(format!("the engine process {status}"))
    }

    fn on_message(&mut self, msg: FromEngine) {
        match msg {
            FromEngine::Stats(wire) => self.take_counters(*wire),
            FromEngine::Event { job, event } => self.route(job, event),
            FromEngine::Persisted { id, tokens } => {
                if let Some(tx) = self.persists.remove(&id) {
                    let _ = tx.send(tokens);
                }
            }
            FromEngine::Ready { .. }
            | FromEngine::Starting(_)
            | FromEngine::CannotStart(_)
            | FromEngine::ShutDown => {}
        }
    }

    fn route(&mut self, arrival: u64, event: Event) {
        let Some(&leader) = self.group_of.get(&arrival) else {
            return;
        };
        let Some(sent) = self.sent.get_mut(&leader) else {
            return;
        };
        let last = matches!(event, Event::Finished { .. } | Event::Failed(_));
        let starts = matches!(event, Event::Started { .. }) && !sent.started;
        if starts {
            sent.started = true;
        }
        if let Some(tx) = sent.sender(arrival) {
            let _ = tx.send(event);
        }
        if last {
            if let Some(m) = sent.members.get_mut(&arrival) {
                m.done = true;
            }
            if sent.members.values().all(|m| m.done) {
                let sent = self.sent.remove(&leader);
                for a in sent.iter().flat_map(|s| s.members.keys()) {
                    self.group_of.remove(a);
                }
            }
        }
        if starts || last {
            self.count_queued();
        }
    }

    fn take_counters(&mut self, wire: StatsWire) {
        self.engine_queued = wire.queued;
        wire.apply(&self.stats);
        self.count_queued();
    }

    /// The queue depth the HTTP side shows: jobs held here, and jobs
    /// sent but not started that the engine's last copy of its counters
    /// may not show yet (it counts a job as waiting once it takes it).
    fn count_queued(&self) {
        let unstarted = self.sent.values().filter(|s| !s.started).count();
        let in_engine = unstarted.saturating_sub(self.stats.waiting.load(Ordering::Relaxed));
        self.stats.queued.store(
            self.engine_queued.max(in_engine) + self.held.len(),
            Ordering::Relaxed,
        );
    }

    fn hold(&mut self, cmd: Command) {
        match cmd {
            Command::Run(job) => {
                self.held.push_back(job);
                self.count_queued();
            }
            Command::Persist(tx) => {
                let _ = tx.send(0);
            }
            Command::Shutdown(done) => {
                // No engine to save: stop here.
                self.fail_held(EngineError::Stopped);
                let _ = done.send(());
            }
        }
    }

    async fn send_job(&mut self, job: Box<Job>, wr: &mut OwnedWriteHalf) {
        if job.is_abandoned() && job.forks.iter().all(Job::is_abandoned) {
            return;
        }
        let wire = |j: &Job| WireJob {
            arrival: j.arrival,
            request: j.request.clone(),
        };
        let msg = ToEngine::Run {
            leader: Box::new(wire(&job)),
            forks: job.forks.iter().map(wire).collect(),
        };
        let members: HashMap<u64, Member> = std::iter::once(job.arrival)
            .chain(job.forks.iter().map(|f| f.arrival))
            .map(|a| (a, Member::default()))
            .collect();
        for &a in members.keys() {
            self.group_of.insert(a, job.arrival);
        }
        let leader = job.arrival;
        self.sent.insert(
            leader,
            Sent {
                job,
                started: false,
                members,
            },
        );
        self.count_queued();
        // A process that died mid-write is seen by `serve`, which puts
        // this job back in the queue with the others it had not started.
        let _ = write_frame(wr, &msg).await;
    }

    /// Tell the engine about clients that have gone.
    async fn send_cancels(&mut self, wr: &mut OwnedWriteHalf) {
        let mut gone = Vec::new();
        for sent in self.sent.values_mut() {
            for j in std::iter::once(&*sent.job).chain(sent.job.forks.iter()) {
                if let Some(m) = sent.members.get_mut(&j.arrival) {
                    if !m.done && !m.cancel_sent && j.is_abandoned() {
                        m.cancel_sent = true;
                        gone.push(j.arrival);
                    }
                }
            }
        }
        for arrival in gone {
            let _ = write_frame(wr, &ToEngine::Cancel(arrival)).await;
        }
    }

    /// After a death: end what had started, keep the rest, and wait out
    /// the backoff. False in a crash loop (everything failed, no restart).
    async fn after_death(
        &mut self,
        why: &str,
        jobs: &mut mpsc::UnboundedReceiver<Command>,
    ) -> bool {
        error!(cause = %why, "the engine process died");
        // Why first, so /health never reads a bare "stopped" between the two.
        self.set_why(why);
        self.stats.engine_pid.store(0, Ordering::Relaxed);
        self.stats.alive.store(false, Ordering::Release);
        let mut kept = Vec::new();
        for (_, sent) in std::mem::take(&mut self.sent) {
            if sent.started {
                for j in std::iter::once(&*sent.job).chain(sent.job.forks.iter()) {
                    if !sent.members.get(&j.arrival).is_some_and(|m| m.done) {
                        let _ = j
                            .events
                            .send(Event::Failed(EngineError::EngineLost(why.into())));
                    }
                }
            } else {
                kept.push(sent.job);
            }
        }
        self.group_of.clear();
        for tx in std::mem::take(&mut self.persists).into_values() {
            let _ = tx.send(0);
        }
        for job in kept.into_iter().rev() {
            self.held.push_front(job);
        }
        self.stats.running.store(0, Ordering::Relaxed);
        self.stats.waiting.store(0, Ordering::Relaxed);
        self.engine_queued = 0;
        self.count_queued();
        let now = Instant::now();
        self.deaths.push_back(now);
        while self
            .deaths
            .front()
            .is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW)
        {
            self.deaths.pop_front();
        }
        if self.deaths.len() >= CRASH_LOOP {
            let loop_why = format!(
                "the engine process died {} times within {} s (last: {why}); it is not restarted",
                self.deaths.len(),
                CRASH_WINDOW.as_secs()
            );
            error!("{loop_why}");
            self.set_why(&loop_why);
            self.fail_held(EngineError::EngineLost(why.into()));
            // Answer whatever comes from now on.
            while let Some(cmd) = jobs.recv().await {
                match cmd {
                    Command::Run(job) => {
                        fail_job(&job, EngineError::EngineLost(loop_why.clone()));
                    }
                    Command::Persist(tx) => {
                        let _ = tx.send(0);
                    }
                    Command::Shutdown(done) => {
                        let _ = done.send(());
                        return false;
                    }
                }
            }
            return false;
        }
        let delay = BACKOFF * (1 << (self.deaths.len() - 1)) as u32;
        self.set_why(&format!("{why}; restarting it"));
        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
        warn!(
            delay_ms = delay.as_millis() as u64,
            held = self.held.len(),
            "restarting the engine process"
        );
        let until = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                cmd = jobs.recv() => match cmd {
                    Some(Command::Shutdown(done)) => {
                        self.hold(Command::Shutdown(done));
                        return false;
                    }
                    Some(cmd) => self.hold(cmd),
                    None => return false,
                },
            }
        }
    }

    fn set_why(&self, why: &str) {
        if let Ok(mut w) = self.stats.stopped_why.lock() {
            *w = Some(why.to_string());
        }
    }

    fn fail_held(&mut self, err: EngineError) {
        for job in self.held.drain(..) {
            fail_job(&job, err.clone());
        }
        self.stats.queued.store(0, Ordering::Relaxed);
    }

    /// The engine is gone for good: fail what is left.
    fn stop(&mut self, why: &str) {
        self.stats.alive.store(false, Ordering::Release);
        self.stats.engine_pid.store(0, Ordering::Relaxed);
        self.set_why(why);
        for (_, sent) in std::mem::take(&mut self.sent) {
            for j in std::iter::once(&*sent.job).chain(sent.job.forks.iter()) {
                if !sent.members.get(&j.arrival).is_some_and(|m| m.done) {
                    let _ = j.events.send(Event::Failed(EngineError::Stopped));
                }
            }
        }
        self.fail_held(EngineError::Stopped);
    }
}

fn fail_job(job: &Job, err: EngineError) {
    for j in std::iter::once(job).chain(job.forks.iter()) {
        let _ = j.events.send(Event::Failed(err.clone()));
    }
}

/// How a process ended, in words: `exited with status 1`, `was killed by
/// signal 9 (SIGKILL)`.
pub fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let name = match sig {
                6 => " (SIGABRT)",
                9 => " (SIGKILL)",
                11 => " (SIGSEGV)",
                15 => " (SIGTERM)",
                _ => "",
            };
            return format!("was killed by signal {sig}{name}");
        }
    }
    match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => "ended".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn deaths_are_described_by_signal_or_status() {
        assert_eq!(
            describe(ExitStatus::from_raw(9)),
            "was killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe(ExitStatus::from_raw(6)),
            "was killed by signal 6 (SIGABRT)"
        );
        assert_eq!(
            describe(ExitStatus::from_raw(1 << 8)),
            "exited with status 1"
        );
    }
}
