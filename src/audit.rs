//! The audit log (SPEC §13): one JSON line per decision, written by a thread of its own so that a
//! slow or failing disk never holds a request. A request hands its line over a bounded channel
//! and goes on; the writer appends, and reopens the file when it has been moved away (log
//! rotation). A line that cannot be handed over or written is counted
//! (`tokenproxy_audit_failures_total`) and logged, never retried at the request's expense.
//!
//! The writer wakes for the first line, then lets lines gather for a few milliseconds before it
//! waits again: a writer woken for every line would cost every request a thread wake-up (most of
//! the audit's cost, measured in bench/README.md). Shutdown flushes what is waiting.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::callers::config::AuditTarget;

/// Lines waiting for the writer at most; beyond this a line is dropped and counted.
const BACKLOG: usize = 64 * 1024;
/// How often the writer checks, when idle, that its file is still the one at the path.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long lines gather after a write before the writer looks again: the most a line waits.
const GATHER: Duration = Duration::from_millis(5);
/// At most one log line about failures in this long.
const COMPLAIN_EVERY: Duration = Duration::from_secs(10);

/// Where a request's audit line goes.
#[derive(Clone)]
pub struct Audit {
    lines: SyncSender<Message>,
}

enum Message {
    /// One JSON line, newline included (serde_json writes UTF-8 only).
    Line(Vec<u8>),
    /// Answered once every line sent before it is written.
    Flush(SyncSender<()>),
}

/// One decision, as its line says it. Never a token, secret or query.
#[derive(Serialize)]
pub struct Line<'a> {
    pub time: String,
    pub caller: Option<&'a str>,
    pub provider: Option<&'a str>,
    /// The account's fingerprint.
    pub account: Option<String>,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub decision: &'static str,
    pub rule: Rule<'a>,
    pub status: u16,
    pub retried: bool,
    pub duration_us: u64,
    pub listener: &'a str,
}

/// The rule that allowed a request (its index), or why there was none.
#[derive(Serialize)]
#[serde(untagged)]
pub enum Rule<'a> {
    Index(usize),
    Reason(&'a str),
}

impl Audit {
    /// Starts the writer. The file is opened (created `0600`) now, so that a path that cannot
    /// be written stops the start.
    pub fn start(target: &AuditTarget) -> anyhow::Result<Audit> {
        let sink = match target {
            AuditTarget::Stdout => Sink::Stdout,
            AuditTarget::File(path) => {
                let file = open(path).map_err(|e| anyhow::anyhow!("audit.file {}: {e}", path.display()))?;
                Sink::File { path: path.clone(), file }
            }
        };
        let (lines, receiver) = std::sync::mpsc::sync_channel(BACKLOG);
        std::thread::Builder::new()
            .name("tokenproxy-audit".into())
            .spawn(move || write_lines(sink, receiver))?;
        Ok(Audit { lines })
    }

    /// Hands a line to the writer; never waits.
    pub fn record(&self, line: &Line<'_>) {
        let mut text = Vec::with_capacity(256);
        if serde_json::to_writer(&mut text, line).is_err() {
            return;
        }
        text.push(b'\n');
        match self.lines.try_send(Message::Line(text)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => failed("backlog_full", 1),
            Err(TrySendError::Disconnected(_)) => failed("writer_gone", 1),
        }
    }

    /// Waits (at most `limit`) until every line recorded so far is written: at shutdown.
    pub fn flush(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let (done, written) = std::sync::mpsc::sync_channel(1);
        let mut flush = Message::Flush(done);
        // A full backlog drains as the writer writes; a disk that hangs must not hold the exit.
        loop {
            match self.lines.try_send(flush) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    flush = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        written.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok()
    }
}

/// The time of a line: RFC 3339, UTC, to the microsecond (`2026-12-05T12:00:00.123456Z`).
/// The date and time of day are formatted once a second; the microseconds are appended.
pub fn now() -> String {
    use std::cell::RefCell;
    thread_local! {
        static SECOND: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
    }
    let now = time::OffsetDateTime::now_utc();
    SECOND.with_borrow_mut(|(second, prefix)| {
        if *second != now.unix_timestamp() {
            let format = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
            *prefix = now.format(&format).unwrap_or_default();
            *second = now.unix_timestamp();
        }
        format!("{prefix}.{:06}Z", now.microsecond())
    })
}

fn failed(reason: &'static str, lines: u64) {
    metrics::counter!("tokenproxy_audit_failures_total", "reason" => reason).increment(lines);
    static LAST: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_none_or(|at| at.elapsed() >= COMPLAIN_EVERY) {
        *last = Some(Instant::now());
        tracing::error!(reason, "audit lines are being lost (tokenproxy_audit_failures_total counts them)");
    }
}

enum Sink {
    Stdout,
    File { path: PathBuf, file: File },
}

fn open(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(path)
}

/// Whether `file` is still what `path` names (not moved away or deleted by a rotation).
fn still_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.ino() == named.ino() && open.dev() == named.dev(),
        _ => false,
    }
}

/// The writer: every line waiting is written at once; between lines, the file is checked.
fn write_lines(mut sink: Sink, lines: Receiver<Message>) {
    let mut checked = Instant::now();
    let mut flushed = Vec::new();
    loop {
        let first = match lines.recv_timeout(CHECK_EVERY) {
            Ok(Message::Line(line)) => Some(line),
            Ok(Message::Flush(done)) => {
                let _ = done.try_send(());
                continue;
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if let Sink::File { path, file } = &mut sink
            && (first.is_none() || checked.elapsed() >= CHECK_EVERY)
        {
            checked = Instant::now();
            if !still_at(file, path) {
                match open(path) {
                    Ok(reopened) => {
                        *file = reopened;
                        tracing::info!(path = %path.display(), "audit file reopened (it was moved away)");
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot reopen the audit file")
                    }
                }
            }
        }
        let Some(first) = first else { continue };
        let mut batch = first;
        while batch.len() < 256 * 1024 {
            match lines.try_recv() {
                Ok(Message::Line(line)) => batch.extend_from_slice(&line),
                Ok(Message::Flush(done)) => flushed.push(done),
                Err(_) => break,
            }
        }
        let written = match &mut sink {
            Sink::Stdout => std::io::stdout().lock().write_all(&batch),
            Sink::File { file, .. } => file.write_all(&batch),
        };
        if written.is_err() {
            failed("write", batch.iter().filter(|&&b| b == b'\n').count() as u64);
        }
        for done in flushed.drain(..) {
            let _ = done.try_send(());
        }
        if batch.len() < 256 * 1024 {
            std::thread::sleep(GATHER);
        }
    }
}
