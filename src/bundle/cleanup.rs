//! Leaving nothing behind: an export that fails or is interrupted removes its partial
//! output. Owns the temporary output files and the handling of SIGINT, SIGTERM and
//! SIGHUP during an export; what goes into the files is the caller's.
//!
//! Output is written to a hidden file beside the final path ([`UnpublishedFile`]) and
//! renamed into place only when complete, so a reader never sees half a bundle. On an
//! error the guard's Drop removes the file. A signal cannot run Drop, so the signals are
//! blocked in every thread and one thread waits for them with `sigwait`: it takes the
//! lock that publishing also takes, removes every file still registered, and exits with
//! 128 + the signal number. Because both hold the lock, a signal arriving while a file is
//! being published either finds it already in place (and leaves it) or removes it before
//! the rename; it never leaves a partial file under the final name.
//!
//! Scratch files (the per-VM spools) are anonymous: they have no name to leave behind.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use anyhow::{bail, Context};

/// Paths of the unpublished files, for the signal thread.
static UNPUBLISHED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn unpublished() -> MutexGuard<'static, Vec<PathBuf>> {
    // A panic elsewhere must not stop the cleanup: the list is still right.
    UNPUBLISHED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and so in every thread it starts
/// later) and starts the thread that removes unpublished files when one arrives. Call it
/// before starting any other thread.
pub fn remove_unpublished_on_signal() -> anyhow::Result<()> {
    // SAFETY: sigset_t is plain data that sigemptyset initialises; the calls only read
    // and write the set we own.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            bail!("cannot block signals for the export: {}", std::io::Error::from_raw_os_error(rc));
        }
        set
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut signal = 0;
            // SAFETY: `set` is an initialised signal set and `signal` a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                continue;
            }
            let paths = unpublished();
            for path in paths.iter() {
                let _ = std::fs::remove_file(path);
            }
            let _ = writeln!(
                std::io::stderr(),
                "\nqlog: interrupted; removed the unfinished output ({} file{})",
                paths.len(),
                if paths.len() == 1 { "" } else { "s" }
            );
            // SAFETY: _exit ends the process without running anything that could touch
            // the files again; the list lock is deliberately held until then.
            unsafe { libc::_exit(128 + signal) };
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// An output file being written under a hidden temporary name beside its final path.
/// Dropping it, or a signal, removes it; [`UnpublishedFile::publish`] moves it into
/// place.
#[derive(Debug)]
pub struct UnpublishedFile {
    temp: PathBuf,
    file: Option<File>,
}

impl UnpublishedFile {
    /// Creates the temporary file for `target`, readable by its owner only.
    pub fn create(target: &Path) -> anyhow::Result<UnpublishedFile> {
        let dir = parent_dir(target);
        let name = target.file_name().with_context(|| {
            format!("{} names no file (give a file name, not a directory)", target.display())
        })?;
        let mut suffix = [0u8; 6];
        getrandom::fill(&mut suffix)
            .map_err(|e| anyhow::anyhow!("cannot get random bytes for a temporary name: {e}"))?;
        let temp =
            dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), super::pseudonym::hex(&suffix)));
        // Registered before it exists, so a signal right after creation finds it.
        let mut list = unpublished();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .with_context(|| {
                format!("cannot create a file in {} (is it a writable directory?)", dir.display())
            })?;
        list.push(temp.clone());
        Ok(UnpublishedFile { temp, file: Some(file) })
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("the file is open until published or dropped")
    }

    /// Flushes the file to disk and moves it to `target`. With `replace` false an
    /// existing `target` is an error and stays untouched. The published file is
    /// provisional until [`ProvisionalFile::keep`]: one that belongs with another file
    /// goes again if that one cannot be published.
    pub fn publish(mut self, target: &Path, replace: bool) -> anyhow::Result<ProvisionalFile> {
        let file = self.file.take().expect("the file is open until published");
        file.sync_all().with_context(|| format!("cannot write {}", target.display()))?;
        drop(file);
        let mut list = unpublished();
        let moved = if replace {
            std::fs::rename(&self.temp, target)
        } else {
            // A hard link fails if the target exists, where a rename would replace it.
            std::fs::hard_link(&self.temp, target).and_then(|()| std::fs::remove_file(&self.temp))
        };
        match moved {
            Ok(()) => {
                // The final path takes the temporary one's place in the list, so there is
                // no moment in which a signal finds neither.
                list.retain(|p| p != &self.temp);
                list.push(target.to_path_buf());
                drop(list);
                // The rename is durable only once the directory is.
                if let Ok(dir) = File::open(parent_dir(target)) {
                    let _ = dir.sync_all();
                }
                Ok(ProvisionalFile { path: target.to_path_buf(), kept: false })
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!("{} already exists (remove it or choose another path)", target.display())
            }
            Err(e) => Err(e)
                .with_context(|| format!("cannot move the finished file to {}", target.display())),
        }
    }
}

/// A published file that is removed on drop (or a signal) unless kept.
#[derive(Debug)]
#[must_use = "dropping it removes the file it names"]
pub struct ProvisionalFile {
    path: PathBuf,
    /// True if and only if [`ProvisionalFile::keep`] was called.
    kept: bool,
}

impl ProvisionalFile {
    /// Keeps the file for good.
    pub fn keep(mut self) {
        unpublished().retain(|p| p != &self.path);
        self.kept = true;
    }
}

impl Drop for ProvisionalFile {
    fn drop(&mut self) {
        if !self.kept {
            let mut list = unpublished();
            let _ = std::fs::remove_file(&self.path);
            list.retain(|p| p != &self.path);
        }
    }
}

impl Drop for UnpublishedFile {
    fn drop(&mut self) {
        let mut list = unpublished();
        if list.contains(&self.temp) {
            let _ = std::fs::remove_file(&self.temp);
            list.retain(|p| p != &self.temp);
        }
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_removes_and_publishing_moves() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.tar.zst");
        let mut dropped = UnpublishedFile::create(&target).unwrap();
        dropped.file().write_all(b"partial").unwrap();
        drop(dropped);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let mut kept = UnpublishedFile::create(&target).unwrap();
        kept.file().write_all(b"whole").unwrap();
        kept.publish(&target, true).unwrap().keep();
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_provisional_file_goes_unless_kept() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("map.json");
        let f = UnpublishedFile::create(&target).unwrap();
        let provisional = f.publish(&target, false).unwrap();
        assert!(target.exists());
        drop(provisional);
        assert!(!target.exists());
    }

    #[test]
    fn publishing_without_replace_refuses_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("map.json");
        std::fs::write(&target, b"old").unwrap();
        let f = UnpublishedFile::create(&target).unwrap();
        let err = f.publish(&target, false).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
