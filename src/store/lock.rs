//! One process per database: an exclusive lock on `<database>.lock`, holding the pid.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Held for the life of the process (or the in-process app); released on drop.
#[derive(Debug)]
pub struct DbLock {
    _file: File,
    pub path: PathBuf,
}

impl DbLock {
    pub fn acquire(db_path: &Path) -> Result<DbLock, String> {
        if let Some(dir) = db_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        // The lock belongs to the file, not to the name it was reached by: resolve
        // symlinks and relative paths first, so two spellings of one database collide.
        let real = match std::fs::canonicalize(db_path) {
            Ok(p) => p,
            Err(_) => {
                let dir = db_path
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                let dir = std::fs::canonicalize(dir)
                    .map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
                dir.join(db_path.file_name().unwrap_or_default())
            }
        };
        let path = PathBuf::from(format!("{}.lock", real.display()));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("cannot open lock file {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(format!(
                    "database {} is in use by another autopilot process (pid {}); one process per database",
                    db_path.display(),
                    if holder.is_empty() { "unknown" } else { holder }
                ));
            }
            Err(TryLockError::Error(e)) => {
                return Err(format!("cannot lock {}: {e}", path.display()))
            }
        }
        file.set_len(0).map_err(|e| e.to_string())?;
        file.rewind().map_err(|e| e.to_string())?;
        write!(file, "{}", std::process::id()).map_err(|e| e.to_string())?;
        file.flush().map_err(|e| e.to_string())?;
        Ok(DbLock { _file: file, path })
    }
}
