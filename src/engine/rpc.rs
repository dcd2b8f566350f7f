//! Serving a model spread over several machines with llama.cpp's RPC
//! backend: `hearth rpc-worker` on each machine that lends its devices,
//! `hearth serve --rpc HOST:PORT,...` on the one that serves.
//!
//! llama.cpp ends the process when a worker cannot be reached (at load,
//! or mid-step when one goes away). So before it connects, the engine
//! waits until every worker accepts connections: a restarted engine
//! process (after a worker died under it) waits as long as it takes, and
//! the server answers `/health` with what it waits for meanwhile.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tracing::{info, warn};

use super::llama::rpc;

/// How often a wait says what it waits for.
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Check `HOST:PORT` (a name, an IPv4 address, or `[v6]:PORT`) and return
/// it as given.
pub fn parse_endpoint(s: &str) -> Result<String, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not HOST:PORT"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(s.to_string()),
        _ => Err(format!("{s:?} has no valid port (1-65535)")),
    }
}

/// Whether a worker bound to `host` is reachable from this machine alone.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why `endpoint` is not accepting connections now (None: it is).
fn unreachable(endpoint: &str) -> Option<String> {
    let addrs: Vec<SocketAddr> = match endpoint.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => return Some(e.to_string()),
    };
    let mut why = "no address".to_string();
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(_) => return None,
            Err(e) => why = e.to_string(),
        }
    }
    Some(why)
}

/// Wait until every endpoint accepts connections, telling `report` what
/// it waits for now and then; gives up after `patience` (None: never).
pub fn wait_for_workers(
    endpoints: &[String],
    patience: Option<Duration>,
    report: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let started = Instant::now();
    let mut reported: Option<Instant> = None;
    loop {
        let missing: Vec<(String, String)> = endpoints
            .iter()
            .filter_map(|e| unreachable(e).map(|why| (e.clone(), why)))
            .collect();
        let Some((endpoint, why)) = missing.first() else {
            return Ok(());
        };
        let what = format!(
            "waiting for RPC worker {endpoint} ({why}){}",
            if missing.len() > 1 {
                format!(" and {} more", missing.len() - 1)
            } else {
                String::new()
            }
        );
        if patience.is_some_and(|p| started.elapsed() >= p) {
            return Err(format!(
                "cannot reach RPC worker {endpoint} ({why}) after {} s: start `hearth rpc-worker \
                 --host HOST --port PORT` there, or check --rpc",
                started.elapsed().as_secs()
            ));
        }
        if reported.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
            report(&what);
            reported = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Wait for the workers at `endpoints`, then register their devices, so
/// the model loaded next spreads its layers over them.
pub fn connect(
    endpoints: &[String],
    patience: Option<Duration>,
    report: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    wait_for_workers(endpoints, patience, report).map_err(anyhow::Error::msg)?;
    let devices = rpc::add_servers(endpoints)?;
    for (endpoint, names) in endpoints.iter().zip(&devices) {
        info!(worker = %endpoint, devices = %names.join(","), "RPC worker connected");
    }
    Ok(())
}

/// `hearth rpc-worker`: serve this machine's devices until killed.
pub fn run_worker(args: &crate::config::RpcWorkerArgs) -> anyhow::Result<()> {
    let endpoint = if args.host.contains(':') && !args.host.starts_with('[') {
        format!("[{}]:{}", args.host, args.port)
    } else {
        format!("{}:{}", args.host, args.port)
    };
    if !is_loopback(&args.host) {
        warn!(
            "RPC worker on {endpoint}: llama.cpp's RPC protocol has no authentication, so anyone \
             who can reach this address may use this machine's devices and memory; keep it on a \
             network you trust"
        );
    }
    let threads = match args.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    };
    if let Some(dir) = &args.cache_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    info!(%endpoint, threads, "RPC worker starting");
    rpc::serve_worker(&endpoint, threads, args.cache_dir.as_deref())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("127.0.0.1:50052").unwrap(),
            "127.0.0.1:50052"
        );
        assert!(parse_endpoint("gpu-box:1").is_ok());
        assert!(parse_endpoint("[::1]:8").is_ok());
        assert!(parse_endpoint("127.0.0.1").is_err());
        assert!(parse_endpoint(":50052").is_err());
        assert!(parse_endpoint("h:0").is_err());
        assert!(parse_endpoint("h:70000").is_err());
        assert!(is_loopback("127.0.0.1") && is_loopback("::1") && is_loopback("[::1]"));
        assert!(is_loopback("localhost"));
        assert!(!is_loopback("0.0.0.0") && !is_loopback("192.168.1.4") && !is_loopback("box"));
    }

    #[test]
    fn a_worker_that_is_not_there_is_waited_for_then_refused() {
        // A port nothing listens on: bind one, note it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut said = Vec::new();
        let err = wait_for_workers(
            &[format!("127.0.0.1:{port}")],
            Some(Duration::from_millis(500)),
            &mut |m| said.push(m.to_string()),
        )
        .unwrap_err();
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(said[0].starts_with("waiting for RPC worker"), "{said:?}");
        // One that listens is there at once.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let there = format!("127.0.0.1:{}", l.local_addr().unwrap().port());
        assert!(wait_for_workers(&[there], Some(Duration::ZERO), &mut |_| {}).is_ok());
    }
}
