//! Whole-folder atomic writes, and the writability checks commands run before any work.
//!
//! [`write_dir_atomic`] writes a folder as a temporary sibling `.<name>.tmp/` and then swaps it
//! into place. On Linux the swap is one `renameat2(RENAME_EXCHANGE)`, so a reader (or a kill at
//! any moment) sees the old folder or the new one, never a mix and never neither; where the
//! exchange is not available it is two renames through `.<name>.old/`, and a kill between them
//! leaves the complete old folder there and the complete new one in `.<name>.tmp/`. Entries of
//! the old folder that the new one does not write are carried over (hard links, or copies where
//! a link is not possible), as a save file by file would have kept them.
//!
//! [`check_writable_dir`] and [`check_writable_file`] find an unwritable output before a
//! command spends minutes on work whose result it cannot save. They create nothing that
//! stays: a probe file is created and removed in the nearest existing folder.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{PeftError, Result};

/// Writes the folder `dir` atomically as a whole: `write` fills a fresh temporary sibling,
/// which then replaces `dir` (see the module docs). On an error the temporary is removed and
/// `dir` is untouched.
pub fn write_dir_atomic(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let (parent, name) = parent_and_name(dir)?;
    fs::create_dir_all(&parent).map_err(|e| PeftError::io(&parent, e))?;
    if dir.exists() && !dir.is_dir() {
        return Err(not_a_folder(dir));
    }
    let tmp = parent.join(format!(".{name}.tmp"));
    remove_any(&tmp)?;
    fs::create_dir(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
    let done = write(&tmp).and_then(|()| {
        carry_over(dir, &tmp)?;
        replace_dir(&tmp, dir)
    });
    if done.is_err() && tmp.exists() {
        let _ = fs::remove_dir_all(&tmp);
    }
    done
}

/// Moves the complete folder `tmp` to `target`, replacing a folder already there as one step
/// where the platform allows (see the module docs). `tmp` and `target` must be siblings.
pub fn replace_dir(tmp: &Path, target: &Path) -> Result<()> {
    if !target.exists() {
        return fs::rename(tmp, target).map_err(|e| PeftError::io(target, e));
    }
    if !target.is_dir() {
        return Err(not_a_folder(target));
    }
    if exchange(tmp, target) {
        // `tmp` now holds the old folder.
        return fs::remove_dir_all(tmp).map_err(|e| PeftError::io(tmp, e));
    }
    let (parent, name) = parent_and_name(target)?;
    let old = parent.join(format!(".{name}.old"));
    remove_any(&old)?;
    fs::rename(target, &old).map_err(|e| PeftError::io(target, e))?;
    if let Err(e) = fs::rename(tmp, target) {
        let _ = fs::rename(&old, target);
        return Err(PeftError::io(target, e));
    }
    fs::remove_dir_all(&old).map_err(|e| PeftError::io(&old, e))
}

/// Swaps two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); false where that is not
/// available (another OS, an old kernel, a filesystem without it), and nothing was changed.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> bool {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let (Ok(ca), Ok(cb)) = (
        CString::new(a.as_os_str().as_bytes()),
        CString::new(b.as_os_str().as_bytes()),
    ) else {
        return false;
    };
    // SAFETY: both arguments are valid NUL-terminated paths that outlive the call; AT_FDCWD
    // makes relative paths relative to the working directory, as `std::fs::rename` does.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> bool {
    false
}

/// Hard-links (or copies) into `new` every entry of `old` that `new` lacks, folders
/// recursively. Nothing to do when `old` does not exist.
fn carry_over(old: &Path, new: &Path) -> Result<()> {
    if !old.is_dir() {
        return Ok(());
    }
    for entry in fs::read_dir(old).map_err(|e| PeftError::io(old, e))? {
        let entry = entry.map_err(|e| PeftError::io(old, e))?;
        let from = entry.path();
        let to = new.join(entry.file_name());
        if to.symlink_metadata().is_ok() {
            continue;
        }
        let kind = entry.file_type().map_err(|e| PeftError::io(&from, e))?;
        if kind.is_dir() {
            fs::create_dir(&to).map_err(|e| PeftError::io(&to, e))?;
            carry_over(&from, &to)?;
        } else if kind.is_symlink() {
            let link = fs::read_link(&from).map_err(|e| PeftError::io(&from, e))?;
            symlink(&link, &to)?;
        } else if fs::hard_link(&from, &to).is_err() {
            fs::copy(&from, &to).map_err(|e| PeftError::io(&to, e))?;
        }
    }
    Ok(())
}

#[cfg(unix)]
fn symlink(link: &Path, to: &Path) -> Result<()> {
    std::os::unix::fs::symlink(link, to).map_err(|e| PeftError::io(to, e))
}

#[cfg(not(unix))]
fn symlink(link: &Path, to: &Path) -> Result<()> {
    fs::copy(link, to)
        .map(|_| ())
        .map_err(|e| PeftError::io(to, e))
}

/// Removes a leftover file or folder at `path`, if any.
fn remove_any(path: &Path) -> Result<()> {
    match path.symlink_metadata() {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(|e| PeftError::io(path, e)),
        Ok(_) => fs::remove_file(path).map_err(|e| PeftError::io(path, e)),
        Err(_) => Ok(()),
    }
}

/// `path`'s parent (`.` for a bare name) and its last component.
fn parent_and_name(path: &Path) -> Result<(PathBuf, String)> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            PeftError::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a folder to write needs a name (not `.`, `..` or `/`)",
                ),
            )
        })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

fn not_a_folder(path: &Path) -> PeftError {
    PeftError::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "exists and is not a folder",
        ),
    )
}

/// Checks, before any work, that the folder `dir` can be written: it is a folder or does not
/// exist yet, no part of its path is a file, and a file can be created in it (or in its nearest
/// existing ancestor, which is where it would be created). Creates nothing that stays.
pub fn check_writable_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        if !dir.is_dir() {
            return Err(not_a_folder(dir));
        }
        return probe(dir, dir);
    }
    let ancestor = existing_ancestor(dir);
    if !ancestor.is_dir() {
        return Err(PeftError::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                format!(
                    "cannot create this folder: {} is a file, not a folder",
                    ancestor.display()
                ),
            ),
        ));
    }
    probe(&ancestor, dir)
}

/// Checks, before any work, that the file `path` can be written: it is not a folder, its
/// folder exists (or can be created, see [`check_writable_dir`]) and is writable, and an
/// existing file can be opened for writing (it is not truncated). Creates nothing that stays.
pub fn check_writable_file(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(PeftError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "is a folder; a file is to be written here",
            ),
        ));
    }
    if path.exists() {
        fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| PeftError::io(path, e))?;
    }
    let (parent, _) = parent_and_name(path)?;
    let folder = existing_ancestor(&parent);
    if !folder.is_dir() {
        return Err(PeftError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                format!(
                    "cannot write this file: {} is a file, not a folder",
                    folder.display()
                ),
            ),
        ));
    }
    probe(&folder, path)
}

/// The nearest ancestor of `path` (or `path` itself) that exists; `.` for a relative path none
/// of whose parts exist.
fn existing_ancestor(path: &Path) -> PathBuf {
    let mut p = path;
    loop {
        if p.symlink_metadata().is_ok() {
            return p.to_path_buf();
        }
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent,
            _ => return PathBuf::from("."),
        }
    }
}

/// Creates and removes a probe file in `folder`; an error names `target` (what is to be
/// written) and the OS reason.
fn probe(folder: &Path, target: &Path) -> Result<()> {
    let file = folder.join(format!(".candle-peft-write-test.{}", std::process::id()));
    let written = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&file)
        .and_then(|mut f| f.write_all(b"probe"));
    let _ = fs::remove_file(&file);
    written.map_err(|e| {
        PeftError::io(
            target,
            std::io::Error::new(
                e.kind(),
                format!("cannot write in {}: {e}", folder.display()),
            ),
        )
    })
}
