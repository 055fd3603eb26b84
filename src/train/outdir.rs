//! The output folder of a training run, prepared before any work by [`prepare_output_dir`]:
//!
//! 1. **Writable.** [`check_writable_dir`] runs first, so an unwritable folder is found before
//!    the model is loaded, not after the last step.
//! 2. **Locked.** [`OutputLock`] holds `out/.candle-peft.lock` while the run writes there. The
//!    lock file is created whole (written under a private name, then hard-linked into place, which
//!    fails when the name exists, as `create_new` does) and records the holder's process id, its
//!    start time and host. A second run into the same folder is refused with an error naming the
//!    folder and the holder. A lock whose process is gone (killed, crashed) is stale: it is
//!    detected by the process id and start time, and reclaimed. Dropping the lock removes the
//!    file (and the folder, when the lock created it and it is still empty).
//! 3. **No other run's checkpoints.** A fresh run refuses a folder that holds `checkpoint-<step>`
//!    folders (another run's: resuming it would pick them up) unless `overwrite` is set, which
//!    removes them. A run that resumes from this folder (or from one of its checkpoints) continues
//!    it; [`TrainConfig::run_identity`](super::TrainConfig::run_identity) then makes sure the
//!    checkpoint belongs to the same run.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::checkpoint::{CHECKPOINT_PREFIX, checkpoint_dirs};
use crate::error::{PeftError, Result};
use crate::io::atomic::check_writable_dir;

/// Name of the lock file inside a locked output folder.
pub const LOCK_FILE: &str = ".candle-peft.lock";

/// Checks that `out` is writable, locks it, and makes sure it holds no other run's checkpoints
/// (see the module docs). `resume_from` is the run's resume source, if any; `overwrite`
/// allows removing an earlier run's checkpoints. Hold the returned lock until the run's last
/// write.
pub fn prepare_output_dir(
    out: &Path,
    resume_from: Option<&Path>,
    overwrite: bool,
) -> Result<OutputLock> {
    check_writable_dir(out)?;
    let lock = OutputLock::acquire(out)?;
    let existing = checkpoint_dirs(out)?;
    let continues = resume_from.is_some_and(|r| inside(r, out));
    if continues && overwrite {
        return Err(PeftError::config(
            "overwrite",
            format!(
                "the run resumes from {} and overwriting would remove that checkpoint; give \
                 one of the two",
                out.display()
            ),
        ));
    }
    if existing.is_empty() || continues {
        return Ok(lock);
    }
    if !overwrite {
        let names: Vec<String> = existing
            .iter()
            .take(4)
            .map(|(_, p)| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let more = if existing.len() > names.len() {
            format!(" and {} more", existing.len() - names.len())
        } else {
            String::new()
        };
        return Err(PeftError::config(
            "out",
            format!(
                "{} holds checkpoints of another run ({}{more}); resume that run (--resume), \
                 remove them (--overwrite), or write elsewhere",
                out.display(),
                names.join(", ")
            ),
        ));
    }
    for (_, dir) in existing {
        fs::remove_dir_all(&dir).map_err(|e| PeftError::io(&dir, e))?;
    }
    Ok(lock)
}

/// Whether `path` is `dir` or directly inside it (a checkpoint of `dir`).
fn inside(path: &Path, dir: &Path) -> bool {
    let canon = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (path, dir) = (canon(path), canon(dir));
    path == dir
        || (path.parent() == Some(dir.as_path())
            && path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(CHECKPOINT_PREFIX)))
}

/// The lock on an output folder; dropping it releases the folder. See the module docs.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    holder: String,
    /// The folder, when this lock created it (removed on release if still empty).
    created: Option<PathBuf>,
}

impl OutputLock {
    /// Locks `dir` (created if missing) for this process, reclaiming a stale lock; an error
    /// names the folder and the process that holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let created = (!dir.exists()).then(|| dir.to_path_buf());
        fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let holder = Holder::me().to_string();
        // A few rounds: each failed round removed a stale lock or lost a race to one.
        for _ in 0..4 {
            if try_create(&path, &holder)? {
                return Ok(Self {
                    path,
                    holder,
                    created,
                });
            }
            let Ok(text) = fs::read_to_string(&path) else {
                continue; // released meanwhile
            };
            match Holder::parse(&text) {
                Some(h) if h.is_alive() => {
                    return Err(PeftError::io(
                        &path,
                        std::io::Error::new(
                            std::io::ErrorKind::WouldBlock,
                            format!(
                                "{} is in use by another run ({}); wait for it to finish or \
                                 write elsewhere (if that process is gone, remove this lock \
                                 file)",
                                dir.display(),
                                h.describe()
                            ),
                        ),
                    ));
                }
                _ => {
                    // Stale (its process is gone) or unreadable: reclaim it, unless another
                    // process replaced it meanwhile.
                    if fs::read_to_string(&path).is_ok_and(|t| t == text) {
                        let _ = fs::remove_file(&path);
                    }
                }
            }
        }
        Err(PeftError::io(
            &path,
            std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!(
                    "could not lock {}: other runs keep taking it",
                    dir.display()
                ),
            ),
        ))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        if fs::read_to_string(&self.path).is_ok_and(|t| t == self.holder) {
            let _ = fs::remove_file(&self.path);
        }
        if let Some(dir) = &self.created {
            let _ = fs::remove_dir(dir); // only succeeds when empty
        }
    }
}

/// Creates the lock file holding `holder`, whole, unless it exists (then `Ok(false)`).
fn try_create(path: &Path, holder: &str) -> Result<bool> {
    let private = path.with_file_name(format!("{LOCK_FILE}.{}", std::process::id()));
    let write = |p: &Path| -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(p)?;
        f.write_all(holder.as_bytes())?;
        f.sync_all()
    };
    let _ = fs::remove_file(&private);
    write(&private).map_err(|e| PeftError::io(&private, e))?;
    let linked = fs::hard_link(&private, path);
    let _ = fs::remove_file(&private);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        // A filesystem without hard links: create the file in place.
        Err(_) => match write(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(PeftError::io(path, e)),
        },
    }
}

/// Who holds a lock: process id, its start time (clock ticks after boot, Linux; 0 elsewhere)
/// and host name.
#[derive(Debug, PartialEq, Eq)]
struct Holder {
    pid: u32,
    start: u64,
    host: String,
}

impl Holder {
    fn me() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            start: process_start(pid).unwrap_or(0),
            host: host_name(),
        }
    }

    fn parse(text: &str) -> Option<Self> {
        let mut pid = None;
        let mut start = 0;
        let mut host = String::new();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("pid", v)) => pid = v.trim().parse().ok(),
                Some(("start", v)) => start = v.trim().parse().ok()?,
                Some(("host", v)) => host = v.trim().to_string(),
                _ => {}
            }
        }
        Some(Self {
            pid: pid?,
            start,
            host,
        })
    }

    /// Whether the holding process still runs. A holder on another host cannot be checked and
    /// counts as alive.
    fn is_alive(&self) -> bool {
        if self.host != host_name() {
            return true;
        }
        if !pid_exists(self.pid) {
            return false;
        }
        // A reused process id: another process now, started at another time.
        match (self.start, process_start(self.pid)) {
            (0, _) | (_, None) => true,
            (saved, Some(now)) => saved == now,
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "pid={}", self.pid)?;
        writeln!(f, "start={}", self.start)?;
        writeln!(f, "host={}", self.host)
    }
}

impl Holder {
    /// `process 1234 on host`, for messages.
    fn describe(&self) -> String {
        format!("process {} on {}", self.pid, self.host)
    }
}

/// The start time of process `pid` in clock ticks after boot (`/proc/<pid>/stat` field 22).
fn process_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: fields follow the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(unix)]
fn pid_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn pid_exists(_pid: u32) -> bool {
    true
}

fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}
