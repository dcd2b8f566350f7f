//! `hearth cache list|show|clear`: inspect and clear the disk KV cache.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::disk::{now_secs, read_entry, DiskEntry};

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub action: CacheAction,
    /// The directory `hearth serve --kv-disk-dir` writes.
    #[arg(long, env = "HEARTH_KV_DISK_DIR", global = true)]
    pub kv_disk_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// One line per snapshot: tokens, size, hits, age, first line of text.
    List,
    /// One snapshot in full: its header and the start of its text.
    Show {
        /// File name, or a unique prefix of it.
        name: String,
    },
    /// Remove every snapshot.
    Clear,
}

fn entries(dir: &PathBuf) -> anyhow::Result<Vec<Result<DiskEntry, (PathBuf, String)>>> {
    let mut out = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let path = item?.path();
        if path.extension().and_then(|e| e.to_str()) == Some("kv") {
            out.push(read_entry(&path).map_err(|e| (path, e)));
        }
    }
    out.sort_by_key(|e| std::cmp::Reverse(e.as_ref().map(|e| e.header.last_used).unwrap_or(0)));
    Ok(out)
}

fn age(secs: u64) -> String {
    let d = now_secs().saturating_sub(secs);
    match d {
        0..=119 => format!("{d}s"),
        120..=7199 => format!("{}m", d / 60),
        7200..=172_799 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86_400),
    }
}

fn first_line(e: &DiskEntry) -> String {
    let text = String::from_utf8_lossy(e.seq.text());
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    line.chars().take(60).collect()
}

pub fn run(args: CacheArgs) -> anyhow::Result<()> {
    let dir = args
        .kv_disk_dir
        .ok_or_else(|| anyhow::anyhow!("--kv-disk-dir DIR is required"))?;
    if !dir.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    match args.action {
        CacheAction::List => {
            let all = entries(&dir)?;
            println!(
                "{:<35} {:>8} {:>9} {:>5} {:>6}  text",
                "file", "tokens", "MiB", "hits", "used"
            );
            let (mut n, mut bytes) = (0, 0u64);
            for e in &all {
                match e {
                    Ok(e) => {
                        n += 1;
                        bytes += e.header.file_len();
                        let name = e
                            .path
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        println!(
                            "{name:<35} {:>8} {:>9.1} {:>5} {:>6}  {}",
                            e.header.token_count,
                            e.header.file_len() as f64 / 1048576.0,
                            e.header.hits,
                            age(e.header.last_used),
                            first_line(e)
                        );
                    }
                    Err((path, why)) => println!("{:<35} invalid: {why}", path.display()),
                }
            }
            println!("{n} snapshots, {:.1} MiB", bytes as f64 / 1048576.0);
        }
        CacheAction::Show { name } => {
            let all: Vec<DiskEntry> = entries(&dir)?.into_iter().filter_map(Result::ok).collect();
            let found: Vec<&DiskEntry> = all
                .iter()
                .filter(|e| {
                    e.path
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&name))
                })
                .collect();
            let e = match found.as_slice() {
                [one] => *one,
                [] => anyhow::bail!("no snapshot named {name}"),
                _ => anyhow::bail!("{name} matches {} snapshots", found.len()),
            };
            let h = &e.header;
            println!("file:        {}", e.path.display());
            println!("format:      version {}", h.version);
            println!("model:       {}", hex::encode(h.model));
            println!("context:     {} tokens", h.n_ctx);
            println!("tokens:      {}", h.token_count);
            println!(
                "size:        {} bytes (state {} bytes)",
                h.file_len(),
                h.state_len
            );
            println!("created:     {} ago", age(h.created));
            println!("last used:   {} ago", age(h.last_used));
            println!("hits:        {}", h.hits);
            println!("checksum:    {}", hex::encode(h.checksum));
            let text = String::from_utf8_lossy(e.seq.text());
            let head: String = text.chars().take(2000).collect();
            println!(
                "text ({} bytes):\n{head}{}",
                e.seq.text().len(),
                if text.len() > head.len() {
                    "\n[...]"
                } else {
                    ""
                }
            );
        }
        CacheAction::Clear => {
            let mut n = 0;
            for item in std::fs::read_dir(&dir)? {
                let path = item?.path();
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if path.extension().and_then(|e| e.to_str()) == Some("kv")
                    || name.contains(".kv.tmp-")
                {
                    std::fs::remove_file(&path)?;
                    n += 1;
                }
            }
            println!("removed {n} snapshot files from {}", dir.display());
        }
    }
    Ok(())
}
